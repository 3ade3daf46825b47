"""The training loop: exact resume after Ctrl-C, per-epoch checkpoints, BatchNorm write-back."""

from __future__ import annotations

import io
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from onnxdns.errors import OnnxdnsError
from onnxdns.models import export_model
from onnxdns.sources import model_inputs, open_source
from onnxdns.training import artifacts, loop, losses
from onnxdns.workflows import train as api
from onnxdns.training.optim import LRSchedule
from onnxdns.training.params import select_parameters
from onnxdns.training.session import TrainingSession

pytestmark = pytest.mark.train  # every test needs onnxruntime-training (onnxdns[train])

RUN = dict(method="dns", iterations=25, subset=640, test_subset=500, lr=0.05, dns_c="0.5", dns_phases="fc:20",
           schedule="cosine", seed=3, threads=2, progress=False)


@pytest.fixture(scope="module")
def lenet300(tmp_path_factory) -> Path:
    return export_model("lenet-300-100", tmp_path_factory.mktemp("model") / "lenet300.onnx")


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _interrupt_at(monkeypatch, step: int) -> None:
    """Press Ctrl-C (a real SIGINT to this process) during optimizer step ``step``."""
    original = loop.Trainer._train_step

    def train_step(self, batch):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", train_step)


def test_interrupt_and_resume_is_exact(lenet300, tmp_path, monkeypatch):
    """25 steps straight == 13 steps + Ctrl-C + resume + 12 steps: same weights, masks, history."""
    straight = api.train(lenet300, tmp_path / "straight.onnx", **RUN)
    assert straight.steps == 25 and not straight.interrupted
    assert [r.step for r in straight.history] == [10, 20, 25]  # 640 // 64 = 10 steps per epoch, last one partial

    _interrupt_at(monkeypatch, 12)
    part = api.train(lenet300, tmp_path / "resumed.onnx", **RUN)
    assert part.interrupted and part.steps == 13 and part.output is None
    assert not (tmp_path / "resumed.onnx").exists()
    assert part.checkpoint_dir == tmp_path / "resumed.ckpt"
    monkeypatch.undo()

    with pytest.raises(OnnxdnsError, match="lr=0.1 differs from the checkpoint's 0.05"):
        api.train(resume=part.checkpoint_dir, lr=0.1, progress=False)
    resumed = api.train(resume=part.checkpoint_dir, progress=False, threads=2)
    assert resumed.steps == 25 and resumed.output == tmp_path / "resumed.onnx"

    a, b = _weights(straight.output), _weights(resumed.output)
    assert a.keys() == b.keys() and any(k.endswith("__mask") for k in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [(r.step, r.test_accuracy, r.train_loss, r.density) for r in straight.history] == \
           [(r.step, r.test_accuracy, r.train_loss, r.density) for r in resumed.history]
    assert straight.method_summary["surgery"] == resumed.method_summary["surgery"]


def test_checkpoint_each_epoch_and_contents(lenet300, tmp_path):
    result = api.train(lenet300, tmp_path / "out.onnx", checkpoint_dir=tmp_path / "ck", **{**RUN, "iterations": 20})
    ort_ckpt, state_file = loop.checkpoint_paths(tmp_path / "ck")
    state = json.loads(state_file.read_text())
    assert state["step"] == 20 and len(state["history"]) == 2
    assert set(state["hooks"][0]) == {"rng", "stats", "counts"}  # DNS: random generator, thresholds, counters
    run = json.loads((tmp_path / "ck" / api.RUN_FILE).read_text())
    assert run["config"]["lr"] == 0.05 and run["config"]["method"] == "dns"
    assert result.output is not None and ort_ckpt.stat().st_size > 0
    with pytest.raises(OnnxdnsError, match="already holds a training run"):
        api.train(lenet300, tmp_path / "other.onnx", checkpoint_dir=tmp_path / "ck", **RUN)


def test_batchnorm_running_statistics_written_back(tmp_path):
    """A training-mode BatchNormalization: its new running mean is copied into the checkpoint
    state after each step (as torch updates it) and the eval model runs BN in inference mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.train(), torch.zeros(2, 1, 28, 28), buf, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    params = select_parameters(model)
    assert len(params.writeback) == 2
    spec = artifacts.ArtifactSpec(trainable=tuple(params.trainable), frozen=tuple(params.frozen), momentum=0.0,
                                  outputs=("logits",), train_only_outputs=tuple(params.writeback))
    session = TrainingSession(artifacts.generate(model, tmp_path, spec), threads=1)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", input=rng.random((8, 1, 28, 28), dtype=np.float32),
             labels=rng.integers(0, 10, 8).astype(np.int64))
    data = open_source(tmp_path / "data.npz", model_inputs(model))
    spec = losses.choose(model, loss="ce", loss_outputs=None, has_labels=True, temperature=None)
    trainer = loop.Trainer(session, data, data, feeder=loop.Feeder(["input"], spec), batch_size=8, total_steps=1,
                           schedule=LRSchedule("constant", 0.01, 1),
                           writeback=params.writeback, progress=False)
    trainer.run()
    mean_name = next(p for o, p in params.writeback.items() if p.endswith("running_mean"))
    order = np.random.default_rng([0, 0]).permutation(8)  # the source's order of epoch 0, seed 0
    net(torch.tensor(data.arrays['input'][order]))  # torch updates its running mean on the same batch
    np.testing.assert_allclose(session.get(mean_name), net[1].running_mean.numpy(), rtol=1e-5, atol=1e-7)
    assert trainer.history[0].test_loss > 0  # the eval model (BN in inference mode, one output) runs
