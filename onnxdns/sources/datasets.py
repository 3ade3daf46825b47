"""The built-in data sets (``mnist``, ``fashion-mnist``) of :mod:`onnxdns.data` as a source: one
float input [N, 1, 28, 28] in [0, 1] with labels (validate's dataset comparison reads them through it).
A model whose input fixes every other dimension to 784 elements in all (LeNet-300-100's [N, 784])
gets the images reshaped to it, as training always did."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.sources.base import Batch, IndexedSource
from onnxdns.sources.model import ModelInput, single_input


class DatasetSource(IndexedSource):
    """``dataset``: an already loaded :class:`onnxdns.data.Dataset` (or any object with
    ``images`` [N, 1, 28, 28] and ``labels``) instead of loading ``name``'s ``split``."""

    unit = "images"

    def __init__(self, name: str, inputs: Sequence[ModelInput], *, split: str = "train",
                 data_dir: str | os.PathLike | None = None, download: bool = False, dataset: Any = None):
        from onnxdns.data import load_dataset

        self.input = single_input(inputs, f"the dataset '{name}'")
        d = self.input.dims
        sample = d[1:]
        #: The model's sample shape when it is not [1, 28, 28] but holds 784 elements (None: as stored).
        self.reshape = tuple(sample) if len(d) >= 2 and all(isinstance(x, int) and x > 0 for x in sample) \
            and int(np.prod(sample)) == 28 * 28 and tuple(sample) != (1, 28, 28) else None
        if self.input.dtype.kind != "f" or (self.reshape is None and (len(d) != 4 or any(
                isinstance(x, int) and x > 0 and x != e for x, e in zip(d[1:], (1, 28, 28))))):
            raise OnnxdnsError(f"--data {name} gives [N,1,28,28] float images, but model input "
                               f"{self.input.describe()} does not take them")
        if dataset is None:
            try:
                dataset = load_dataset(name, split=split, data_dir=data_dir, download=download)
            except OSError as e:
                raise OnnxdnsError(f"{name} {split} data unavailable: {e.strerror or e}") from None
        self.dataset = dataset
        self.name = name
        self.has_labels = True
        classes = getattr(dataset, "classes", None)
        self.num_classes = len(classes) if classes else None
        self.indices = np.arange(len(dataset.labels))

    def _read(self, indices: np.ndarray) -> Batch:
        # float32 as the data set holds them (a float16 model's runner casts: validate compares an fp16
        # model with its fp32 source on the same float32 images)
        images = np.asarray(self.dataset.images[indices], dtype=np.float32)
        if self.reshape is not None:
            images = images.reshape((len(images), *self.reshape))
        return Batch({self.input.name: images}, np.asarray(self.dataset.labels)[indices])
