"""Rendered data for the OCR proof benchmark (issue 11): text lines for the direction classifier
and pages of random words for the text detector of the ``rapidocr-onnxruntime`` wheel.

Everything is drawn with Pillow in a DejaVu font of the Debian package ``fonts-dejavu-core``
(``/usr/share/fonts/truetype/dejavu/``); nothing is downloaded. The output is a function of
``--seed`` only: sample ``i`` of a kind is drawn from ``numpy.random.default_rng([seed, kind, i])``
and the held-out split is a seeded permutation of the sample indices.

Layout (``--out DIR``)::

    DIR/cls/{train,val,test}/{0,180}/line_000123.png   direction classifier, ImageFolder layout
    DIR/det/{train,val,test}/page_000045.png           detector pages, flat (no labels: distillation)
    DIR/det/boxes.json                                  drawn line boxes per page (sanity checks only)
    DIR/manifest.json                                   settings, counts, preprocessing

Recipe choices (thresholds, budgets, early stopping) read ``val``; ``test`` is only reported.

**Classifier** ``ch_ppocr_mobile_v2.0_cls_infer.onnx``: rapidocr's ``TextClassifier`` resizes a
cropped line to height 48 keeping its aspect ratio (width at most 192) and normalises
``(x / 255 - 0.5) / 0.5`` (``ch_ppocr_cls/text_cls.py``, ``resize_norm_img``); its labels are
``label_list: ['0', '180']`` (``config.yaml``), output index 0 = upright. Lines are therefore
drawn at exactly 192 x 48, so rapidocr's resize is the identity and the onnxdns folder source
(classes numbered in sorted name order: ``0`` then ``180``, the model's order) reads the same
tensor with ``--mean 0.5 --std 0.5``. Class ``180`` is the upright line rotated by 180 degrees.

**Detector** ``ch_PP-OCRv4_det_infer.onnx`` (dynamic height and width): rapidocr's
``DetPreProcess`` resizes to multiples of 32 and normalises ``(x / 255 - mean) / std`` with
``mean = std = [0.5, 0.5, 0.5]`` (``config.yaml`` ``Det``; not ImageNet's statistics). Pages are
drawn at ``PAGE`` x ``PAGE`` = 480 x 480: a multiple of 32 (no resize in either path), text of
14-36 px height as rapidocr's ``limit_side_len`` resize leaves it on a scanned page, and half the
cost of 640 x 640 (measured: 52 vs 116 ms per page at batch 1 on this 2-core machine), which keeps
distillation over a few hundred pages at minutes. Folder-source options: ``--mean 0.5 --std 0.5``.

**Channel order**: both models were trained on OpenCV's BGR images (rapidocr's ``LoadImage``
converts RGB files to BGR); the onnxdns folder source decodes RGB. Every image is drawn in grey
levels (saved as 8-bit greyscale PNG, read as R = G = B), so the two orders give the same tensor;
colour variety is replaced by varied grey levels of text and background.

    python benchmarks/ocr_data.py --out /tmp/ocr --seed 0 --lines 3000 --pages 300
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
#: The fonts of Debian's fonts-dejavu-core (fonts-dejavu-extra adds condensed and oblique ones).
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
LINE_W, LINE_H = 192, 48   # classifier input (C x H x W = 3 x 48 x 192)
PAGE = 480                 # detector page side, a multiple of 32
CLASSES = ("0", "180")     # rapidocr config.yaml Cls.label_list: output index order
SPLITS = ("train", "val", "test")
#: Folder-source normalisation ((x/255 - mean) / std, x in 0..255) both models expect.
CLS_MEAN, CLS_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
DET_MEAN, DET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
_KIND_LINE, _KIND_PAGE = 1, 2
_ALPHABET = string.ascii_letters + string.digits
_PUNCT = ".,;:-!?()'/%&"


class DataError(Exception):
    """A bad argument or a missing font: one line for the user."""


def fonts() -> list[Path]:
    found = [FONT_DIR / f for f in FONT_FILES if (FONT_DIR / f).is_file()]
    if not found:
        raise DataError(f"no DejaVu font in {FONT_DIR}: install the Debian package fonts-dejavu-core "
                        f"(apt-get install fonts-dejavu-core)")
    return found


def _font(rng: np.random.Generator, paths: list[Path], size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(paths[int(rng.integers(len(paths)))]), size)


def _word(rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 10))
    kind = rng.random()
    if kind < 0.15:
        w = "".join(rng.choice(list(string.digits), n))
    else:
        w = "".join(rng.choice(list(string.ascii_lowercase), n))
        if kind < 0.45:
            w = w.capitalize()
        elif kind < 0.55:
            w = w.upper()
        elif kind < 0.65:
            w = "".join(rng.choice(list(_ALPHABET), n))
    if rng.random() < 0.2:
        w += str(rng.choice(list(_PUNCT)))
    return w


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(_word(rng) for _ in range(words))


def _grey_pair(rng: np.random.Generator) -> tuple[int, int]:
    """(text, background) grey levels with a readable contrast; mostly dark on light."""
    if rng.random() < 0.85:
        bg = int(rng.integers(150, 256))
        fg = int(rng.integers(0, max(1, bg - 90)))
    else:
        bg = int(rng.integers(0, 90))
        fg = int(rng.integers(bg + 100, 256))
    return fg, bg


def _finish(img, rng: np.random.Generator):
    """Light blur and Gaussian noise; returns an 8-bit greyscale image."""
    from PIL import Image, ImageFilter

    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    a = np.asarray(img, np.float32)
    sigma = float(rng.uniform(0.0, 8.0))
    a = a + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def render_line(seed: int, index: int, paths: list[Path]):
    """(192 x 48 greyscale line image as the classifier sees it, rotated?) for sample ``index``.

    As rapidocr feeds a detected line: the text is drawn with a small margin and cropped (a
    detector crop), rotated by 180 degrees for class ``180``, resized to height 48 keeping its
    aspect ratio (squeezed to width 192 when wider) and, when narrower, padded on the right with
    the background (rapidocr pads with 0 after normalisation, i.e. mid-grey; the background keeps
    the padded image a plain 8-bit image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, _KIND_LINE, index])
    fg, bg = _grey_pair(rng)
    size = int(rng.integers(20, 48))
    font = _font(rng, paths, size)
    text = _text(rng, int(rng.integers(1, 6)))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    th = bottom - top
    mx = [int(rng.integers(0, max(1, th // 3) + 1)) for _ in range(2)]
    my = [int(rng.integers(0, max(1, th // 4) + 1)) for _ in range(2)]
    crop = Image.new("L", (right - left + mx[0] + mx[1], th + my[0] + my[1]), bg)
    ImageDraw.Draw(crop).text((mx[0] - left, my[0] - top), text, fill=fg, font=font)
    rotated = bool(rng.random() < 0.5)
    if rotated:
        crop = crop.rotate(180)
    width = min(LINE_W, int(np.ceil(LINE_H * crop.width / crop.height)))
    img = Image.new("L", (LINE_W, LINE_H), bg)
    img.paste(crop.resize((width, LINE_H), Image.BILINEAR), (0, 0))
    return _finish(img, rng), rotated


def render_page(seed: int, index: int, paths: list[Path]):
    """(480 x 480 greyscale page of random words, drawn line boxes [x0, y0, x1, y1])."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, _KIND_PAGE, index])
    fg, bg = _grey_pair(rng)
    img = Image.new("L", (PAGE, PAGE), bg)
    draw = ImageDraw.Draw(img)
    boxes = []
    y = int(rng.integers(4, 40))
    while True:
        size = int(rng.integers(14, 37))
        font = _font(rng, paths, size)
        x = int(rng.integers(4, PAGE // 3))
        text = _text(rng, int(rng.integers(1, 8)))
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        if bottom > PAGE - 4:
            break
        while right > PAGE - 4 and " " in text:  # keep whole words on the page
            text = text.rsplit(" ", 1)[0]
            left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        if right <= PAGE - 4:
            draw.text((x, y), text, fill=fg, font=font)
            boxes.append([int(left), int(top), int(right), int(bottom)])
        y = bottom + int(rng.integers(size // 3, 2 * size + 20))
    return _finish(img, rng), boxes


def split_of(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split name of each of ``n`` samples: a seeded permutation, ``round(n * fraction)``
    samples for val and for test (at least one each), the rest train."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"--val-fraction and --test-fraction must be in (0, 1) with a sum below 1, got "
                        f"{val_fraction:g} and {test_fraction:g}")
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n_val + n_test >= n:
        raise DataError(f"{n} samples are too few for a train, val and test split")
    perm = np.random.default_rng([seed, 0x0C5]).permutation(n)
    out = ["train"] * n
    for i in perm[:n_val]:
        out[int(i)] = "val"
    for i in perm[n_val:n_val + n_test]:
        out[int(i)] = "test"
    return out


def generate(out: Path, *, seed: int = 0, lines: int = 3000, pages: int = 300, val_fraction: float = 0.15,
             test_fraction: float = 0.15) -> dict:
    """Render the data set into ``out`` (which must not hold one already); returns the manifest."""
    paths = fonts()
    if lines < 3 or pages < 3:
        raise DataError(f"--lines and --pages must be at least 3 (one sample per split), got {lines} and {pages}")
    if (out / "manifest.json").exists() or (out / "cls").exists() or (out / "det").exists():
        raise DataError(f"{out}: already holds a data set; give a new --out folder")
    line_split = split_of(lines, val_fraction, test_fraction, seed)
    page_split = split_of(pages, val_fraction, test_fraction, seed + 1)
    for s in SPLITS:
        for c in CLASSES:
            (out / "cls" / s / c).mkdir(parents=True, exist_ok=True)
        (out / "det" / s).mkdir(parents=True, exist_ok=True)
    counts: dict = {"cls": {s: {c: 0 for c in CLASSES} for s in SPLITS}, "det": {s: 0 for s in SPLITS}}
    for i in range(lines):
        img, rotated = render_line(seed, i, paths)
        cls = CLASSES[1] if rotated else CLASSES[0]
        img.save(out / "cls" / line_split[i] / cls / f"line_{i:06d}.png", optimize=False)
        counts["cls"][line_split[i]][cls] += 1
    boxes = {}
    for i in range(pages):
        img, drawn = render_page(seed, i, paths)
        name = f"{page_split[i]}/page_{i:06d}.png"
        img.save(out / "det" / name, optimize=False)
        boxes[name] = drawn
        counts["det"][page_split[i]] += 1
    (out / "det" / "boxes.json").write_text(json.dumps(boxes, sort_keys=True) + "\n")
    manifest = {
        "seed": seed, "lines": lines, "pages": pages, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "fonts": [p.name for p in paths], "counts": counts,
        "cls": {"size_hw": [LINE_H, LINE_W], "classes": list(CLASSES), "mean": list(CLS_MEAN), "std": list(CLS_STD)},
        "det": {"size_hw": [PAGE, PAGE], "mean": list(DET_MEAN), "std": list(DET_STD)},
        "channels": "grey levels saved as 8-bit greyscale PNG (R = G = B: BGR and RGB tensors are the same)",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (new)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lines", type=int, default=3000, help="classifier text lines (default 3000)")
    p.add_argument("--pages", type=int, default=300, help="detector pages (default 300)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="held-out validation fraction (default 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.15, help="held-out test fraction (default 0.15)")
    args = p.parse_args(argv)
    try:
        manifest = generate(args.out, seed=args.seed, lines=args.lines, pages=args.pages,
                            val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    except DataError as e:
        print(f"ocr_data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
