"""Training on the user's own model and data: image folders (labelled or not), arrays, data
functions; several inputs and outputs, dynamic dimensions; cross-entropy or distillation from the
input model; exact resume from a folder; every bad input as one line, nothing written."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from clikit import assert_user_error, run
from onnxdns import runtime
from onnxdns.training import artifacts, loop, losses
from onnxdns.training import batchnorm as batchnorm_mod
from onnxdns.workflows import train as api
from onnxdns.training.config import TrainConfig
from onnxdns.training.methods import get_method
from onnxdns.training.params import select_parameters
from onnxdns.training.session import TrainingSession

pytestmark = pytest.mark.train  # every test needs onnxruntime-training (onnxdns[train])

FAST = dict(threads=1, progress=False, momentum=0.0, weight_decay=0.0)


def _export(net: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict | None = None, opset: int = 17, **options) -> Path:
    """``net`` exported the usual way (eval mode, the legacy exporter) at ``opset``, batch dynamic."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), args, buf, dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic or {n: {0: "batch"} for n in inputs + outputs},
                          **options)
    path.write_bytes(buf.getvalue())
    return path


class ConvNet(torch.nn.Module):
    """conv -> ReLU -> global average pool -> linear: any image size; optional feature-map output."""

    def __init__(self, classes: int = 3, with_map: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, classes)
        self.with_map = with_map

    def forward(self, x):
        f = torch.relu(self.conv(x))
        logits = self.fc(f.mean(dim=(2, 3)))
        return (logits, f) if self.with_map else logits


@pytest.fixture(scope="module")
def conv(tmp_path_factory) -> Path:
    return _export(ConvNet(), (torch.zeros(2, 3, 12, 12),), tmp_path_factory.mktemp("m") / "conv.onnx",
                   ["image"], ["logits"])


