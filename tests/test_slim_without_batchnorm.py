"""Network Slimming of models whose BatchNorm an eval-mode export folded: inserted channel scales
are trained with the L1 penalty, pruned and folded back (``onnxdns slim`` end to end)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from onnxdns import cli, modelio, runtime
from onnxdns.passes.insert_channel_scales import is_scale_name
from onnxdns.stats import model_stats
from onnxdns.testing import export_folded
from onnxdns.training.config import TrainConfig
from onnxdns.training.methods import get_method
from onnxdns.training.params import select_parameters

pytestmark = pytest.mark.train  # onnxruntime-training (onnxdns[train]) and torch


class FoldedNet(nn.Module):
    """conv-BN-ReLU, pool, conv-BN-ReLU, residual conv-BN, global pool, linear (BN folded on export)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.mid = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.stem(x))
        x = torch.relu(x + self.res(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _folded(seed: int = 0) -> onnx.ModelProto:
    torch.manual_seed(seed)
    net = FoldedNet()
    with torch.no_grad():  # statistics a trained net would have, so the folded weights differ from the raw ones
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    model = export_folded(net, (1, 28, 28))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    return model


def _conv_widths(model: onnx.ModelProto) -> list[int]:
    inits = {i.name: i for i in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"]


def test_slim_method_trains_the_inserted_scales():
    """``--method slim`` on a BN-folded model: every conv not pinned gets a trainable scale, and the
    penalty takes exactly those (one conv output feeds the residual Add with another)."""
    prepared = get_method(TrainConfig(method="slim")).prepare(_folded())
    params = select_parameters(prepared)
    assert params.scales and all(is_scale_name(s) for s in params.scales)
    assert len(params.scales) == 3 and set(params.scales) <= set(params.trainable)
    feeds = runtime.input_feeds(prepared, batch=2)
    np.testing.assert_array_equal(runtime.run(prepared, feeds)[0], runtime.run(_folded(), feeds)[0])


def test_slim_cli_prunes_a_model_without_batchnorm(tmp_path, capsys):
    """``onnxdns slim`` on fashion-mnist: sparsity training on the inserted scales, prune, fold,
    fine-tune, optimize; the output has fewer conv channels and MACs, no scale Mul, and runs."""
    src = tmp_path / "folded.onnx"
    modelio.save_model(_folded(), src)
    out = tmp_path / "folded-slim.onnx"
    argv = ["slim", str(src), "-o", str(out), "--data", "fashion-mnist", "--slim-lambda", "0.02", "--epochs", "1",
            "--finetune-epochs", "1", "--subset", "256", "--batch-size", "32", "--prune-ratio", "0.5",
            "--round-to", "4", "--threads", "1", "--no-progress", "--no-evaluate"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "prunable channels removed" in printed

    work = tmp_path / "folded-slim.slim"
    sparse = onnx.load(str(work / "sparse.onnx"))
    assert sum(1 for i in sparse.graph.initializer if is_scale_name(i.name)) == 3
    for path in (work / "pruned.onnx", work / "finetuned.onnx", out):
        model = onnx.load(str(path))
        assert not any(is_scale_name(i.name) for i in model.graph.initializer), path
        assert not any(n.op_type == "Mul" for n in model.graph.node), path
    record = json.loads((work / "stages" / "prune.json").read_text())
    assert record["result"]["details"]["prunable_scale_channels"] == 16 + 24 + 24

    before, after = onnx.load(str(src)), onnx.load(str(out))
    widths_before, widths_after = _conv_widths(before), _conv_widths(after)
    assert sum(widths_after) < sum(widths_before)
    assert widths_after[1] == widths_after[2]  # the residual Add's two inputs stay one group
    assert model_stats(after).macs < model_stats(before).macs
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    logits = runtime.run(after, {after.graph.input[0].name: x})[0]
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


class ScaledNet(nn.Module):
    """conv1-ReLU, pool, conv2-ReLU, global pool, linear; ``scaled`` multiplies each conv output by a
    per-channel parameter (what insert-channel-scales adds to the exported graph)."""

    def __init__(self, scaled: bool) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 10)
        self.s1 = nn.Parameter(torch.ones(1, 4, 1, 1)) if scaled else None
        self.s2 = nn.Parameter(torch.ones(1, 6, 1, 1)) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        a = nn.functional.max_pool2d(torch.relu(a * self.s1 if self.s1 is not None else a), 2)
        b = self.conv2(a)
        b = torch.relu(b * self.s2 if self.s2 is not None else b)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(b, 1), 1))


def test_scale_gradient_matches_torch(tmp_path):
    """One plain SGD step (lr 1) of the slim training graph of a BN-free export moves every
    parameter, the inserted scales included, by the gradient torch computes for
    CE + lambda * sum |scale| on the same net with explicit scales (all 1: sign 1)."""
    from onnxdns.training import artifacts
    from onnxdns.workflows import train as api
    from onnxdns.training.session import TrainingSession

    torch.manual_seed(0)
    plain = ScaledNet(scaled=False)
    lam = 0.05
    config = TrainConfig(method="slim", slim_lambda=lam, momentum=0.0, weight_decay=0.0)
    method = get_method(config)
    model = method.prepare(export_folded(plain, (1, 28, 28)))
    params = select_parameters(model)
    assert len(params.scales) == 2
    art = artifacts.generate(model, tmp_path, api.artifact_spec(config, params, model, method.artifact_options(params)),
                             batch_size=8)
    session = TrainingSession(art, threads=1)
    before = {k: v.copy() for k, v in session.parameters().items()}
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8).astype(np.int64)
    outputs = session.train_step([x, y], 1.0)

    net = ScaledNet(scaled=True)
    net.load_state_dict(plain.state_dict(), strict=False)
    logits = net(torch.from_numpy(x))
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(y)) + lam * (net.s1.abs().sum() + net.s2.abs().sum())
    loss.backward()
    np.testing.assert_allclose(float(outputs[0]), loss.item(), rtol=1e-5)
    grads = {name: p.grad.numpy() for name, p in net.named_parameters()}
    grads[params.scales[0]], grads[params.scales[1]] = grads.pop("s1"), grads.pop("s2")
    assert set(grads) == set(params.trainable)
    for name in params.trainable:
        np.testing.assert_allclose(before[name] - session.get(name), grads[name], rtol=1e-3, atol=2e-6, err_msg=name)
