"""Network Slimming training: the gamma penalty in the onnxruntime-training graph, BatchNorm in
training mode with running statistics written back, and the slim pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from onnxdns import cli, modelio, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.workflows.slim import slim
from onnxdns.testing import export_module
from onnxdns.training import artifacts, batchnorm
from onnxdns.workflows import train as api
from onnxdns.training.config import TrainConfig
from onnxdns.training.methods import get_method
from onnxdns.training.params import select_parameters
from onnxdns.training.session import TrainingSession
from onnxdns.training.slim import penalty

pytestmark = pytest.mark.train  # every test needs onnxruntime-training (onnxdns[train])


class SmallBN(nn.Module):
    """conv-BN-ReLU, pool, conv-BN-ReLU, global pool, linear: 28x28 inputs, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _net(seed: int = 0) -> SmallBN:
    torch.manual_seed(seed)
    net = SmallBN()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
                m.weight[0] = 0.0  # sign(0) = 0: no penalty gradient
                m.bias.uniform_(-0.2, 0.2)
    return net


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)


@pytest.mark.parametrize("smooth", [None, 0.05])
def test_gamma_gradient_matches_torch(tmp_path, smooth):
    """One plain SGD step (lr 1, no momentum, no decay) of the slim training graph moves every
    parameter by the gradient torch computes for CE + lambda * sum P(gamma), BatchNorm in training
    mode (each BN has one zero gamma: torch's |x| sub-gradient there is 0, so is onnxruntime's);
    the reported loss includes the penalty."""
    net = _net()
    lam = 0.05
    model = batchnorm.to_training_mode(export_module(net, (1, 28, 28)))
    config = TrainConfig(method="slim", slim_lambda=lam, smooth_l1=smooth, momentum=0.0, weight_decay=0.0)
    params = select_parameters(model)
    assert len(params.scales) == 2 and all(s.endswith(".weight") for s in params.scales)
    options = get_method(config).artifact_options(params)
    art = artifacts.generate(model, tmp_path, api.artifact_spec(config, params, model, options), batch_size=8)
    session = TrainingSession(art, threads=1)
    before = {k: v.copy() for k, v in session.parameters().items()}  # .data aliases the live state
    x, y = _batch()
    outputs = session.train_step([x, y], 1.0)

    net.train()
    logits = net(torch.from_numpy(x))
    gammas = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if smooth is None:
        reg = sum(g.abs().sum() for g in gammas)
    else:
        reg = sum((torch.sqrt(g * g + smooth ** 2) - smooth).sum() for g in gammas)
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(y)) + lam * reg
    loss.backward()
    np.testing.assert_allclose(float(outputs[0]), loss.item(), rtol=1e-5)
    assert float(outputs[0]) - nn.functional.cross_entropy(logits, torch.from_numpy(y)).item() == pytest.approx(
        penalty([before[s] for s in params.scales], lam, smooth), rel=1e-4)
    torch_grads = dict(net.named_parameters())
    for name in params.trainable:
        grad = before[name] - session.get(name)
        np.testing.assert_allclose(grad, torch_grads[name].grad.numpy(), rtol=1e-3, atol=2e-6, err_msg=name)