def _png(path: Path, value: float, size=(12, 12), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(value * 255 + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _flat_folder(folder: Path, n: int = 40, size=(12, 12)) -> Path:
    for i in range(n):
        _png(folder / f"img{i:03d}.png", (i % 7) / 7, size, seed=i)
    return folder


def _class_folder(folder: Path, per_class: int = 24) -> Path:
    for k, name in enumerate(("dark", "mid", "bright")):
        for i in range(per_class):
            _png(folder / name / f"{i:03d}.png", 0.15 + 0.35 * k, seed=100 * k + i)
    return folder


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(f"{out.stem}.ckpt").exists()


# --------------------------------------------------------------------------- losses


def _loss_artifacts(model: onnx.ModelProto, spec: losses.LossSpec, directory: Path, shapes: dict) -> artifacts.Artifacts:
    """Training artifacts of ``model`` with the loss of ``spec`` (plain training, default settings)."""
    config = TrainConfig(method="none")
    params = select_parameters(model)
    options = get_method(config).artifact_options(params)
    return artifacts.generate(model, directory, api.artifact_spec(config, params, model, options, spec),
                              input_shapes=shapes)


def test_distill_loss_is_kl_with_temperature_plus_mse(tmp_path):
    """The eval model's loss on a batch == KL(softmax(t/T) || softmax(s/T)) * T^2 of the logits +
    MSE of the feature map, student and teacher being different networks."""
    student = _export(ConvNet(with_map=True, seed=1), (torch.zeros(2, 3, 8, 8),), tmp_path / "s.onnx",
                      ["image"], ["logits", "map"])
    teacher = _export(ConvNet(with_map=True, seed=2), (torch.zeros(2, 3, 8, 8),), tmp_path / "t.onnx",
                      ["image"], ["logits", "map"])
    model = onnx.load(str(student))
    spec = losses.choose(model, loss=None, loss_outputs=None, has_labels=False, temperature=3.0)
    assert spec.kind == "distill" and spec.outputs == ("logits", "map") and spec.classifier == (True, False)
    art = _loss_artifacts(model, spec, tmp_path / "art", {"image": (4, 3, 8, 8)})
    assert art.inputs == ("image", "teacher.logits", "teacher.map")
    session = TrainingSession(art, threads=1)
    x = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)  # eval: another batch size
    t_logits, t_map = runtime.run(onnx.load(str(teacher)), {"image": x})
    out = session.eval_step([x, t_logits, t_map])
    s_logits, s_map = out[1], out[2]
    expected = losses.kl_numpy(s_logits, t_logits, 3.0) + float(np.mean((s_map.astype(np.float64) - t_map) ** 2))
    assert float(out[0]) == pytest.approx(expected, rel=1e-4)
    assert float(out[0]) > 1e-3


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_distill_on_softmax_outputs_compares_the_logits(tmp_path, scale):
    """A classifier exported with its softmax (the PP-OCR direction classifier): distillation
    compares the student's logits (the Softmax's input) with the log of the teacher's
    probabilities (softmax(log p / T) == softmax(z / T)), so the loss equals the KL of the
    networks' logits, also when the student is so confident (scale 1000) that its probabilities
    underflow to 0 and their log would be flat. A softmax of probabilities would be near-uniform at
    any temperature and teach almost nothing."""
    net = _SoftmaxNet(seed=1)
    with torch.no_grad():
        net.fc.weight *= scale
        net.fc.bias *= scale
    student = _export(net, (torch.zeros(2, 3, 8, 8),), tmp_path / "s.onnx", ["image"], ["probs"])
    teacher_net = _SoftmaxNet(seed=2)
    model = onnx.load(str(student))
    spec = losses.choose(model, loss="distill", loss_outputs=None, has_labels=True, temperature=4.0)
    art = _loss_artifacts(model, spec, tmp_path / "art", {"image": (4, 3, 8, 8)})
    session = TrainingSession(art, threads=1)
    x = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        t_logits = ConvNet.forward(teacher_net, torch.from_numpy(x)).numpy()
        s_logits = ConvNet.forward(net, torch.from_numpy(x)).numpy()
    if scale > 1:  # some of the student's probabilities underflow
        assert np.exp(s_logits - s_logits.max(1, keepdims=True)).min() < 1e-30
    t_probs = np.exp(t_logits - t_logits.max(1, keepdims=True))
    t_probs = (t_probs / t_probs.sum(1, keepdims=True)).astype(np.float32)
    out = session.eval_step([x, t_probs])
    assert float(out[0]) == pytest.approx(losses.kl_numpy(s_logits, t_logits, 4.0), rel=1e-3)
    assert float(out[0]) > 5 * losses.kl_numpy(out[1], t_probs, 4.0)  # what the loss was before


def test_two_input_int64_model_distills_from_npz(tmp_path):
    """Inputs float features + int64 token ids, no labels: distillation; the loss falls."""

    class TwoInputs(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = torch.nn.Embedding(10, 8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x, ids):
            return self.fc(x + self.emb(ids).mean(dim=1))

    args = (torch.zeros(2, 8), torch.zeros(2, 5, dtype=torch.int64))
    student = _export(TwoInputs(1), args, tmp_path / "student.onnx", ["x", "ids"], ["logits"])
    teacher = _export(TwoInputs(2), args, tmp_path / "teacher.onnx", ["x", "ids"], ["logits"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(256, 8)).astype(np.float32),
             ids=rng.integers(0, 10, (256, 5)).astype(np.int64))
    r = api.train(student, tmp_path / "out.onnx", teacher=teacher, data=str(tmp_path / "data.npz"), method="none",
                  epochs=4, batch_size=16, lr=0.5, **FAST)
    assert r.loss == "distill" and r.loss_outputs == ("logits",) and r.final_accuracy is None
    assert r.val_split == "validation" and r.history[0].val_split == "validation"
    losses_ = [h.train_loss for h in r.history]
    assert losses_[-1] < 0.5 * losses_[0]
    assert r.history[-1].val_loss < r.history[0].val_loss
    assert set(r.final_metrics) == {"agreement/logits", "rel_l2/logits", "cosine/logits"}
    assert r.history[-1].metrics["rel_l2/logits"] < r.history[0].metrics["rel_l2/logits"]


# --------------------------------------------------------------------------- folders


def test_flat_folder_distills_by_default(conv, tmp_path, capsys):
    """A flat folder has no labels: distillation from the input model, fidelity reported."""
    folder = _flat_folder(tmp_path / "imgs")
    out = tmp_path / "out.onnx"
    code, stdout, err = run(capsys, "train", conv, "-o", out, "--data", folder, "--method", "magnitude",
                            "--iterations", "12", "--batch-size", "6", "--lr", "0.05", "--sparsity", "0.5",
                            "--threads", "1", "--no-progress")
    assert code == 0, err
    assert out.exists()
    assert "loss: distill on logits; val: held-out validation data" in stdout
    assert "agreement/logits" in stdout and "cosine/logits" in stdout and "val acc" not in stdout


def test_class_folders_train_with_labels(conv, tmp_path):
    folder = _class_folder(tmp_path / "classes")
    r = api.train(conv, tmp_path / "out.onnx", data=str(folder), method="none", epochs=8, batch_size=8, lr=0.2,
                  val_fraction=0.25, **{**FAST, "momentum": 0.9})
    assert r.loss == "ce" and r.history[-1].train_accuracy is not None
    assert r.final_accuracy == r.final_metrics["accuracy"] and r.final_accuracy >= 0.8  # 18 held-out images
    assert not any(k.startswith("agreement") for k in r.final_metrics)  # ce: the teacher does not run


def test_dynamic_height_width_model_from_folder(tmp_path):
    """A conv model with open H and W: the training model is fixed to the first batch's shape,
    the eval and output models keep the open dimensions."""
    model = _export(ConvNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "dyn.onnx", ["image"], ["logits"],
                    dynamic={"image": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}})
    folder = _flat_folder(tmp_path / "imgs", n=30, size=(20, 14))  # width 20, height 14
    r = api.train(model, tmp_path / "out.onnx", data=str(folder), method="dns", iterations=6, batch_size=4, lr=0.01,
                  **FAST)
    training = onnx.load(str(r.checkpoint_dir / api.ARTIFACTS_DIR / artifacts.TRAINING_MODEL))
    dims = [d.dim_value for d in training.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 3, 14, 20]
    out = onnx.load(str(r.output))
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][2:] == ["h", "w"]
    assert runtime.run(out, {"image": np.zeros((1, 3, 30, 9), np.float32)})[0].shape == (1, 3)


