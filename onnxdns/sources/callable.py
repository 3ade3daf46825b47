"""``path/to/file.py:function`` or ``package.module:function``: a function, called with no
arguments, returning an iterable of batches, each a dict from input name to array (samples on each
input's batch axis) with an optional ``"labels"`` entry (integers, one per sample). The hook for
any preprocessing (a "dataloader function" to Olive and Neural Compressor users). Its order is its
own; ``batch_size`` and ``seed`` do not change it. The function is called when the source is
opened (its first batch is checked then, before anything is written) and again for every pass
over the data. Each batch is checked against the model inputs as it comes; an import failure or
an exception in the function is a one-line error."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.sources.base import Batch, Source, check_batch_size, check_labels
from onnxdns.sources.model import ModelInput, check_feeds

LABELS = "labels"


def load_callable(spec: str) -> Callable[[], Any]:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise OnnxdnsError(f"{spec}: no such file {target}")
            module_name = f"onnxdns_user_data_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except OnnxdnsError:
        raise
    except BaseException as e:  # the user's module may raise anything while it is imported
        if isinstance(e, KeyboardInterrupt):
            raise
        raise OnnxdnsError(f"{spec}: cannot import {target}: {type(e).__name__}: {e}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise OnnxdnsError(f"{spec}: {target} has no function {attr}")
    return func


class CallableSource(Source):
    def __init__(self, spec: str, inputs: Sequence[ModelInput]):
        self.spec = spec
        self.name = spec
        self.func = load_callable(spec)
        self.inputs = list(inputs)
        first = next(self._batches(), None)  # fail before anything is written; also tells has_labels
        if first is None:
            raise OnnxdnsError(f"{spec}: returned no batches")
        self.has_labels = first.labels is not None

    def _batches(self) -> Iterator[Batch]:
        try:
            iterator = iter(self.func())
        except Exception as e:
            raise OnnxdnsError(f"{self.spec}: raised {type(e).__name__}: {e}") from None
        k = 0
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as e:
                raise OnnxdnsError(f"{self.spec}: raised {type(e).__name__} at batch {k}: {e}") from None
            yield self._check(item, k)
            k += 1

    def _check(self, item: Any, k: int) -> Batch:
        where = f"{self.spec} batch {k}"
        if not isinstance(item, dict):
            raise OnnxdnsError(f"{where}: expected a dict from input name to array, got {type(item).__name__}")
        item = dict(item)
        labels = item.pop(LABELS, None) if LABELS not in {i.name for i in self.inputs} else None
        feeds = check_feeds(self.inputs, item, where)
        counts = {i.name: feeds[i.name].shape[i.batch_axis] for i in self.inputs if feeds[i.name].ndim}
        if len(set(counts.values())) > 1:
            raise OnnxdnsError(f"{where}: arrays hold different numbers of samples on their batch axes: {counts}")
        n = next(iter(counts.values()), 1)
        return Batch(feeds, None if labels is None else check_labels(np.asarray(labels), n, None, where),
                     {i.name: i.batch_axis for i in self.inputs})

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        check_batch_size(batch_size)
        batches = self._batches()
        for _ in range(start):  # its order is its own: the skipped batches are read and discarded
            if next(batches, None) is None:
                break
        return batches
