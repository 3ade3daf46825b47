"""The built-in data sets (``mnist``, ``fashion-mnist``) of :mod:`onnxdns.data` as a source: one
float input [N, 1, 28, 28] in [0, 1] with labels."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.sources.base import Batch, IndexedSource
from onnxdns.sources.model import ModelInput, single_input


class DatasetSource(IndexedSource):
    def __init__(self, name: str, inputs: Sequence[ModelInput], *, split: str = "train",
                 data_dir: str | os.PathLike | None = None, download: bool = False):
        from onnxdns.data import load_dataset

        self.input = single_input(inputs, f"the dataset '{name}'")
        d = self.input.dims
        if self.input.dtype.kind != "f" or len(d) != 4 or any(isinstance(x, int) and x > 0 and x != e
                                                               for x, e in zip(d[1:], (1, 28, 28))):
            raise OnnxdnsError(f"--data {name} gives [N,1,28,28] float images, but model input "
                               f"{self.input.describe()} does not take them")
        try:
            self.dataset = load_dataset(name, split=split, data_dir=data_dir, download=download)
        except OSError as e:
            raise OnnxdnsError(f"{name} {split} data unavailable: {e.strerror or e}") from None
        self.name = name
        self.has_labels = True
        self.num_classes = len(self.dataset.classes)
        self.indices = np.arange(len(self.dataset))

    def _read(self, indices: np.ndarray) -> Batch:
        images = self.dataset.images[indices].astype(self.input.dtype, copy=False)
        return Batch({self.input.name: images}, self.dataset.labels[indices])