def test_two_outputs_distill_one_picked(tmp_path, capsys):
    model = _export(ConvNet(with_map=True), (torch.zeros(2, 3, 12, 12),), tmp_path / "two.onnx", ["image"],
                    ["logits", "map"])
    folder = _flat_folder(tmp_path / "imgs", n=20)
    code, stdout, err = run(capsys, "train", model, "-o", tmp_path / "out.onnx", "--data", folder, "--method", "dns",
                            "--iterations", "4", "--batch-size", "4", "--loss-output", "map", "--threads", "1",
                            "--no-progress")
    assert code == 0, err
    assert "loss: distill on map" in stdout and "cosine/map" in stdout and "logits" not in stdout.split("loss:")[0]
    r = api.train(model, tmp_path / "out2.onnx", data=str(folder), method="none", iterations=2, batch_size=4,
                  **FAST)
    assert r.loss_outputs == ("logits", "map")  # default: every float output
    assert {"agreement/logits", "rel_l2/map", "cosine/map"} <= set(r.final_metrics)


def test_callable_source(conv, tmp_path):
    """file.py:function: its batches as they come (6 of 5 images; the smaller last one dropped)."""
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for k in range(7):\n"
        "        n = 5 if k < 6 else 2\n"
        "        yield {'image': rng.random((n, 3, 12, 12), dtype=np.float32), 'labels': np.arange(n) % 3}\n")
    spec = f"{tmp_path / 'loader.py'}:batches"
    with pytest.raises(api.OnnxdnsError, match="cannot hold out a validation fraction"):
        api.train(conv, tmp_path / "bad.onnx", data=spec, method="none", iterations=2, **FAST)
    r = api.train(conv, tmp_path / "out.onnx", data=spec, val_data=spec, method="none", epochs=2, lr=0.1, **FAST)
    assert r.steps == 12 and [h.step for h in r.history] == [6, 12] and r.loss == "ce"
    assert r.final_accuracy is not None


# --------------------------------------------------------------------------- resume


def test_resume_from_folder_is_exact(conv, tmp_path, monkeypatch):
    """Interrupted in the middle of an epoch (step 5 of 9) and resumed == straight through."""
    folder = _flat_folder(tmp_path / "imgs", n=40)
    run_opts = dict(data=str(folder), method="dns", iterations=14, batch_size=4, lr=0.05, dns_c="0.3", seed=2,
                    threads=1, progress=False)
    straight = api.train(conv, tmp_path / "straight.onnx", **run_opts)
    assert [h.step for h in straight.history] == [9, 14]

    original = loop.Trainer._train_step

    def step(self, batch):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", step)
    part = api.train(conv, tmp_path / "resumed.onnx", **run_opts)
    assert part.interrupted and part.steps == 5
    monkeypatch.undo()

    from onnxdns.sources.images import ImageFolderSource
    reads = []
    read = ImageFolderSource._read
    monkeypatch.setattr(ImageFolderSource, "_read", lambda self, idx: reads.append(self.name) or read(self, idx))
    resumed = api.train(resume=part.checkpoint_dir, threads=1, progress=False)
    monkeypatch.undo()
    # the resumed epoch starts at its 6th batch without decoding batches 0-4 again: the first batch
    # (it fixes the shapes) + 4 left of epoch 0 + 5 of epoch 1
    assert sum(name.endswith("(train part)") for name in reads) == 1 + 4 + 5
    a, b = _weights(straight.output), _weights(resumed.output)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [(h.step, h.train_loss, h.metrics) for h in straight.history] == \
           [(h.step, h.train_loss, h.metrics) for h in resumed.history]


