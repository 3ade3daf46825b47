"""The OCR proof data (benchmarks/ocr_data.py) and metrics (benchmarks/ocr_metrics.py) on the real
models of the rapidocr-onnxruntime wheel: deterministic, disjoint splits, a realistic task for the
original models, and the onnxdns folder source feeding them exactly what rapidocr feeds them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realmodels import model_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ocr_data  # noqa: E402
import ocr_metrics  # noqa: E402


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ocr") / "data"
    ocr_data.generate(out, seed=3, lines=160, pages=8, val_fraction=0.2, test_fraction=0.2)
    return out


def test_generator_is_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        assert ocr_data.main(["--out", str(out), "--seed", str(seed), "--lines", "12", "--pages", "3"]) == 0
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert len(fa) == 12 + 3 + 2  # images, boxes.json, manifest.json
    assert fa != fc
    differing = [k for k in fa if k in fc and fa[k] != fc[k] and k.endswith(".png")]
    assert differing  # another seed draws other images, not only another split


def test_splits_are_disjoint_and_cover_every_sample(data):
    def indices(paths):
        return [int(p.stem.split("_")[1]) for p in paths]

    manifest = json.loads((data / "manifest.json").read_text())
    for kind, n, pattern in (("cls", 160, "*/*.png"), ("det", 8, "*.png")):
        per_split = {s: indices((data / kind / s).glob(pattern)) for s in ocr_data.SPLITS}
        flat = [i for s in ocr_data.SPLITS for i in per_split[s]]
        assert sorted(flat) == list(range(n)), kind  # disjoint (no repeats) and complete
        assert all(per_split[s] for s in ocr_data.SPLITS), kind
    assert {s: len(list((data / "det" / s).glob("*.png"))) for s in ocr_data.SPLITS} == manifest["counts"]["det"]
    for s in ocr_data.SPLITS:  # both directions in every split
        assert all(manifest["counts"]["cls"][s][c] > 0 for c in ocr_data.CLASSES), s
    # the split depends on the seed only, not on the other kind's count
    assert ocr_data.split_of(160, 0.2, 0.2, 3) == ocr_data.split_of(160, 0.2, 0.2, 3)
    assert ocr_data.split_of(160, 0.2, 0.2, 3) != ocr_data.split_of(160, 0.2, 0.2, 4)


def test_images_have_the_model_sizes_in_grey_levels(data):
    line = Image.open(next((data / "cls" / "train" / "180").glob("*.png")))
    page = Image.open(next((data / "det" / "train").glob("*.png")))
    assert (line.mode, line.size) == ("L", (ocr_data.LINE_W, ocr_data.LINE_H))
    assert (page.mode, page.size) == ("L", (ocr_data.PAGE, ocr_data.PAGE))
    assert ocr_data.PAGE % 32 == 0


def test_missing_font_is_one_line_naming_the_debian_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ocr_data, "FONT_DIR", tmp_path / "no-fonts")
    out = tmp_path / "out"
    assert ocr_data.main(["--out", str(out), "--lines", "6", "--pages", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fonts-dejavu-core" in err and err.startswith("ocr_data: error:")
    assert not out.exists()


def test_bad_arguments_and_existing_output_are_refused(tmp_path, capsys, data):
    assert ocr_data.main(["--out", str(tmp_path / "x"), "--val-fraction", "0.6", "--test-fraction", "0.5"]) == 2
    assert not (tmp_path / "x").exists()
    before = _files(data)
    assert ocr_data.main(["--out", str(data), "--lines", "6", "--pages", "3"]) == 2
    assert "already holds a data set" in capsys.readouterr().err
    assert _files(data) == before


def test_original_classifier_reads_the_rendered_lines(data):
    # All 160 lines (every split): the upstream model must find the task easy, as on real crops.
    accuracies = [ocr_metrics.classifier_accuracy(model_path("ocr-cls"), data / "cls" / s) for s in ocr_data.SPLITS]
    correct = sum(a["correct"] for a in accuracies)
    total = sum(a["samples"] for a in accuracies)
    assert total == 160
    assert correct / total >= 0.93, accuracies
    # both directions are read (class folders in the model's label order: swapped, both would fail)
    for c in ocr_data.CLASSES:
        n = sum(a["class_samples"][c] for a in accuracies)
        hits = sum(a["per_class"][c] * a["class_samples"][c] for a in accuracies)
        assert n and hits / n >= 0.85, (c, accuracies)


def test_original_detector_finds_the_drawn_lines(data):
    det = model_path("ocr-det")
    maps = ocr_metrics.detector_maps(det, data / "det" / "train")
    pages = sorted((data / "det" / "train").glob("*.png"))
    assert maps.shape == (len(pages), ocr_data.PAGE, ocr_data.PAGE)
    drawn = json.loads((data / "det" / "boxes.json").read_text())
    found = hit = total = 0
    for prob, page in zip(maps, pages):
        boxes = ocr_metrics.detect_boxes(prob)
        found += len(boxes)
        for x0, y0, x1, y1 in drawn[f"train/{page.name}"]:  # a drawn line holds a detected box's centre
            total += 1
            hit += any(x0 <= (b[0] + b[2]) / 2 <= x1 and y0 <= (b[1] + b[3]) / 2 <= y1 for b in boxes)
    assert total and hit / total >= 0.9, (hit, total)
    assert found >= 0.9 * total
    same = ocr_metrics.detector_fidelity(maps, maps)
    assert same["mean_map_iou"] == 1.0 and same["boxes"]["f1"] == 1.0
    # a map shifted by a text line's height agrees much less: the metrics can fail
    shifted = np.roll(maps, 24, axis=1)
    moved = ocr_metrics.detector_fidelity(shifted, maps)
    assert moved["mean_map_iou"] < 0.5 and moved["boxes"]["f1"] < 0.5


def test_components_are_8_connected_boxes():
    mask = np.zeros((8, 10), bool)
    mask[1, 1:4] = True          # a run ...
    mask[2, 4] = True            # ... joined diagonally
    mask[5:7, 6:9] = True        # a separate block
    mask[0, 9] = True            # a single pixel
    assert sorted(ocr_metrics.components(mask)) == [(1, 1, 5, 3), (6, 5, 9, 7), (9, 0, 10, 1)]
    u = np.zeros((5, 7), bool)   # a U: two columns joined at the bottom are one component
    u[0:5, 1] = u[0:5, 5] = u[4, 1:6] = True
    assert ocr_metrics.components(u) == [(1, 0, 6, 5)]


def test_box_matching_counts_one_to_one():
    ref = [[(0, 0, 10, 10), (20, 0, 30, 10)]]
    cand = [[(0, 0, 10, 9), (1, 0, 10, 10), (50, 50, 60, 60)]]  # two candidates on one reference box
    agreement = ocr_metrics.box_agreement(cand, ref)
    assert (agreement.matched, agreement.candidate_boxes, agreement.reference_boxes) == (1, 3, 2)
    assert agreement.precision == pytest.approx(1 / 3) and agreement.recall == pytest.approx(1 / 2)


def _formula(path: Path, mean: float, std: float) -> np.ndarray:
    """rapidocr's normalisation of an image file at the model size, written out: BGR channels
    (all equal for grey images), ``(x / 255 - mean) / std``, CHW."""
    grey = np.asarray(Image.open(path).convert("L"), np.float32)
    return np.repeat(((grey / 255 - mean) / std)[None], 3, axis=0)


@pytest.mark.parametrize("kind", ["cls", "det"])
def test_folder_source_gives_the_normalised_pixels(data, kind):
    model = model_path("ocr-cls" if kind == "cls" else "ocr-det")
    folder = data / kind / "val"
    source = ocr_metrics.open_folder(folder, model, kind)
    files = source.files
    batch = next(source.batches(len(files)))
    x = next(iter(batch.inputs.values()))
    assert x.dtype == np.float32 and x.shape[0] == len(files) and x.shape[1] == 3
    for k, f in enumerate(files):
        np.testing.assert_allclose(x[k], _formula(f, 0.5, 0.5), rtol=0, atol=1e-6)


def test_folder_source_feeds_what_rapidocr_feeds(data):
    """rapidocr's own preprocessing code (needs OpenCV, which the project venv does not install:
    run in a venv with opencv-python-headless, pyyaml and the wheel's dependencies)."""
    pytest.importorskip("cv2")
    pytest.importorskip("yaml")
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier
    from rapidocr_onnxruntime.ch_ppocr_det.text_detect import TextDetector
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import LoadImage, read_yaml

    config = read_yaml(DEFAULT_CFG_PATH)
    assert config["Cls"]["label_list"] == list(ocr_data.CLASSES)
    assert config["Det"]["thresh"] == ocr_metrics.THRESH and config["Det"]["box_thresh"] == ocr_metrics.BOX_THRESH
    load = LoadImage()
    cls_config = dict(config["Cls"], model_path=str(model_path("ocr-cls")))
    classifier = TextClassifier(cls_config)
    source = ocr_metrics.open_folder(data / "cls" / "test", model_path("ocr-cls"), "cls")
    x = next(source.batches(len(source.files))).inputs["x"]
    for k, f in enumerate(source.files):
        np.testing.assert_allclose(x[k], classifier.resize_norm_img(load(str(f))), rtol=0, atol=1e-6)
    # rapidocr's default limit_side_len (736, limit_type min) would upscale a 480 page; at the page
    # size its resize is the identity and the normalisation is what is compared
    det_config = dict(config["Det"], model_path=str(model_path("ocr-det")), limit_side_len=ocr_data.PAGE)
    detector = TextDetector(det_config)
    source = ocr_metrics.open_folder(data / "det" / "test", model_path("ocr-det"), "det")
    x = next(source.batches(len(source.files))).inputs["x"]
    for k, f in enumerate(source.files):
        img = load(str(f))
        np.testing.assert_allclose(x[k:k + 1], detector.get_preprocess(max(img.shape[:2]))(img), rtol=0, atol=1e-6)


def test_benchmark_counts_macs_at_the_task_size():
    """The files leave height and width open (the classifier's batch is even -1): MACs are
    counted with the input fixed to the task's size, and scale with the page area."""
    import ocr

    cls = ocr.stats(model_path("ocr-cls"), "cls")
    det = ocr.stats(model_path("ocr-det"), "det")
    assert 10e6 < cls["macs"] < 30e6
    assert det["macs_complete"] and det["macs"] > 1e9
    original_page = ocr.SHAPES["det"]
    try:
        ocr.SHAPES["det"] = (3, 2 * ocr_data.PAGE, 2 * ocr_data.PAGE)
        big = ocr.stats(model_path("ocr-det"), "det")
    finally:
        ocr.SHAPES["det"] = original_page
    assert big["macs"] == pytest.approx(4 * det["macs"], rel=0.01)
