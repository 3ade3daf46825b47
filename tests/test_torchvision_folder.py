"""The user's path, small: a torchvision MobileNetV3-Small exported the usual way (eval mode, legacy
exporter, BatchNorm folded) and an image folder written by ``benchmarks/fmnist_folder.py``.

Tested: optimize (exact, validated on the folder), inspect, remove-channels on zeroed channels
through depthwise convolutions, squeeze-and-excitation gates, hardswish and residual adds,
sparse-lowrank calibrated on the folder and fine-tuned on it, DNS from the folder then optimize,
slimming through inserted scales, distillation from a flat folder.

The model is ``benchmarks/results/torchvision_fmnist/mobilenet_v3_small.onnx`` (trained by
``benchmarks/torchvision_fmnist.py`` on a Fashion-MNIST folder; input [N, 3, 32, 32]); one test
exports a fresh one to prove what such an export looks like.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxdns import api, modelio
from onnxdns.data import load_dataset
from onnxdns.sources import model_inputs, open_source
from onnxdns.synthetic import zero_channels
from clikit import run

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks" / "results" / "torchvision_fmnist" / "mobilenet_v3_small.onnx"
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
NORM = ["--mean", MEAN, "--std", STD]
#: Fine-tuning a BN-folded MobileNetV3 with momentum SGD: 0.01 diverges within 6 steps of batch 8
#: (checked: the training graph's gradients match torch's to 2e-6), 0.001 is stable.
LR = "0.001"


def _benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """train: 10 classes x 8 images, val: 10 x 4 (test split), flat: 20 unlabelled images."""
    write = _benchmark("fmnist_folder").write_folder
    root = tmp_path_factory.mktemp("fmnist")
    out = {"train": root / "train", "val": root / "val", "flat": root / "flat"}
    write(out["train"], split="train", limit=8)
    write(out["val"], split="test", limit=4)
    write(out["flat"], split="test", limit=2, flat=True)
    return out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _accuracy(path: Path, folder: Path) -> float:
    sess = _session(path)
    source = open_source(str(folder), model_inputs(str(path)), mean=[float(v) for v in MEAN.split(",")],
                         std=[float(v) for v in STD.split(",")])
    correct = sum(int((sess.run(None, dict(b.inputs))[0].argmax(1) == b.labels).sum()) for b in source.batches(64))
    return correct / len(source)


# --------------------------------------------------------------------------- the folder


def test_folder_is_an_imagefolder_of_rgb_pngs_deterministic(folders, tmp_path):
    from PIL import Image

    ds = load_dataset("fashion-mnist", "train")
    classes = sorted(p.name for p in folders["train"].iterdir())
    assert classes == sorted(c.replace("/", "_") for c in ds.classes)  # "T-shirt/top" -> "T-shirt_top"
    files = sorted(folders["train"].rglob("*.png"))
    assert len(files) == 80 and all(len(list((folders["train"] / c).iterdir())) == 8 for c in classes)
    first = folders["train"] / "Ankle boot" / min(p.name for p in (folders["train"] / "Ankle boot").iterdir())
    index = int(first.stem.split("-")[1])
    assert ds.classes[int(ds.labels[index])] == "Ankle boot"
    with Image.open(first) as im:
        assert im.mode == "RGB" and im.size == (28, 28)
        pixels = np.asarray(im)
    gray = np.rint(np.asarray(ds.images[index, 0]) * 255).astype(np.uint8)
    assert all(np.array_equal(pixels[:, :, c], gray) for c in range(3))
    # deterministic: the same call writes the same bytes
    again = tmp_path / "again"
    _benchmark("fmnist_folder").write_folder(again, split="train", limit=8)
    assert all((again / f.relative_to(folders["train"])).read_bytes() == f.read_bytes() for f in files)
    flat = list(folders["flat"].iterdir())
    assert len(flat) == 20 and all(p.is_file() and p.suffix == ".png" for p in flat)


def test_folder_script_refuses_a_folder_with_files(folders):
    with pytest.raises(SystemExit, match="not empty"):
        _benchmark("fmnist_folder").main(["--out", str(folders["val"]), "--limit", "1"])


def test_onnxdns_reads_the_folder_with_labels_and_imagenet_normalisation(folders):
    source = open_source(str(folders["val"]), model_inputs(str(MODEL)), mean=[0.485, 0.456, 0.406],
                         std=[0.229, 0.224, 0.225])
    assert source.has_labels and source.num_classes == 10 and len(source) == 40
    batch = next(iter(source.batches(40)))
    assert batch.inputs["input"].shape == (40, 3, 32, 32)  # 28x28 resized to the model's 32x32
    assert np.array_equal(np.bincount(batch.labels), np.full(10, 4))
    assert _accuracy(MODEL, folders["val"]) > 0.5  # the committed model is trained, on this layout


# --------------------------------------------------------------------------- the export


@pytest.mark.torch
def test_usual_export_folds_batchnorm_and_matches_torch(tmp_path):
    import torch

    tv = _benchmark("torchvision_fmnist")
    net = tv.build(seed=0).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has something to fold
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tv.export(net, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops
    assert {"HardSwish", "HardSigmoid", "Mul", "Add", "GlobalAveragePool"} <= ops  # SE gates, residual adds
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in model.graph.node)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = _session(path).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


@pytest.mark.torch
@pytest.mark.train
def test_dns_training_graph_of_the_usual_export(tmp_path):
    """The two things that stopped ``onnxdns train --method dns`` on this export: HardSwish and
    HardSigmoid have no gradient in onnxruntime-training 1.19 (training.differentiable), and an
    untrained export shares its equal (zero) biases through Identity nodes (add-masks)."""
    from onnxdns.passes.add_masks import AddMasksPass
    from onnxdns.training import artifacts
    from onnxdns.training.params import select_parameters
    from onnxdns.training.session import TrainingSession

    tv = _benchmark("torchvision_fmnist")
    model = onnx.load(str(tv.export(tv.build(seed=0), tmp_path / "untrained.onnx")))
    assert any(n.op_type == "Identity" for n in model.graph.node)  # the exporter's shared initializers
    masked = AddMasksPass(biases=True).apply(model).model
    params = select_parameters(masked)
    spec = artifacts.ArtifactSpec(
        trainable=tuple(params.trainable), frozen=tuple(params.frozen),
        straight_through={p: m for layer in params.layers for p, m in layer.params}, outputs=("logits",))
    session = TrainingSession(artifacts.generate(masked, tmp_path / "art", spec, batch_size=4), threads=1)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    session.module.train()
    loss = session.module(x, np.arange(4, dtype=np.int64))[0]  # forward and backward
    assert np.isfinite(loss)
    assert all(np.isfinite(session.state.parameters[n].grad).all() for n in params.trainable[:5])


# --------------------------------------------------------------------------- what exists today


def test_optimize_is_exact_on_the_folder_and_inspect_counts_macs(folders, tmp_path, capsys):
    out = tmp_path / "opt.onnx"
    code, stdout, err = run(capsys, "optimize", MODEL, "-o", out, "--data", folders["val"], *NORM)
    assert code == 0, err
    assert "validation: passed" in stdout
    assert _accuracy(out, folders["val"]) == _accuracy(MODEL, folders["val"])
    code, stdout, err = run(capsys, "inspect", out)
    assert code == 0, err
    stats = api.inspect(out)
    assert stats.macs_complete and stats.macs > 0


def test_remove_channels_through_depthwise_se_hardswish_and_residual_adds(folders, tmp_path, capsys):
    """Half the output channels of every prunable layer (not the depthwise ones) zeroed, weights and
    biases, as a structured method leaves a pruned channel: the default pipeline removes them across
    the coupled layers, exactly. (Zeroed weights alone leave hardswish(bias) constants that a padded
    depthwise conv or an SE gate turns non-constant: those channels are rightly kept.)"""
    zeroed, chosen = zero_channels(modelio.load_model(MODEL), 0.5, seed=0)
    inits = {i.name: i for i in zeroed.graph.initializer}
    for node in zeroed.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in chosen and len(node.input) > 2:
            bias = numpy_helper.to_array(inits[node.input[2]]).copy()
            bias[chosen[node.input[1]]] = 0
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias, node.input[2]))
    zeroed_path = modelio.save_model(zeroed, tmp_path / "zeroed.onnx")
    out = tmp_path / "removed.onnx"
    code, stdout, err = run(capsys, "optimize", zeroed_path, "-o", out, "--data", folders["val"], *NORM)
    assert code == 0, err
    assert "validation: passed" in stdout
    before, after = api.inspect(zeroed_path), api.inspect(out)
    assert after.macs < 0.6 * before.macs and after.params < 0.6 * before.params
    def channels(stats):
        return {layer.name: layer.weight_shape[0] for layer in stats.layers if layer.op == "Conv"}

    kept = channels(before)
    removed = {n: c for n, c in channels(after).items() if c < kept.get(n, c)}
    depthwise = [n for n in removed if "block.1.0" in n or "features.1/block/block.0" in n]
    se = [n for n in removed if "/fc1/" in n or "/fc2/" in n]
    assert depthwise and se  # depthwise convs and SE fcs lost channels with their producers


def test_sparse_lowrank_calibrated_on_the_folder(folders, tmp_path, capsys):
    """80 calibration images: the layers that see one row per image (SE fcs, the classifier at 1x1)
    stay dense, so the parameter target is a small one the other layers can reach."""
    out = tmp_path / "slr.onnx"
    code, stdout, err = run(capsys, "optimize", MODEL, "-o", out, "--passes",
                            "fold-constants,sparse-lowrank,remove-dead-nodes", "--calib-data", folders["train"],
                            "--target-compression", "1.04", "--no-speed-check", "--data", folders["val"], *NORM)
    assert code == 0, err
    assert "calibration: train (80 samples)" in stdout
    assert "model parameters 1.04x fewer" in stdout and "not reachable" not in stdout
    before, after = api.inspect(MODEL), api.inspect(out)
    assert before.params / after.params >= 1.04 and after.macs < before.macs
    assert _accuracy(out, folders["val"]) >= _accuracy(MODEL, folders["val"]) - 0.2


# --------------------------------------------------------------------------- with the merge


@pytest.mark.train
def test_dns_from_the_folder_then_optimize(folders, tmp_path, capsys):
    trained, out = tmp_path / "dns.onnx", tmp_path / "dns-opt.onnx"
    code, _, err = run(capsys, "train", MODEL, "-o", trained, "--method", "dns", "--data", folders["train"],
                       "--val-data", folders["val"], "--iterations", "4", "--batch-size", "8", "--lr", LR, *NORM,
                       "--no-progress")
    assert code == 0, err
    code, stdout, err = run(capsys, "optimize", trained, "-o", out, "--data", folders["val"], *NORM)
    assert code == 0, err
    assert api.inspect(out).nonzeros < api.inspect(MODEL).nonzeros
    _session(out).run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})


@pytest.mark.train
def test_slim_through_inserted_scales_from_the_folder(folders, tmp_path, capsys):
    out = tmp_path / "slim.onnx"
    code, _, err = run(capsys, "slim", MODEL, "-o", out, "--data", folders["train"], "--val-data", folders["val"],
                       "--epochs", "0.5", "--finetune-epochs", "0.5", "--batch-size", "8", "--lr", LR, "--prune-ratio", "0.3",
                       *NORM, "--no-progress", "--work-dir", tmp_path / "work")
    assert code == 0, err
    before, after = api.inspect(MODEL), api.inspect(out)
    assert after.macs < before.macs and after.params < before.params
    _session(out).run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})


@pytest.mark.train
def test_sparse_lowrank_fine_tuned_on_the_folder(folders, tmp_path, capsys):
    out = tmp_path / "slr-ft.onnx"
    code, _, err = run(capsys, "optimize", MODEL, "-o", out, "--passes",
                       "fold-constants,sparse-lowrank,remove-dead-nodes", "--calib-data", folders["train"],
                       "--target-compression", "1.04", "--no-speed-check", "--finetune-epochs", "1",
                       "--data", folders["val"], *NORM)
    assert code == 0, err
    assert api.inspect(MODEL).params / api.inspect(out).params >= 1.04


@pytest.mark.train
def test_dns_distilled_from_a_flat_folder(folders, tmp_path, capsys):
    """No labels: the default loss is distillation from the input model."""
    trained = tmp_path / "dns-distill.onnx"
    code, _, err = run(capsys, "train", MODEL, "-o", trained, "--method", "dns", "--data", folders["flat"],
                       "--val-fraction", "0.2", "--iterations", "4", "--batch-size", "8", "--lr", LR, *NORM, "--no-progress")
    assert code == 0, err
    assert api.inspect(trained).nonzeros < api.inspect(MODEL).nonzeros