def test_running_statistics_written_back_and_output_in_inference_mode(tmp_path):
    """Through ``train``: BatchNorm trains with batch statistics, its running mean (and the
    biased running variance) follows torch's update over the same batches, and the output model
    runs BatchNorm in inference mode with those statistics."""
    from onnxdns.data import load_dataset, subset

    net = _net(1)
    src = tmp_path / "small.onnx"
    modelio.save_model(export_module(net, (1, 28, 28)), src)
    result = api.train(src, tmp_path / "out.onnx", method="slim", slim_lambda=1e-3, data="fashion-mnist",
                       iterations=3, batch_size=16, subset=64, test_subset=100, lr=1e-9, momentum=0.0,
                       weight_decay=0.0, seed=5, threads=1, progress=False)
    out = onnx.load(str(result.output))
    bns = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert bns and all(len(n.output) == 1 for n in bns) and not batchnorm.has_training_mode(out)

    train_ds = subset(load_dataset("fashion-mnist", "train"), 64, 5)
    order = np.random.default_rng([5, 0]).permutation(64)  # the loop's data order of epoch 0 (seed 5)
    bn_modules = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net.train()
    for step in range(3):  # lr 1e-9: the weights stay put, only the running statistics move
        rows = order[step * 16:(step + 1) * 16]
        with torch.no_grad():
            net(torch.from_numpy(np.asarray(train_ds.images[rows], np.float32)))
    inits = _inits(out)
    for i, m in enumerate(bn_modules):
        node = bns[i]
        np.testing.assert_allclose(inits[node.input[3]], m.running_mean.numpy(), rtol=1e-4, atol=1e-6)
        assert not np.allclose(inits[node.input[3]], 0.0)
        # onnxruntime updates with the biased batch variance, torch with the unbiased one
        assert np.all(np.abs(inits[node.input[4]] / m.running_var.numpy() - 1) < 0.05)
    x = np.asarray(train_ds.images[:4], np.float32)
    net.eval()
    np.testing.assert_allclose(runtime.run(out, {"input": x})[0], net(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-3, atol=2e-3)


def test_batchnorm_modes_round_trip():
    model = export_module(_net(), (1, 28, 28))
    trained = batchnorm.to_training_mode(model)
    assert batchnorm.has_training_mode(trained) and not batchnorm.has_training_mode(model)
    assert len(select_parameters(trained).writeback) == 4
    back = batchnorm.to_inference_mode(trained)
    feeds = runtime.input_feeds(model, batch=3)
    np.testing.assert_array_equal(runtime.run(model, feeds)[0], runtime.run(back, feeds)[0])
    old = onnx.helper.make_model(model.graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    with pytest.raises(OnnxdnsError, match="opset >= 14"):
        batchnorm.to_training_mode(old)


def test_slim_needs_batchnorm_scales(tmp_path):
    from onnxdns.models import export_model

    src = export_model("lenet-300-100", tmp_path / "lenet.onnx")
    with pytest.raises(OnnxdnsError, match="BatchNormalization"):
        api.train(src, tmp_path / "o.onnx", method="slim", iterations=1, subset=64, progress=False)
    with pytest.raises(OnnxdnsError, match="batchnorm mode"):
        api.train(src, tmp_path / "o.onnx", method="none", batchnorm="eval", iterations=1, progress=False)


class Residual(nn.Module):
    """Stem conv-BN-ReLU, two residual blocks sharing the stem's channels, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)) for _ in range(2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_slim_pipeline_and_cli(tmp_path, capsys):
    """``onnxdns slim`` on a small residual net: four stages, fewer channels with the residual
    adds still consistent, validated output; a second run reuses every stage, a new prune ratio
    reuses the sparsity training only."""
    torch.manual_seed(0)
    src = tmp_path / "res.onnx"
    modelio.save_model(export_module(Residual(), (1, 28, 28)), src)
    out = tmp_path / "res-slim.onnx"
    argv = ["slim", str(src), "-o", str(out), "--data", "fashion-mnist", "--slim-lambda", "0.02", "--epochs", "2",
            "--finetune-epochs", "1", "--subset", "256", "--batch-size", "32", "--prune-ratio", "0.5",
            "--round-to", "4", "--threads", "1", "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "sparse" in text and "finetune" in text and "MACs" in text
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "res-slim.slim" / "stages").glob("*.json")}
    assert set(records) == {"sparse", "prune", "finetune"}
    model = onnx.load(str(out))
    inits = _inits(model)
    widths = [inits[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"]
    assert widths[0] == widths[2] == widths[4] < 16  # stem and both block outputs: one residual group
    assert all(w % 4 == 0 for w in widths)
    assert records["finetune"]["result"]["accuracy"] is not None

    result = slim(src, out, slim_lambda=0.02, epochs=2, finetune_epochs=1, subset=256, batch_size=32, prune_ratio=0.5,
                  round_to=4, threads=1, progress=False, evaluate=False, validate=False)
    assert [s.reused for s in result.stages] == [True, True, True, False]
    result = slim(src, out, slim_lambda=0.02, epochs=2, finetune_epochs=1, subset=256, batch_size=32, prune_ratio=0.3,
                  round_to=4, threads=1, progress=False, evaluate=False, validate=False)
    assert [s.reused for s in result.stages] == [True, False, False, False]
    assert result.optimize.validation.status == "structure-only"


def test_train_subcommand_runs_slim(tmp_path, capsys):
    src = tmp_path / "small.onnx"
    modelio.save_model(export_module(_net(), (1, 28, 28)), src)
    code = cli.main(["train", str(src), "-o", str(tmp_path / "t.onnx"), "--method", "slim", "--slim-lambda", "1e-3",
                     "--smooth-l1", "--data", "fashion-mnist", "--iterations", "4", "--subset", "128",
                     "--test-subset", "100", "--threads", "1", "--no-progress"])
    assert code == 0
    assert "BatchNorm |gamma|" in capsys.readouterr().out
    run = json.loads((tmp_path / "t.ckpt" / "run.json").read_text())
    assert run["config"]["smooth_l1"] == pytest.approx(1e-3) and run["config"]["method"] == "slim"
