"""The :class:`Source` interface: batches of model inputs with optional labels, in an order that
is a function of ``(seed, epoch)`` only, and a deterministic validation split."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from onnxdns.errors import OnnxdnsError


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model feeds (input name -> array, samples on each input's batch axis) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    #: Batch axis of each input (default 0: images, most models).
    axes: dict[str, int] | None = None

    def axis(self, name: str) -> int:
        return (self.axes or {}).get(name, 0)

    def __len__(self) -> int:
        name, first = next(iter(self.inputs.items()), (None, None))
        return int(first.shape[self.axis(name)]) if first is not None and first.ndim else 1

    def take(self, count: int) -> Batch:
        """The first ``count`` samples."""
        if count >= len(self):
            return self
        inputs = {k: np.take(v, np.arange(count), axis=self.axis(k)) for k, v in self.inputs.items()}
        return Batch(inputs, None if self.labels is None else self.labels[:count], self.axes)


class Source:
    """Where batches come from. ``name`` describes it in reports and errors; ``has_labels``;
    ``len(source)`` when the number of samples is known (else :meth:`length` is None)."""

    name: str = "data"
    has_labels: bool = False
    #: Number of classes when the source knows it (class subfolders, a built-in data set), else None.
    num_classes: int | None = None
    #: What one sample is, in messages ("images" for image sources).
    unit: str = "samples"

    def length(self) -> int | None:
        return None

    def __len__(self) -> int:
        n = self.length()
        if n is None:
            raise TypeError(f"{self.name}: length unknown")
        return n

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """Batches of ``batch_size`` samples (the last may be smaller). ``seed=None``: the source's
        own order; else shuffled by a permutation that depends only on ``(seed, epoch)``.
        ``start``: begin at batch ``start`` of that order (a resumed run; an indexed source skips
        without reading the skipped samples, others read and discard them)."""
        raise NotImplementedError

    def check(self, samples: int | None = None, batch_size: int = 64) -> int:
        """Read the first ``samples`` samples (all by default) one batch at a time, so that a file
        that fails to decode, or a function that raises, is an error now (e.g. before a command
        writes its output); returns the number read."""
        n = 0
        for batch in self.batches(batch_size):
            n += len(batch)
            if samples is not None and n >= samples:
                break
        return n

    def split(self, val_fraction: float, seed: int = 0) -> tuple[Source, Source]:
        """(train, validation): a deterministic held-out ``val_fraction`` of the samples."""
        raise OnnxdnsError(f"{self.name}: cannot hold out a validation fraction of this source; give --val-data")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise OnnxdnsError(f"batch size must be positive, got {batch_size}")


def order(n: int, seed: int | None, epoch: int) -> np.ndarray:
    """Sample order: ``0..n-1``, or a permutation seeded by ``(seed, epoch)``."""
    if seed is None:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def split_indices(n: int, val_fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sample indices, both sorted, disjoint, chosen by ``seed``."""
    if not 0 < val_fraction < 1:
        raise OnnxdnsError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    k = int(round(n * val_fraction))
    if k < 1 or k >= n:
        raise OnnxdnsError(f"{name}: {n} samples are too few to hold out {val_fraction:g} of them for validation")
    picked = np.random.default_rng([int(seed), 0x5A11]).permutation(n)
    return np.sort(picked[k:]), np.sort(picked[:k])


class IndexedSource(Source):
    """A source whose samples can be read by index: subclasses implement :meth:`_read`; order,
    batching and splitting are done here over ``self.indices``."""

    indices: np.ndarray

    def length(self) -> int:
        return int(len(self.indices))

    def _read(self, indices: np.ndarray) -> Batch:
        """The batch of the samples at ``indices`` (positions in the underlying data)."""
        raise NotImplementedError

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        check_batch_size(batch_size)
        chosen = self.indices[order(len(self.indices), seed, epoch)]
        for first in range(start * batch_size, len(chosen), batch_size):
            yield self._read(chosen[first:first + batch_size])

    def sample(self, count: int, seed: int, name: str) -> IndexedSource:
        """``count`` distinct samples drawn by ``seed``, in source order (``subset`` of a run)."""
        if not 0 < count <= len(self.indices):
            raise OnnxdnsError(f"{self.name}: subset size must be 1..{len(self.indices)}, got {count}")
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self.indices), size=count, replace=False)),
                           name)

    def subset(self, indices: np.ndarray, name: str) -> IndexedSource:
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.indices = self.indices[indices]
        out.name = name
        return out

    def split(self, val_fraction: float, seed: int = 0) -> tuple[Source, Source]:
        train, val = split_indices(len(self.indices), val_fraction, seed, self.name)
        return self.subset(train, f"{self.name} (train part)"), self.subset(val, f"{self.name} (validation part)")


def check_labels(labels: np.ndarray, n: int, num_classes: int | None, where: str) -> np.ndarray:
    """``labels`` as int64 [n], in ``0..num_classes-1`` when that is known."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != n:
        raise OnnxdnsError(f"{where}: labels must be integers, one per sample ({n}), got {labels.dtype.name} "
                           f"{list(labels.shape)}")
    if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        top = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise OnnxdnsError(f"{where}: label {bad} out of range {top}")
    return labels.astype(np.int64, copy=False)
