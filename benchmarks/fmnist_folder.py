"""Write Fashion-MNIST as a folder of PNG images, as a user's own image data would look.

Layout: torchvision's ImageFolder, one subfolder per class named after the data set's class
(``T-shirt/top`` becomes ``T-shirt_top``: a ``/`` cannot be in a folder name), files
``<split>-<index>.png`` with the index of the image in the split (zero-padded to 5 digits).
ImageFolder and ``onnxdns --data DIR`` number the classes in sorted folder-name order, which is
not the data set's label order; a model trained on the folder uses the folder's numbering.
``--flat`` writes the same images into one folder without labels (the input of ``--loss distill``).

Images are 28x28, 3-channel RGB (the gray value in each channel), PNG without metadata, so the
files are a deterministic function of the data set, ``--split`` and ``--limit``: ``--limit N``
keeps the first N images of every class in data set order (all 10 classes always present);
without it the whole split is written (60,000 train or 10,000 test images).

    python benchmarks/fmnist_folder.py --out /tmp/fmnist-train                     # 60,000 images
    python benchmarks/fmnist_folder.py --out /tmp/fmnist-val --split test --limit 100
    python benchmarks/fmnist_folder.py --out /tmp/fmnist-flat --flat --limit 20
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from onnxdns.data import load_dataset


def class_folder(name: str) -> str:
    """A folder name for a data set class name."""
    return name.replace("/", "_")


def selected(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices written: the first ``limit`` of every class (all when ``limit`` is None), in order."""
    if limit is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == k)[:limit] for k in np.unique(labels)])
    return np.sort(keep)


def write_folder(out: str | os.PathLike, *, split: str = "train", limit: int | None = None, flat: bool = False,
                 data_dir: str | os.PathLike | None = None) -> int:
    """Write the images of ``split`` under ``out`` (created; must not hold images); returns the count."""
    ds = load_dataset("fashion-mnist", split, data_dir=data_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"fmnist_folder: error: {out} is not empty")
    folders = {k: out if flat else out / class_folder(name) for k, name in enumerate(ds.classes)}
    for folder in set(folders.values()):
        folder.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(np.asarray(ds.images[:, 0]) * 255).astype(np.uint8)  # exact: the IDX bytes / 255
    indices = selected(np.asarray(ds.labels), limit)
    for i in indices:
        gray = pixels[i]
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        Image.fromarray(rgb, "RGB").save(folders[int(ds.labels[i])] / f"{split}-{i:05d}.png", optimize=False)
    return len(indices)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to create (must be empty)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--limit", type=int, metavar="N", help="images per class (default: all)")
    p.add_argument("--flat", action="store_true", help="one folder without class subfolders (unlabelled)")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST files (default: /usr/share/datasets/fashion-mnist)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    n = write_folder(args.out, split=args.split, limit=args.limit, flat=args.flat, data_dir=args.data_dir)
    print(f"wrote {n} images to {args.out}{' (flat)' if args.flat else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
