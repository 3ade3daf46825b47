"""A folder of images (``--data DIR``), decoded with Pillow batch by batch.

Layout: class subfolders (``DIR/cat/*.jpg``, ``DIR/dog/*.png``: torchvision's ImageFolder)
give labels, the classes numbered in sorted name order; a flat folder of images is unlabelled.
Files are taken by extension (``IMAGE_EXTENSIONS``, any case), hidden files and other files are
ignored, order is sorted path order.

Each image is converted to the model's channels (``L`` for 1, ``RGB`` for 3), resized so that it
covers the model's height x width (bilinear, aspect ratio kept) and center-cropped to it, scaled
to [0, 1], normalised per channel as ``(x - mean) / std`` (defaults ``mean 0``, ``std 1``: the
[0, 1] scale of the built-in data sets; ImageNet-trained models usually want
``--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``) and laid out as the input expects (NCHW
or NHWC). When the model leaves height or width open, every image must have the same size,
which is then used as it is.

Bad files are rejected, not skipped: opening the source reads every file's header (a few bytes
each, not the pixels) and a file Pillow cannot identify is a one-line error naming it; a file
whose pixels fail to decode later stops the run with the same kind of error (``optimize`` reads
its validation samples once with :meth:`~onnxdns.sources.Source.check` before writing anything).
Skipping would make the sample count, and with it the data order of a resumed run, depend on
which files decode.

Memory: only one batch of decoded images exists at a time (:attr:`ImageFolderSource.peak_decoded`
counts them), so a folder larger than RAM works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.sources.base import Batch, IndexedSource
from onnxdns.sources.model import ModelInput, image_layout, single_input

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # a core dependency: only a broken install lacks it
        raise OnnxdnsError("reading a folder of images needs Pillow: pip install pillow") from None
    return Image


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _vector(values: Sequence[float] | None, channels: int, default: float, what: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, np.float32)
    v = np.asarray(list(values), np.float32)
    if v.size == 1:
        v = np.repeat(v, channels)
    if v.shape != (channels,):
        raise OnnxdnsError(f"--{what} needs 1 or {channels} values (the model takes {channels} channels), got {v.size}")
    if what == "std" and np.any(v <= 0):
        raise OnnxdnsError(f"--std values must be positive, got {','.join(f'{x:g}' for x in v)}")
    return v


class ImageFolderSource(IndexedSource):
    unit = "images"

    def __init__(self, folder: Path, inputs: Sequence[ModelInput], *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        Image = _pil()
        self.name = folder.name or str(folder)
        where = f"--data {folder}"
        self.input = single_input(inputs, f"a folder of images ({folder})")
        self.layout = image_layout(self.input, where)
        try:
            subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            flat = _images_in(folder)
            per_class = [_images_in(d) for d in subdirs]
        except OSError as e:
            raise OnnxdnsError(f"{folder}: cannot list the folder: {e.strerror or e}") from None
        if flat and any(per_class):
            raise OnnxdnsError(f"{folder}: holds both images and class subfolders; put every image in a class "
                               f"subfolder, or none")
        if flat:
            self.files, labels, self.classes = flat, None, ()
        else:
            classes = [(d.name, files) for d, files in zip(subdirs, per_class) if files]
            self.classes = tuple(c for c, _ in classes)
            self.files = [f for _, files in classes for f in files]
            labels = np.concatenate([np.full(len(files), k, np.int64) for k, (_, files) in enumerate(classes)]) \
                if classes else None
        if not self.files:
            raise OnnxdnsError(f"{folder}: no images (looked for {', '.join(IMAGE_EXTENSIONS)} in the folder "
                               f"and its subfolders)")
        self.labels = labels
        self.has_labels = labels is not None
        self.num_classes = len(self.classes) if self.has_labels else None
        sizes = {}
        for path in self.files:  # headers only: Pillow reads pixels on load()
            try:
                with Image.open(path) as im:
                    sizes.setdefault(im.size, path)
            except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ValueError, ...
                raise OnnxdnsError(f"{path}: not a readable image ({e})") from None
        h, w = self.layout.height, self.layout.width
        if (h is None or w is None) and len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise OnnxdnsError(f"{folder}: images of different sizes ({s1[0]}x{s1[1]} {p1.name}, {s2[0]}x{s2[1]} "
                               f"{p2.name}) and model input {self.input.describe()} fixes no size to resize them to")
        first = next(iter(sizes))
        self.size = (h or first[1], w or first[0])
        c = self.layout.channels
        self.mean = _vector(mean, c, 0.0, "mean")
        self.std = _vector(std, c, 1.0, "std")
        self.indices = np.arange(len(self.files))
        #: Most decoded images held at once so far (one batch).
        self.peak_decoded = 0

    def _decode(self, path: Path) -> np.ndarray:
        """[H, W, C] float32 in [0, 1] at the model's size."""
        Image = _pil()
        h, w = self.size
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.layout.channels == 1 else "RGB")
                if im.size != (w, h):
                    scale = max(h / im.height, w / im.width)
                    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
                    im = im.resize((rw, rh), Image.BILINEAR)
                    left, top = (rw - w) // 2, (rh - h) // 2
                    im = im.crop((left, top, left + w, top + h))
                pixels = np.asarray(im, dtype=np.float32)
        except OnnxdnsError:
            raise
        except Exception as e:
            raise OnnxdnsError(f"{path}: cannot decode the image ({e})") from None
        return pixels.reshape(h, w, self.layout.channels) / np.float32(255)

    def _read(self, indices: np.ndarray) -> Batch:
        h, w = self.size
        c = self.layout.channels
        out = np.empty((len(indices), h, w, c), np.float32)
        self.peak_decoded = max(self.peak_decoded, len(indices))
        for k, i in enumerate(indices):
            out[k] = self._decode(self.files[int(i)])
        out -= self.mean
        out /= self.std
        if self.layout.layout == "NCHW":
            out = out.transpose(0, 3, 1, 2)
        array = np.ascontiguousarray(out, dtype=self.input.dtype)
        return Batch({self.input.name: array}, None if self.labels is None else self.labels[indices])

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.name!r}, {len(self.indices)} images, {len(self.classes)} classes)"

