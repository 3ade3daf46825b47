"""One data interface (onnxdns.sources): folders of images, .npz/.npy arrays, a user's function,
the built-in data sets; deterministic order and validation split; bounded memory; the CLI's
--data and --calib-data on a small conv model built here (no torch)."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxdns import sources
from onnxdns.cli import main
from onnxdns.errors import OnnxdnsError
from onnxdns.lowrank import calibration
from onnxdns.sources import ModelInput, model_inputs, open_source
from onnxdns.validate import compare
from clikit import assert_user_error, run

RNG = np.random.default_rng(0)
FAST = {"repeats": 1, "warmup": 0, "latency_batches": (1,)}


def conv_model(size: int | str = 16, channels: int = 3, nhwc: bool = False, classes: int = 4) -> onnx.ModelProto:
    """images [N, C, S, S] (or [N, S, S, C]) -> Conv C->8 -> Relu -> Conv 8->16 -> Relu -> GAP -> Gemm -> logits."""
    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)

    x = "images"
    nodes = []
    if nhwc:
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c1"], ["r1"]),
              helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c2"], ["r2"]),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1)]
    inits = [init("w1", 8, channels, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16),
             init("fc", classes, 16), init("fcb", classes)]
    shape = ["N", size, size, channels] if nhwc else ["N", channels, size, size]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_image(path: Path, value, size=(16, 16), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def class_folder(root: Path, per_class: int = 3, classes=("cat", "dog")) -> Path:
    for k, name in enumerate(classes):
        for i in range(per_class):
            ext = "png" if i % 2 == 0 else "jpg"
            write_image(root / name / f"{i}.{ext}", (40 * k + i, 100, 200))
    return root


def indexed_folder(root: Path, n: int, size=(16, 16)) -> Path:
    """Flat folder of grey PNGs whose pixel value is their index (file order = index order)."""
    for i in range(n):
        write_image(root / f"{i:04d}.png", i, size, mode="L")
    return root


def ids(batches) -> list[int]:
    return [int(round(v)) for b in batches for v in b.inputs["images"][:, 0, 0, 0] * 255]


def inputs_of(model: onnx.ModelProto) -> list[ModelInput]:
    return model_inputs(model)


# --------------------------------------------------------------------------- folders of images


def test_class_subfolders_give_labels_and_nchw_rgb_values(tmp_path):
    src = open_source(class_folder(tmp_path / "data"), inputs_of(conv_model()))
    assert src.has_labels and src.num_classes == 2 and len(src) == 6 and src.classes == ("cat", "dog")
    batches = list(src.batches(4))
    assert [len(b) for b in batches] == [4, 2]
    x = batches[0].inputs["images"]
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), [0, 0, 0, 1, 1, 1])
    # cat/0.png is (0, 100, 200) exactly (PNG is lossless)
    np.testing.assert_allclose(x[0, :, 5, 5], np.array([0, 100, 200]) / 255, atol=1e-6)
    norm = open_source(tmp_path / "data", inputs_of(conv_model()), mean=(0.5,), std=(0.25, 0.5, 1.0))
    y = next(norm.batches(1)).inputs["images"]
    np.testing.assert_allclose(y[0, :, 5, 5], (np.array([0, 100, 200]) / 255 - 0.5) / [0.25, 0.5, 1.0], atol=1e-5)


def test_flat_folder_is_unlabelled_and_fits_an_nhwc_grey_model(tmp_path):
    folder = indexed_folder(tmp_path / "flat", 5)
    src = open_source(folder, inputs_of(conv_model(channels=1, nhwc=True)))
    batch = next(src.batches(8))
    assert not src.has_labels and batch.labels is None
    assert batch.inputs["images"].shape == (5, 16, 16, 1)
    np.testing.assert_allclose(batch.inputs["images"][:, 3, 3, 0] * 255, range(5), atol=1e-4)
    rgb_into_grey = open_source(class_folder(tmp_path / "rgb"), inputs_of(conv_model(channels=1)))
    assert next(rgb_into_grey.batches(2)).inputs["images"].shape == (2, 1, 16, 16)


def test_mixed_sizes_are_resized_and_center_cropped(tmp_path):
    folder = tmp_path / "mixed"
    im = Image.new("RGB", (32, 16), (255, 0, 0))  # left half red, right half blue
    im.paste((0, 0, 255), (16, 0, 32, 16))
    im.save(folder.mkdir() or folder / "wide.png")
    write_image(folder / "small.png", (0, 255, 0), size=(8, 8))
    x = next(open_source(folder, inputs_of(conv_model())).batches(2)).inputs["images"]
    assert x.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(x[0, :, 4, 4], [0, 1, 0], atol=1e-6)  # small.png, upscaled
    np.testing.assert_allclose(x[1, :, 8, 1], [1, 0, 0], atol=1e-6)  # wide.png: the centre crop keeps 8..24
    np.testing.assert_allclose(x[1, :, 8, 14], [0, 0, 1], atol=1e-6)
    with pytest.raises(OnnxdnsError, match="images of different sizes .* fixes no size"):
        open_source(folder, inputs_of(conv_model(size="S")))
    same = indexed_folder(tmp_path / "same", 2, size=(24, 20))
    assert next(open_source(same, inputs_of(conv_model(size="S"))).batches(2)).inputs["images"].shape == (2, 3, 20, 24)


def test_bad_folders_are_one_line_errors(tmp_path):
    inputs = inputs_of(conv_model())
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(OnnxdnsError, match="empty: no images"):
        open_source(tmp_path / "empty", inputs)
    folder = indexed_folder(tmp_path / "corrupt", 3)
    (folder / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(OnnxdnsError, match=r"0001.png: not a readable image"):
        open_source(folder, inputs)
    both = indexed_folder(tmp_path / "both", 2)
    write_image(both / "cls" / "a.png", 3)
    with pytest.raises(OnnxdnsError, match="both images and class subfolders"):
        open_source(both, inputs)
    with pytest.raises(OnnxdnsError, match="not a float image input"):
        open_source(folder, [ModelInput("ids", np.dtype(np.int64), ("N", 7))])
    with pytest.raises(OnnxdnsError, match="--std needs 1 or 3 values"):
        open_source(class_folder(tmp_path / "c"), inputs, std=(1, 2))


def test_order_is_a_function_of_seed_and_epoch_and_the_split_is_deterministic(tmp_path):
    src = open_source(indexed_folder(tmp_path / "f", 20), inputs_of(conv_model(channels=1)))
    assert ids(src.batches(6)) == list(range(20))
    first = ids(src.batches(6, seed=3, epoch=0))
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert ids(src.batches(7, seed=3, epoch=0)) == first  # the order does not depend on the batch size
    assert ids(src.batches(6, seed=3, epoch=1)) != first
    assert ids(src.batches(6, seed=4, epoch=0)) != first
    train, val = src.split(0.25, seed=1)
    t, v = ids(train.batches(20)), ids(val.batches(20))
    assert len(v) == 5 and len(t) == 15 and not set(t) & set(v) and sorted(t + v) == list(range(20))
    train2, val2 = src.split(0.25, seed=1)
    assert ids(val2.batches(20)) == v and ids(train2.batches(4, seed=9)) == ids(train.batches(4, seed=9))
    assert ids(src.split(0.25, seed=2)[1].batches(20)) != v
    with pytest.raises(OnnxdnsError, match="too few"):
        src.split(0.01)


def test_a_folder_is_read_one_batch_at_a_time(tmp_path):
    n, batch = 96, 4
    src = open_source(indexed_folder(tmp_path / "big", n, size=(32, 32)), inputs_of(conv_model(size=32)))
    whole = n * 3 * 32 * 32 * 4  # every image decoded, float32
    tracemalloc.start()
    try:
        count = sum(len(b) for b in src.batches(batch))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and src.peak_decoded == batch
    assert peak < whole / 4, (peak, whole)


# --------------------------------------------------------------------------- arrays, functions, data sets


def test_npz_with_and_without_labels_and_npy(tmp_path):
    inputs = inputs_of(conv_model())
    x = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None, None], (10, 3, 16, 16))
    np.savez(tmp_path / "l.npz", images=x, labels=np.arange(10) % 4)
    src = open_source(tmp_path / "l.npz", inputs)
    assert isinstance(src.arrays["images"], np.memmap) and src.has_labels and len(src) == 10
    got = list(src.batches(4, seed=0))
    index = np.concatenate([b.inputs["images"][:, 0, 0, 0] for b in got]).astype(int)
    assert sorted(index) == list(range(10)) and list(index) != list(range(10))
    np.testing.assert_array_equal(np.concatenate([b.labels for b in got]), index % 4)
    np.savez_compressed(tmp_path / "c.npz", images=x.astype(np.float64))  # compressed: read whole, cast
    batch = next(open_source(tmp_path / "c.npz", inputs).batches(10))
    assert batch.labels is None and batch.inputs["images"].dtype == np.float32
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(next(open_source(tmp_path / "x.npy", inputs).batches(10)).inputs["images"], x)


def test_npz_split_keeps_labels_with_their_samples_and_a_function_cannot_be_split(tmp_path):
    x = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None, None], (12, 3, 16, 16))
    np.savez(tmp_path / "l.npz", images=x, labels=np.arange(12) % 4)
    train, val = open_source(tmp_path / "l.npz", inputs_of(conv_model())).split(0.25, seed=0)
    for part, n in ((train, 9), (val, 3)):
        batch = next(part.batches(12, seed=5))
        index = batch.inputs["images"][:, 0, 0, 0].astype(int)
        assert len(index) == n and list(batch.labels) == list(index % 4)
    path = write_loader(tmp_path, LOADER)
    with pytest.raises(OnnxdnsError, match="give --val-data"):
        open_source(f"{path}:batches", inputs_of(conv_model())).split(0.2)


def test_an_input_named_labels_is_an_input(tmp_path):
    model = [ModelInput("labels", np.dtype(np.int64), ("N", 3))]
    np.savez(tmp_path / "a.npz", labels=np.zeros((5, 3), np.int64))
    src = open_source(tmp_path / "a.npz", model)
    assert not src.has_labels and next(src.batches(5)).inputs["labels"].shape == (5, 3)


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 3, 16, 16), np.float32)}, "named images; missing images; unknown image"),
    ({"images": np.zeros((2, 3, 8, 16), np.float32)}, "shape [2, 3, 8, 16]"),
    ({"images": np.array([["a"] * 16] * 2)}, "is <U1"),
    ({"images": np.zeros((2, 3, 16, 16), np.float32), "labels": np.array([0, -1])}, "label -1 out of range"),
    ({"images": np.zeros((2, 3, 16, 16), np.float32), "labels": np.zeros(3, np.int64)}, "one per sample (2)"),
])
def test_arrays_that_do_not_fit_the_model(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(OnnxdnsError, match=None) as e:
        open_source(tmp_path / "a.npz", inputs_of(conv_model()))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_npz_saved_with_pickle_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(OnnxdnsError, match="p.npz: cannot read inputs"):
        open_source(tmp_path / "p.npz", inputs_of(conv_model()))


def write_loader(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "loader.py"
    path.write_text("import numpy as np\n\n" + body)
    return path


LOADER = """
def batches():
    rng = np.random.default_rng(1)
    for k in range(3):
        yield {"images": rng.random((4, 3, 16, 16), dtype=np.float32), "labels": np.arange(4) % 4}
