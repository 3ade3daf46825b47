"""Training artifacts: straight-through gradients and momentum SGD against torch references."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnxdns.errors import OnnxdnsError
from onnxdns.models import build
from onnxdns.passes.add_masks import AddMasksPass
from onnxdns.testing import export_module
from onnxdns.training import artifacts
from onnxdns.training.optim import LRSchedule
from onnxdns.training.params import select_parameters
from onnxdns.training.session import TrainingSession

pytestmark = pytest.mark.train  # every test needs onnxruntime-training (onnxdns[train])


def _lenet5_forward(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    h = F.max_pool2d(F.conv2d(x, p["conv1.weight"], p["conv1.bias"]), 2)
    h = F.max_pool2d(F.conv2d(h, p["conv2.weight"], p["conv2.bias"]), 2).flatten(1)
    h = F.relu(h @ p["fc1.weight"].T + p["fc1.bias"])
    return h @ p["fc2.weight"].T + p["fc2.bias"]


@pytest.fixture(scope="module")
def masked_lenet5() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """LeNet-5 with weight and bias masks, about half of every mask zero."""
    model = AddMasksPass(biases=True).apply(export_module(build("lenet-5"), (1, 28, 28))).model
    rng = np.random.default_rng(0)
    masks = {}
    for init in model.graph.initializer:
        if init.name.endswith("__mask"):
            masks[init.name] = (rng.random(tuple(init.dims)) < 0.5).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(masks[init.name], init.name))
    return model, masks


def _session(model, directory, *, straight: bool, momentum: float = 0.0, weight_decay: float = 0.0,
             optimizer: str = "sgd"):
    params = select_parameters(model)
    spec = artifacts.ArtifactSpec(
        trainable=tuple(params.trainable), frozen=tuple(params.frozen),
        straight_through={p: m for layer in params.layers for p, m in layer.params} if straight else {},
        momentum=momentum, weight_decay=weight_decay, outputs=(model.graph.output[0].name,), optimizer=optimizer,
    )
    return TrainingSession(artifacts.generate(model, directory, spec), threads=2), params


@pytest.mark.parametrize("straight", [True, False])
def test_gradients_match_torch(masked_lenet5, tmp_path, straight):
    """Straight-through: dL/dW == dL/d(W*T) (torch) for conv and fc weights and biases, also where
    T = 0; masked: dL/dW == T * dL/d(W*T)."""
    model, masks = masked_lenet5
    session, params = _session(model, tmp_path, straight=straight)
    rng = np.random.default_rng(1)
    x = rng.random((16, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 16).astype(np.int64)
    session.module.train()
    loss = session.module(x, y)[0]

    masked = {n: (torch.tensor(session.get(n)) * torch.tensor(masks[f"{n}__mask"])).requires_grad_()
              for n in params.trainable}
    ref_loss = F.cross_entropy(_lenet5_forward(torch.tensor(x), masked), torch.tensor(y))
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) < 1e-5
    for name in params.trainable:
        got = session.state.parameters[name].grad
        ref = masked[name].grad.numpy()
        pruned = masks[f"{name}__mask"] == 0
        if straight:
            assert np.abs(ref[pruned]).max() > 1e-4, name  # pruned weights do get a gradient
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(got, ref * masks[f"{name}__mask"], rtol=0, atol=1e-6, err_msg=name)
            assert not got[pruned].any()


def _step_both(session, net, opt, x, y, lr) -> None:
    """One step of the onnxruntime session and of the torch optimizer at learning rate ``lr``."""
    session.train_step([x, y], lr)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad()
    F.cross_entropy(net(torch.tensor(x)), torch.tensor(y)).backward()
    opt.step()


def test_momentum_sgd_matches_torch(tmp_path):
    """Heavy-ball SGD with L2 weight decay and a changing learning rate == torch.optim.SGD, step by step."""
    net = build("lenet-300-100")
    model = export_module(net, (1, 28, 28))
    session, params = _session(model, tmp_path, straight=False, momentum=0.9, weight_decay=5e-4)
    names = {"fc1.weight": net.fc1.weight, "fc1.bias": net.fc1.bias, "fc2.weight": net.fc2.weight,
             "fc2.bias": net.fc2.bias, "fc3.weight": net.fc3.weight, "fc3.bias": net.fc3.bias}
    assert set(params.trainable) == set(names)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = LRSchedule("cosine", lr=0.05, total_steps=6)
    rng = np.random.default_rng(2)
    for step in range(6):
        x = rng.random((32, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 32).astype(np.int64)
        _step_both(session, net, opt, x, y, schedule(step))
        for name, param in names.items():
            ref = param.detach().numpy()
            np.testing.assert_allclose(session.get(name), ref, rtol=0, atol=2e-7 * max(1.0, np.abs(ref).max()),
                                       err_msg=f"{name} after step {step}")


def test_adamw_matches_torch_and_resumes_exactly(tmp_path):
    """optimizer='adamw' == torch.optim.AdamW(betas=(momentum, 0.999), eps=1e-8, decoupled weight
    decay) step by step with a changing learning rate, to 1% of a step (Hugging Face's update, which
    onnxblock writes, is off by up to 70% of a step here), and a checkpoint carries both moments and
    the step count (bias correction): continuing from it == continuing in memory."""
    net = build("lenet-300-100")
    model = export_module(net, (1, 28, 28))
    session, params = _session(model, tmp_path / "a", straight=False, momentum=0.9, weight_decay=1e-2,
                               optimizer="adamw")
    names = {"fc1.weight": net.fc1.weight, "fc1.bias": net.fc1.bias, "fc2.weight": net.fc2.weight,
             "fc2.bias": net.fc2.bias, "fc3.weight": net.fc3.weight, "fc3.bias": net.fc3.bias}
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    schedule = LRSchedule("cosine", lr=1e-3, total_steps=6)
    rng = np.random.default_rng(2)
    batches = [(rng.random((32, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 32).astype(np.int64))
               for _ in range(6)]
    for step, (x, y) in enumerate(batches):
        if step == 3:
            session.save(tmp_path / "ckpt")
        _step_both(session, net, opt, x, y, schedule(step))
        for name, param in names.items():  # Adam's step is ~lr wherever |g| >> eps, whatever |g| is: an
            # element whose gradient is near 0 (rounding-level differences) may differ by a small part of a step
            np.testing.assert_allclose(session.get(name), param.detach().numpy(), rtol=0, atol=1e-2 * 1e-3 * (step + 1),
                                       err_msg=f"{name} after step {step}")
    resumed = TrainingSession(session.artifacts, tmp_path / "ckpt", threads=2)
    for step, (x, y) in enumerate(batches[3:], start=3):
        resumed.train_step([x, y], schedule(step))
    for name, value in session.parameters().items():
        np.testing.assert_array_equal(resumed.get(name), value, err_msg=name)


def test_straight_through_fails_loudly_without_the_pattern(masked_lenet5, tmp_path):
    model, _ = masked_lenet5
    _session(model, tmp_path, straight=True)
    training = onnx.load(str(tmp_path / artifacts.TRAINING_MODEL))
    with pytest.raises(OnnxdnsError, match="expected conv1.weight_grad to come from Mul"):
        artifacts.make_straight_through(training, "conv1.weight", "conv1.weight__mask")  # already edited
    with pytest.raises(OnnxdnsError, match="no Mul"):
        artifacts.make_straight_through(training, "conv1.weight", "conv2.weight__mask")


def test_checkpoint_restores_momentum(masked_lenet5, tmp_path):
    """A saved checkpoint carries the momentum: continuing from it == continuing in memory."""
    model, _ = masked_lenet5
    session, _ = _session(model, tmp_path / "a", straight=True, momentum=0.9, weight_decay=1e-3)
    rng = np.random.default_rng(3)
    batches = [(rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8).astype(np.int64)) for _ in range(4)]
    for x, y in batches[:2]:
        session.train_step([x, y], 0.05)
    session.save(tmp_path / "ckpt")
    for x, y in batches[2:]:
        session.train_step([x, y], 0.05)
    resumed = TrainingSession(session.artifacts, tmp_path / "ckpt", threads=2)
    for x, y in batches[2:]:
        resumed.train_step([x, y], 0.05)
    for name, value in session.parameters().items():
        np.testing.assert_array_equal(resumed.get(name), value, err_msg=name)


def test_with_input_shapes_takes_minus_one_as_dynamic():
    """paddle2onnx writes a dynamic batch as dim_value -1 (the PP-OCR classifier: [-1, 3, ?, ?]):
    it is dynamic, not a fixed size that differs from the data's; a fixed size that differs is refused."""
    from onnx import TensorProto, helper

    def model(dims):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)  # -1 output too (the split classifier)
        return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))

    fixed = artifacts.with_input_shapes(model([-1, 3, "h", "w"]), {"x": (4, 3, 8, 16)})
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 8, 16]
    assert all(d.dim_value >= 0 for d in fixed.graph.output[0].type.tensor_type.shape.dim)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(fixed, strict_mode=True))
    with pytest.raises(OnnxdnsError, match="has shape"):
        artifacts.with_input_shapes(model([2, 3, 8, 16]), {"x": (4, 3, 8, 16)})