# --------------------------------------------------------------------------- bad input


def _base(model, out):
    return ["train", model, "-o", out, "--iterations", "2", "--batch-size", "4", "--threads", "1", "--no-progress"]


def test_bad_input_is_one_line_and_writes_nothing(conv, tmp_path, capsys):
    flat = _flat_folder(tmp_path / "flat", n=12)
    out = tmp_path / "out.onnx"

    def fails(fragment, *extra):
        code, _, err = run(capsys, *_base(conv, out), *extra)
        assert_user_error(code, err, fragment)
        _nothing_written(tmp_path, out)

    fails("--loss ce needs labels", "--data", flat, "--loss", "ce")
    fails("--loss-output nope: the model has no such output", "--data", flat, "--loss-output", "nope")
    (tmp_path / "empty").mkdir()
    fails("no images", "--data", tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"not a png")
    fails("not a readable image", "--data", tmp_path / "corrupt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "labels.npz", image=rng.random((12, 3, 12, 12), dtype=np.float32),
             labels=np.full(12, 7, np.int64))
    fails("label 7 out of range 0..2", "--data", tmp_path / "labels.npz")
    np.savez(tmp_path / "names.npz", pixels=rng.random((12, 3, 12, 12), dtype=np.float32))
    fails("named image", "--data", tmp_path / "names.npz")
    np.savez(tmp_path / "shape.npz", image=rng.random((12, 3, 10, 12), dtype=np.float32))
    fails("has shape [12, 3, 10, 12]", "--data", tmp_path / "shape.npz")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    fails("cannot import", "--data", f"{tmp_path / 'broken.py'}:batches", "--val-data", flat)
    (tmp_path / "raises.py").write_text("def batches():\n    raise ValueError('no data today')\n")
    fails("no data today", "--data", f"{tmp_path / 'raises.py'}:batches", "--val-data", flat)
    fails("no such file or folder", "--data", tmp_path / "missing")

    dyn = _export(ConvNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "dyn.onnx", ["image"], ["logits"],
                  dynamic={"image": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}})
    mixed = _flat_folder(tmp_path / "mixed", n=6)
    _png(mixed / "other.png", 0.5, size=(20, 14))
    code, _, err = run(capsys, *_base(dyn, out), "--data", mixed)
    assert_user_error(code, err, "images of different sizes")
    _nothing_written(tmp_path, out)


def test_model_without_float_output_is_an_error(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("ArgMax", ["y"], ["cls"], axis=1)],
        "argmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("cls", TensorProto.INT64, ["batch", 1])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    model = tmp_path / "argmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    np.save(tmp_path / "x.npy", np.ones((12, 4), np.float32))
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, *_base(model, out), "--data", tmp_path / "x.npy")
    assert_user_error(code, err, "distillation needs a float model output")
    _nothing_written(tmp_path, out)


def test_slim_from_unlabelled_folder(tmp_path, capsys):
    """``onnxdns slim`` on a BatchNorm model with a flat folder: both training stages distill
    from the input model, the output is written and validated."""
    from onnxdns.testing import export_module
    from onnxdns import modelio

    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
            self.fc = torch.nn.Linear(8, 3)
            with torch.no_grad():
                for bn in (self.features[1], self.features[4]):
                    bn.weight.uniform_(0.0, 1.0)

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))

    src = tmp_path / "bn.onnx"
    modelio.save_model(export_module(BN(), (3, 12, 12)), src)
    folder = _flat_folder(tmp_path / "imgs", n=40)
    out = tmp_path / "slim.onnx"
    code, stdout, err = run(capsys, "slim", src, "-o", out, "--data", folder, "--epochs", "1", "--batch-size", "8",
                            "--slim-lambda", "0.01", "--prune-ratio", "0.25", "--round-to", "1", "--threads", "1", "--no-progress")
    assert code == 0, err
    assert out.exists()
    import json
    for stage in ("sparse", "finetune"):
        run_file = json.loads((tmp_path / "slim.slim" / f"{stage}.ckpt" / api.RUN_FILE).read_text())
        assert run_file["config"]["data"] == str(folder) and run_file["config"]["loss"] is None