"""


def test_a_function_of_the_user_gives_batches(tmp_path):
    path = write_loader(tmp_path, LOADER)
    src = open_source(f"{path}:batches", inputs_of(conv_model()))
    got = list(src.batches(2))
    assert src.has_labels and len(got) == 3 and got[0].inputs["images"].shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(got[1].inputs["images"], list(src.batches(2))[1].inputs["images"])
    assert sources.is_source_spec(f"{path}:batches") and not sources.is_source_spec("mnist")


@pytest.mark.parametrize("body, spec, message", [
    (LOADER, "{path}:missing", "has no function missing"),
    ("raise RuntimeError('no disk')\n", "{path}:batches", "cannot import"),
    ("def batches():\n    raise ValueError('bad file')\n", "{path}:batches", "raised ValueError: bad file"),
    ("def batches():\n    yield {'images': np.zeros((2, 3, 16, 16), np.float32)}\n    raise KeyError('x')\n",
     "{path}:batches", "raised KeyError at batch 1"),
    ("def batches():\n    return [{'pixels': np.zeros((2, 3, 16, 16), np.float32)}]\n", "{path}:batches",
     "named images; missing images; unknown pixels"),
    ("def batches():\n    return []\n", "{path}:batches", "returned no batches"),
    (LOADER, "no_such_module_xyz:batches", "cannot import no_such_module_xyz"),
])
def test_a_function_that_fails(tmp_path, body, spec, message):
    path = write_loader(tmp_path, body)
    with pytest.raises(OnnxdnsError) as e:
        list(open_source(spec.format(path=path), inputs_of(conv_model())).batches(2))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_builtin_dataset_source_matches_the_loader():
    from onnxdns.data import load_dataset

    mnist_model = conv_model(size=28, channels=1)
    src = open_source("mnist", inputs_of(mnist_model), split="test")
    batch = next(src.batches(5))
    ds = load_dataset("mnist", "test")
    np.testing.assert_array_equal(batch.inputs["images"], ds.images[:5])
    np.testing.assert_array_equal(batch.labels, ds.labels[:5])
    with pytest.raises(OnnxdnsError, match=r"gives \[N,1,28,28\] float images"):
        open_source("mnist", inputs_of(conv_model()))


# --------------------------------------------------------------------------- validate, calibration, CLI


def test_compare_on_a_folder_counts_accuracy(tmp_path):
    model = conv_model()
    cmp = compare(model, model, data=str(class_folder(tmp_path / "d")), batch=4, **FAST)
    assert cmp.data == "d" and cmp.samples == 6 and cmp.max_abs_diff == 0
    assert cmp.accuracy_a is not None and cmp.accuracy_a == cmp.accuracy_b
    cmp = compare(model, model, data=str(class_folder(tmp_path / "d")), batch=4, samples=5, **FAST)
    assert cmp.samples == 5


def test_labels_beyond_the_model_outputs_are_an_error(tmp_path):
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 3, 16, 16), np.float32), labels=np.array([0, 1, 7]))
    with pytest.raises(OnnxdnsError, match="label 7 out of range 0..3"):
        compare(conv_model(), conv_model(), data=str(tmp_path / "l.npz"), **FAST)


def test_calibration_reads_a_folder(tmp_path):
    model = conv_model()
    specs = calibration.input_specs(model)
    inputs, origin = calibration.calibration_inputs(str(indexed_folder(tmp_path / "f", 12)), specs, 8, seed=0)
    assert inputs.arrays["images"].shape == (8, 3, 16, 16) and origin == "f (8 samples)"
    again, _ = calibration.calibration_inputs(str(tmp_path / "f"), specs, 8, seed=0)
    np.testing.assert_array_equal(inputs.arrays["images"], again.arrays["images"])




def test_cli_validate_and_optimize_on_user_data(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), src)
    folder = class_folder(tmp_path / "photos")
    code, out, err = run(capsys, "validate", src, src, "--data", folder, "--repeats", "2", "--batch", "4",
                         "--mean", "0.5", "--std", "0.25")
    assert code == 0, err
    assert "photos, 6 samples" in out and "accuracy" in out
    npz = tmp_path / "val.npz"
    np.savez(npz, images=RNG.standard_normal((6, 3, 16, 16)).astype(np.float32), labels=np.arange(6) % 4)
    code, out, err = run(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--data", npz)
    assert code == 0, err
    assert "val.npz, 6 samples" in out and "validation: passed" in out
    code, out, err = run(capsys, "optimize", src, "-o", tmp_path / "o2.onnx", "--data", folder)
    assert code == 0, err
    assert "photos, 6 samples" in out


def test_cli_calibrates_sparse_lowrank_on_a_folder(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(conv_model(), src)
    folder = indexed_folder(tmp_path / "calib", 24)
    code, stdout, err = run(capsys, "optimize", src, "-o", out, "--passes", "sparse-lowrank", "--calib-data", folder,
                            "--calib-samples", "16", "--target-compression", "1.5", "--no-speed-check",
                            "--no-validate")
    assert code == 0, err
    assert "calibration: calib (16 samples)" in stdout and out.exists()


def test_cli_bad_data_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(conv_model(), src)
    corrupt = indexed_folder(tmp_path / "corrupt", 2)
    (corrupt / "0000.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    loader = write_loader(tmp_path, "def batches():\n    raise OSError('gone')\n")
    cut = indexed_folder(tmp_path / "cut", 3, size=(64, 64))
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(cut / "0002.png")
    (cut / "0002.png").write_bytes((cut / "0002.png").read_bytes()[:2000])  # the header reads, the pixels do not
    cases = [
        (("optimize", src, "-o", out, "--data", corrupt), "0000.png: not a readable image"),
        (("optimize", src, "-o", out, "--data", tmp_path / "empty"), "empty: no images"),
        (("optimize", src, "-o", out, "--data", cut), "0002.png: cannot decode the image"),
        (("optimize", src, "-o", out, "--data", f"{loader}:batches"), "raised OSError: gone"),
        (("optimize", src, "-o", out, "--data", "no_such_module_xyz:load"), "cannot import no_such_module_xyz"),
        (("optimize", src, "-o", out, "--passes", "sparse-lowrank", "--calib-data", corrupt), "not a readable image"),
        (("optimize", src, "-o", out, "--data", "mnist", "--mean", "0.5"), "--mean and --std normalise"),
        (("validate", src, src, "--data", corrupt), "not a readable image"),
        (("validate", src, src, "--data", "cifar"), "a folder of images, FILE.npy, module:function or FILE.npz"),
    ]
    for args, fragment in cases:
        code, _, err = run(capsys, *args)
        assert_user_error(code, err, fragment)
        assert not out.exists()


def test_an_image_whose_pixels_are_cut_off_stops_the_run_naming_it(tmp_path):
    folder = tmp_path / "cut"
    Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(write_image(folder / "a.png", 0))
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "b.png")
    raw = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(raw[:len(raw) // 2])  # the header reads, the pixels do not
    src = open_source(folder, inputs_of(conv_model()))
    with pytest.raises(OnnxdnsError, match=r"b.png: cannot decode the image"):
        list(src.batches(2))


def test_inputs_with_samples_on_axis_1_are_cut_and_timed_on_that_axis(tmp_path):
    """A [seq, batch, d] input: --samples and the latency batches count samples on axis 1."""
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = write_loader(tmp_path, "def batches():\n    yield {'x': np.ones((5, 4, 3), np.float32)}\n")
    cmp = compare(model, model, data=f"{path}:batches", samples=3, repeats=1, warmup=0, latency_batches=(1, 6))
    assert cmp.samples == 3 and [r.batch for r in cmp.latency] == [1, 6]
