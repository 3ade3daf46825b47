"""One data interface for every command that reads data: :func:`open_source` turns a ``--data``
(or ``--calib-data``) value into a :class:`Source` of batches that fit the model's inputs.

Kinds (one module each):

* ``mnist``, ``fashion-mnist`` (:mod:`.datasets`): a split of the built-in data sets;
* ``DIR`` (:mod:`.images`): a folder of images, class subfolders give labels;
* ``FILE.npz`` / ``FILE.npy`` (:mod:`.arrays`): arrays named after the model inputs, optional
  ``labels``; read without pickle, memory-mapped where the file allows it;
* ``path/to/file.py:function`` or ``package.module:function`` (:mod:`.callable`): a function
  returning an iterable of batches, each a dict from input name to array with an optional
  ``"labels"`` entry.

Every bad input is an :class:`~onnxdns.errors.OnnxdnsError` with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from onnxdns.data import DATASET_NAMES
from onnxdns.errors import OnnxdnsError
from onnxdns.sources.base import Batch, IndexedSource, Source
from onnxdns.sources.model import ModelInput, describe_inputs, model_inputs

__all__ = ["Batch", "IndexedSource", "ModelInput", "Source", "describe_inputs", "is_source_spec", "model_inputs",
           "open_source"]


def is_source_spec(spec: Any) -> bool:
    """True when ``spec`` names user data: a folder, a ``.npz``/``.npy`` file or ``module:function``."""
    if isinstance(spec, Source):
        return True
    if not isinstance(spec, (str, os.PathLike)):
        return False
    text = os.fspath(spec)
    return text.endswith((".npz", ".npy")) or os.path.isdir(text) or _is_callable_spec(text)


def _is_callable_spec(text: str) -> bool:
    if ":" not in text or os.path.exists(text):
        return False
    target, _, func = text.rpartition(":")
    return bool(target) and func.isidentifier()


def open_source(spec: Any, inputs: Sequence[ModelInput], *, split: str = "train", mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, data_dir: str | os.PathLike | None = None,
                download: bool = False) -> Source:
    """The :class:`Source` named by ``spec`` for a model with ``inputs`` (see :func:`model_inputs`).

    ``split`` picks the built-in data sets' split; ``mean``/``std`` normalise images of a folder
    (see :mod:`.images`); ``data_dir``/``download`` go to :func:`onnxdns.data.load_dataset`.
    Names, shapes and dtypes are checked against ``inputs`` here, before any batch is read
    (a callable's batches are checked as they come).
    """
    if isinstance(spec, Source):
        return spec
    text = os.fspath(spec)
    if text in DATASET_NAMES:
        from onnxdns.sources.datasets import DatasetSource

        return DatasetSource(text, inputs, split=split, data_dir=data_dir, download=download)
    if text.endswith((".npz", ".npy")):
        from onnxdns.sources.arrays import ArraySource

        return ArraySource(Path(text), inputs)
    if os.path.isdir(text):
        from onnxdns.sources.images import ImageFolderSource

        return ImageFolderSource(Path(text), inputs, mean=mean, std=std)
    if _is_callable_spec(text):
        from onnxdns.sources.callable import CallableSource

        return CallableSource(text, inputs)
    if not os.path.exists(text):
        raise OnnxdnsError(f"{text}: no such file or folder (give mnist, fashion-mnist, a folder of images, "
                           f"FILE.npz, FILE.npy or module:function)")
    raise OnnxdnsError(f"{text}: not a data source (give mnist, fashion-mnist, a folder of images, FILE.npz, "
                       f"FILE.npy or module:function)")