def test_source_object_and_batch_shape_change(tmp_path):
    """``data=`` a Source object (recorded by name; needed again on resume); a data function whose
    batches change shape stops with one line naming the input, nothing at the output path."""
    from onnxdns.errors import OnnxdnsError
    from onnxdns.sources import model_inputs, open_source

    model = _export(ConvNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "dyn.onnx", ["image"], ["logits"],
                    dynamic={"image": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", image=rng.random((20, 3, 12, 12), dtype=np.float32))
    source = open_source(tmp_path / "d.npz", model_inputs(model))
    r = api.train(model, tmp_path / "a.onnx", data=source, method="none", iterations=3, batch_size=4, **FAST)
    assert r.output.exists() and r.loss == "distill"
    run_file = (r.checkpoint_dir / api.RUN_FILE).read_text()
    assert f'"{api.SOURCE_PREFIX}d.npz"' in run_file

    (tmp_path / "sizes.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for k in range(4):\n"
        "        yield {'image': np.zeros((2, 3, 12 + 2 * (k == 2), 12), np.float32)}\n")
    out = tmp_path / "b.onnx"
    with pytest.raises(OnnxdnsError, match=r"input image shape \[2, 3, 14, 12\]; the training model was built for "
                                           r"the first batch's \[2, 3, 12, 12\]"):
        api.train(model, out, data=f"{tmp_path / 'sizes.py'}:batches", val_data=str(tmp_path / "d.npz"),
                  method="none", iterations=4, **FAST)
    assert not out.exists()


def test_builtin_data_keep_their_order_and_reshape(tmp_path):
    """mnist through the source interface: the subset, the epoch order and the test subset are the
    ones the array loop used (seeded subset, then ``default_rng([seed, epoch])`` permutations), and
    a model taking [N, 784] gets the images reshaped."""
    from onnx import TensorProto, helper

    from onnxdns.data import load_dataset, subset

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(np.zeros((784, 10), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    config = TrainConfig(data="mnist", subset=640, test_subset=300, seed=3, batch_size=64)
    data = api.open_data(config, model)
    assert data.val_split == "test" and data.steps_per_epoch == 10
    old_train = subset(load_dataset("mnist", "train"), 640, 3)
    old_test = subset(load_dataset("mnist", "test"), 300, 3)
    for epoch in (0, 1):
        rows = np.random.default_rng([3, epoch]).permutation(640)[64:128]  # the old loop's batch 1
        batch = next(data.train.batches(64, seed=3, epoch=epoch, start=1))
        np.testing.assert_array_equal(batch.inputs["x"], old_train.images[rows].reshape(64, 784))
        np.testing.assert_array_equal(batch.labels, old_train.labels[rows])
    val = next(data.val.batches(1000))
    np.testing.assert_array_equal(val.inputs["x"], old_test.images.reshape(300, 784))
    r = api.train(onnx_file(model, tmp_path / "mlp.onnx"), tmp_path / "out.onnx", data="mnist", subset=640,
                  test_subset=300, iterations=3, method="none", **FAST)
    assert r.val_split == "test" and r.final_accuracy is not None and r.loss == "ce"


def onnx_file(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_fidelity_metrics():
    """Agreement, relative L2 error and cosine similarity against numpy's definitions; a zero
    output has cosine 0 with a non-zero teacher (1 only when both are zero)."""
    spec = losses.LossSpec("distill", ("logits", "map"), (True, False))
    rng = np.random.default_rng(0)
    s = {"logits": rng.normal(size=(6, 4)), "map": rng.normal(size=(6, 2, 3))}
    t = {"logits": s["logits"] + rng.normal(scale=0.5, size=(6, 4)), "map": np.zeros((6, 2, 3))}
    t["map"][:3] = rng.normal(size=(3, 2, 3))
    s["map"][3:] = 0.0
    m = loop.Metrics(spec)
    m.add_fidelity({k: v[:4] for k, v in s.items()}, {k: v[:4] for k, v in t.items()})
    m.add_fidelity({k: v[4:] for k, v in s.items()}, {k: v[4:] for k, v in t.items()})
    values = m.values()
    assert values["agreement/logits"] == pytest.approx(np.mean(s["logits"].argmax(1) == t["logits"].argmax(1)))
    assert values["rel_l2/logits"] == pytest.approx(np.linalg.norm(s["logits"] - t["logits"]) / np.linalg.norm(t["logits"]))
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(s["map"][:3].reshape(3, -1),
                                                                             t["map"][:3].reshape(3, -1))]
    assert values["cosine/map"] == pytest.approx((sum(cos) + 3 * 1.0) / 6)  # rows 3-5: both zero
    assert "agreement/map" not in values and "accuracy" not in values
    m = loop.Metrics(spec)
    m.add_fidelity({"logits": np.zeros((2, 4)), "map": np.zeros((2, 2, 3))},
                   {"logits": np.ones((2, 4)), "map": np.ones((2, 2, 3))})
    assert m.values()["cosine/logits"] == 0.0 and m.values()["rel_l2/map"] == 1.0


class _SoftmaxNet(ConvNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)


def test_ce_on_opset_11_softmax_output(tmp_path):
    """An opset-11 classifier whose output is already a softmax (the PP-OCR direction classifier):
    ``ce`` builds with opset-11 ops (SoftmaxCrossEntropyLoss is opset 12) and takes the LogSoftmax
    of the Softmax's input (a second softmax would starve the gradient of wrong predictions); it learns."""
    model = _export(_SoftmaxNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "softmax11.onnx",
                    ["image"], ["probs"], opset=11)
    folder = _class_folder(tmp_path / "classes")
    r = api.train(model, tmp_path / "out.onnx", data=str(folder), method="none", epochs=8, batch_size=8, lr=0.2,
                  val_fraction=0.25, **{**FAST, "momentum": 0.9})
    assert r.loss == "ce" and r.final_accuracy >= 0.8
    first, last = r.history[0].train_loss, r.history[-1].train_loss
    assert last < first


def test_adamw_from_the_cli_learns_and_is_stored_for_resume(conv, tmp_path, capsys):
    """``onnxdns train --optimizer adamw``: the run learns (its loss halves; the update itself is
    checked against torch in test_training_artifacts), the checkpoint's run settings and artifacts
    say adamw (a resume continues with it), a bad name is exit 2."""

    folder = _class_folder(tmp_path / "classes")
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "train", str(conv), "-o", str(out), "--method", "none", "--data", str(folder),
                       "--optimizer", "adamw", "--lr", "0.05", "--epochs", "6", "--batch-size", "8",
                       "--val-fraction", "0.25", "--threads", "1", "--no-progress")
    assert code == 0, err
    ckpt = tmp_path / "out.ckpt"
    assert json.loads((ckpt / "run.json").read_text())["config"]["optimizer"] == "adamw"
    assert artifacts.Artifacts.load(ckpt / "artifacts").optimizer == "adamw"
    history = json.loads((ckpt / "state" / "trainer.json").read_text())["history"]
    assert len(history) == 6 and history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    code, _, err = run(capsys, "train", str(conv), "-o", str(tmp_path / "x.onnx"), "--optimizer", "adam")
    assert code == 2 and "invalid choice: 'adam'" in err and not (tmp_path / "x.onnx").exists()


class _ThreeLayers(torch.nn.Module):
    """conv -> ReLU -> conv -> ReLU -> mean -> linear; ``scale`` a > 0 moves a factor a from conv2
    to conv1 (ReLU is positively homogeneous): the same function, gradients on other scales."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 3)
        with torch.no_grad():
            self.conv1.weight *= scale
            self.conv1.bias *= scale
            self.conv2.weight /= scale

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_training_warns_when_one_learning_rate_cannot_serve_the_layers(tmp_path, caplog, scale):
    """The same network twice, once with a factor 1e-3 moved between its convs (what folding a
    BatchNorm with small variances does): only that one warns, after its first SGD step, and names
    conv1; AdamW runs do not check."""
    model = _export(_ThreeLayers(scale), (torch.zeros(2, 3, 8, 8),), tmp_path / "m.onnx", ["x"], ["y"])
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.random((16, 3, 8, 8), dtype=np.float32), labels=rng.integers(0, 3, 16))
    with caplog.at_level(logging.WARNING, logger="onnxdns.training.loop"):
        api.train(model, tmp_path / "out.onnx", method="none", data=str(data), iterations=2, batch_size=8, lr=0.01,
                  val_fraction=0.5, threads=1, progress=False)
    warned = [r.getMessage() for r in caplog.records if "one SGD learning rate" in r.getMessage()]
    assert len(warned) == (1 if scale != 1.0 else 0)
    if warned:
        assert "conv1.weight" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxdns.training.loop"):
        api.train(model, tmp_path / "adamw.onnx", method="none", data=str(data), iterations=2, batch_size=8, lr=1e-3,
                  optimizer="adamw", val_fraction=0.5, threads=1, progress=False)
    assert not [r for r in caplog.records if "one SGD learning rate" in r.getMessage()]


class _HardSigmoidNet(ConvNet):
    def forward(self, x):
        f = torch.nn.functional.hardsigmoid(self.conv(x))  # ONNX HardSigmoid: no gradient in onnxruntime 1.19
        return self.fc(f.mean(dim=(2, 3)))


def test_hardsigmoid_model_trains(tmp_path):
    """MobileNetV3-style models (PP-OCR) use HardSigmoid, which onnxruntime-training 1.19 has no
    gradient for: training rewrites it as Clip(alpha * x + beta, 0, 1) (the same values) and learns.
    At opset 11 (the PP-OCR classifier), where Clip's gradient needs opset 12's LessOrEqual, the
    training model is converted to opset 12."""
    model = _export(_HardSigmoidNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "hs.onnx",
                    ["image"], ["logits"], opset=11)
    assert any(n.op_type == "HardSigmoid" for n in onnx.load(str(model)).graph.node)
    folder = _class_folder(tmp_path / "classes")
    r = api.train(model, tmp_path / "out.onnx", data=str(folder), method="none", epochs=2, batch_size=8, lr=0.1,
                  val_fraction=0.25, **FAST)
    assert r.steps > 0 and r.history[-1].train_loss < r.history[0].train_loss * 2
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert any(n.op_type == "HardSigmoid" for n in out.graph.node)  # rewritten for the gradient only


class _BatchNormNet(ConvNet):
    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(6)
        self.bn.running_mean.uniform_(-0.1, 0.1)  # distinct values: exported as initializers of their own
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        f = torch.nn.functional.hardsigmoid(self.bn(self.conv(x)))
        return self.fc(f.mean(dim=(2, 3)))


def test_opset_11_batchnorm_trains_in_training_mode(tmp_path):
    """BatchNorm in training mode (slim's default) needs opset 14's training_mode: an opset-11 model
    with BatchNorm (the PP-OCR classifier) is converted to opset 14 instead of refused, and its
    running statistics are written back."""
    model = _export(_BatchNormNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "bn11.onnx",
                    ["image"], ["logits"], opset=11, do_constant_folding=False)
    folder = _class_folder(tmp_path / "classes")
    before = _weights(model)
    r = api.train(model, tmp_path / "out.onnx", data=str(folder), method="none", batchnorm="train", epochs=1,
                  batch_size=8, lr=0.05, val_fraction=0.25, **FAST)
    assert r.steps > 0
    after = _weights(tmp_path / "out.onnx")
    mean = next(n for n in before if n.endswith("running_mean"))  # written back from the batch statistics
    assert not np.allclose(before[mean], after[mean])


class _UpsampleNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        return torch.sigmoid(self.up(torch.relu(self.conv(x))))


def test_stride_equal_kernel_conv_transpose_distills(tmp_path):
    """onnxruntime 1.19 has no CPU kernel for ConvTransposeGrad: a ConvTranspose whose kernel equals
    its stride (the PP-OCR detector's head) trains as a 1x1 Conv and a pixel shuffle (same values);
    a map model with dynamic height and width distills from an unlabelled folder."""
    model = _export(_UpsampleNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "up.onnx", ["image"], ["map"],
                    dynamic={"image": {0: "b", 2: "h", 3: "w"}, "map": {0: "b", 2: "h2", 3: "w2"}})
    folder = _flat_folder(tmp_path / "pages", n=16, size=(12, 8))
    out = tmp_path / "out.onnx"
    r = api.train(model, out, data=str(folder), method="none", iterations=3, batch_size=4, lr=0.01, val_fraction=0.25,
                  **FAST)
    assert r.loss == "distill" and r.steps == 3
    x = np.random.default_rng(0).random((1, 3, 8, 12), dtype=np.float32)
    got = runtime.run(str(out), {"image": x})[0]
    want = runtime.run(str(model), {"image": x})[0]
    assert got.shape == want.shape == (1, 2, 16, 24) and np.abs(got - want).max() < 0.05
    # the trained model has its ConvTranspose back (the rewrite is for the gradient only)
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("ConvTranspose") == 1
    from onnxdns.training.gradops import expand_for_gradients

    rewritten = expand_for_gradients(onnx.load(str(model)))
    assert not any(n.op_type == "ConvTranspose" for n in rewritten.graph.node)
    assert np.abs(runtime.run(rewritten, {"image": x})[0] - want).max() < 1e-6  # the same values


class _NearestNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(torch.nn.functional.interpolate(self.conv(x), scale_factor=2, mode="nearest"))


def test_nearest_integer_resize_distills(tmp_path):
    """onnxruntime 1.19 has no CPU kernel for ResizeGrad: nearest Resize by integer scales (the
    PP-OCR detector's FPN) trains as Reshape + Expand + Reshape (the same values)."""
    from onnxdns.training.gradops import expand_for_gradients

    model = _export(_NearestNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "near.onnx", ["image"], ["map"],
                    dynamic={"image": {0: "b", 2: "h", 3: "w"}, "map": {0: "b", 2: "h2", 3: "w2"}})
    assert any(n.op_type == "Resize" for n in onnx.load(str(model)).graph.node)
    x = np.random.default_rng(0).random((1, 3, 8, 12), dtype=np.float32)
    want = runtime.run(str(model), {"image": x})[0]
    rewritten = expand_for_gradients(onnx.load(str(model)))
    assert not any(n.op_type == "Resize" for n in rewritten.graph.node)
    assert np.array_equal(runtime.run(rewritten, {"image": x})[0], want)
    folder = _flat_folder(tmp_path / "pages", n=16, size=(12, 8))
    r = api.train(model, tmp_path / "out.onnx", data=str(folder), method="none", iterations=3, batch_size=4, lr=0.01,
                  val_fraction=0.25, **FAST)
    assert r.loss == "distill" and r.steps == 3
    trained = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in trained.graph.node].count("Resize") == 1 and not any(
        n.op_type == "Expand" for n in trained.graph.node)


def test_softmax_output_found_through_reshape():
    """Converting an opset-11 Softmax to opset 13+ wraps it in Flatten / Reshape (the PP-OCR classifier
    trained with BatchNorm in training mode): ce still finds the Softmax, and takes its input as the logits."""
    from onnx import helper

    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Softmax", ["f"], ["p"], axis=1),
             helper.make_node("Reshape", ["p", "shape"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [])
    chain = losses._softmax_chain(graph, "y")
    assert [n.op_type for n in chain] == ["Softmax", "Reshape", "Identity"] and losses._softmax_chain(graph, "f") is None


def test_frozen_batchnorm_normalises_with_stored_statistics(tmp_path):
    """batchnorm='frozen' (the default outside slim): onnxruntime-training 1.19 would turn an
    inference-mode BatchNormalization into its training kernel (batch statistics) in the training
    graph; the frozen BN trains as x * s + t from the stored statistics instead, so a student equal
    to its teacher has zero distillation loss, and gamma / beta still learn."""
    from onnx import helper

    model = _export(_BatchNormNet(), (torch.zeros(2, 3, 12, 12),), tmp_path / "bn17.onnx",
                    ["image"], ["logits"], do_constant_folding=False)
    folder = _flat_folder(tmp_path / "pages", n=16)
    r = api.train(model, tmp_path / "same.onnx", data=str(folder), method="none", iterations=1, batch_size=4, lr=1e-9,
                  val_fraction=0.25, **FAST)
    assert r.loss == "distill" and r.history[-1].train_loss < 1e-10
    # the same with every weight and statistic in a Constant node (paddle2onnx: the PP-OCR detector)
    proto = onnx.load(str(model))
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = consts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(tmp_path / "bn17_constants.onnx"))
    r = api.train(tmp_path / "bn17_constants.onnx", tmp_path / "same2.onnx", data=str(folder), method="none",
                  iterations=1, batch_size=4, lr=1e-9, val_fraction=0.25, **FAST)
    assert r.history[-1].train_loss < 1e-10
    r = api.train(model, tmp_path / "out.onnx", data=str(_class_folder(tmp_path / "classes")), method="none",
                  iterations=3, batch_size=4, lr=0.5, val_fraction=0.25, **FAST)
    gamma = next(n for n in _weights(model) if n.endswith("bn.weight"))
    assert not np.allclose(_weights(model)[gamma], _weights(tmp_path / "out.onnx")[gamma])
    # the stored statistics are constants of the training graph, never trained
    from onnxdns.training.params import select_parameters as _select

    affine = batchnorm_mod.to_frozen_affine(onnx.load(str(model)))
    trainable = set(_select(affine).trainable)
    assert gamma in trainable and not any(".mean" in n or ".std" in n for n in trainable)
    # the trained model has its BatchNormalization back (the optimize pipeline folds it)
    bn_nodes = [n for n in onnx.load(str(tmp_path / "out.onnx")).graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_nodes) == 1
    x = np.random.default_rng(0).random((2, 3, 12, 12), dtype=np.float32)
    same = runtime.run(str(tmp_path / "same.onnx"), {"image": x})[0]
    assert np.abs(same - runtime.run(str(model), {"image": x})[0]).max() < 1e-5
