"""The model zoo: sizes, deterministic construction, and ONNX export checked against torch in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onnxdns import models, modelio, runtime
from onnxdns.errors import OnnxdnsError

pytestmark = pytest.mark.torch  # every test builds models with torch (onnxdns[zoo])

SMALL = [name for name in models.MODELS if name != "vgg16-imagenet"]


def _calibrate_bn(model: nn.Module, name: str, seed: int = 1) -> None:
    """Realistic BatchNorm state: running statistics from two random batches (as after training,
    so logits depend on the input), then random affine terms, so a wrong BN export shows."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *models.INPUT_SHAPES[name], generator=g))
        for m in bns:
            m.momentum = 0.1
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    model.train(was_training)
    return out


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    tol = 1e-5 * float(np.abs(ref).max()) + 1e-7
    assert float(np.abs(got - ref).max()) <= tol


def _inputs(name: str, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *models.INPUT_SHAPES[name])).astype(np.float32)


def test_registry_lists_every_model_with_a_shape():
    assert set(models.MODELS) == {"lenet-300-100", "lenet-5", "vgg-bn", "resnet-20", "mobilenet-v2",
                                  "densenet", "inception", "vgg16", "vgg16-imagenet"}
    assert set(models.INPUT_SHAPES) == set(models.MODELS)
    assert models.INPUT_SHAPES["vgg16-imagenet"] == (3, 224, 224)


def test_unknown_model_lists_known_names():
    with pytest.raises(OnnxdnsError, match="unknown model 'alexnet'; known models: lenet-300-100, lenet-5"):
        models.build("alexnet")


def test_bad_constructor_option_is_a_user_error():
    with pytest.raises(OnnxdnsError, match="vgg-bn"):
        models.build("vgg-bn", depth=3)
    with pytest.raises(OnnxdnsError, match="width must be positive"):
        models.build("vgg16", width=0)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = models.build("resnet-20"), models.build("resnet-20")
    after = torch.rand(1)
    assert torch.equal(before, after)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = models.build("resnet-20", seed=1)
    assert not torch.equal(a.stem.conv.weight, c.stem.conv.weight)


@pytest.mark.parametrize("name,params,macs", [
    ("lenet-300-100", 266_610, 266_200),
    ("lenet-5", 431_080, 2_293_000),
])
def test_lenet_sizes(name, params, macs):
    model = models.build(name)
    assert models.param_count(model) == params
    assert models.macs(model, models.INPUT_SHAPES[name]) == macs


def test_vgg16_imagenet_is_torchvisions_vgg16():
    model = models.build("vgg16-imagenet")
    assert models.param_count(model) == 138_357_544
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["features.0.weight"] == (64, 3, 3, 3)
    assert shapes["features.28.weight"] == (512, 512, 3, 3)
    assert shapes["classifier.0.weight"] == (4096, 25088)
    assert shapes["classifier.6.weight"] == (1000, 4096)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["vgg-bn", "vgg16"])
def test_default_vgg_cost_fits_a_cpu_epoch(name):
    model = models.build(name)
    assert 0.5e6 <= models.param_count(model) <= 2.5e6
    assert 15e6 <= models.macs(model, (1, 28, 28)) <= 40e6


def test_vgg_width_and_cfg_size_the_network():
    small = models.build("vgg-bn", width=0.25, cfg=(32, "M", 64))
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    assert models.build("vgg16", width=1.0).features[0].out_channels == 64
    assert sum(isinstance(m, nn.Conv2d) for m in models.build("vgg16").modules()) == 13


@pytest.mark.parametrize("name", SMALL)
def test_export_matches_torch_in_onnxruntime(name, tmp_path):
    model = models.build(name)
    _calibrate_bn(model, name)
    path = models.export_model(model, tmp_path / f"{name}.onnx", input_shape=models.INPUT_SHAPES[name])
    assert model.training, "export must restore the module's training mode"

    proto = modelio.load_model(path)  # onnx.checker and the stack's IR/opset limits
    assert proto.ir_version <= modelio.MAX_IR_VERSION
    assert modelio.opset_version(proto) == 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"

    bn_modules = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    bn_nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_nodes) == bn_modules
    for node in bn_nodes:
        assert len(node.output) == 1
        assert {a.name: a.i for a in node.attribute}.get("training_mode", 0) == 0
    assert not [n for n in proto.graph.node if n.op_type == "Identity"]

    x = _inputs(name)
    (got,) = runtime.run(proto, {"input": x})
    _assert_close(got, _torch_logits(model, x))


def test_export_keeps_equal_initializers_separate(tmp_path):
    """A fresh BN has scale == running_var (ones) and shift == running_mean (zeros); the legacy
    exporter would merge such equal tensors. Each must stay its own initializer, named after it."""
    proto = onnx.load(str(models.export_model("resnet-20", tmp_path / "r.onnx")))
    inits = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            assert len(set(node.input[1:])) == 4 and set(node.input[1:]) <= inits
    assert {"stem.bn.weight", "stem.bn.bias", "stem.bn.running_mean", "stem.bn.running_var"} <= inits
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            if name in inits:
                users[name] = users.get(name, 0) + 1
    assert max(users.values()) == 1


def test_family_structure(tmp_path):
    def ops(name):
        proto = onnx.load(str(models.export_model(name, tmp_path / f"{name}.onnx")))
        return proto.graph.node

    resnet = ops("resnet-20")
    assert sum(n.op_type == "Add" for n in resnet) == 9
    assert sum(n.op_type == "Conv" for n in resnet) == 21  # 19 3x3 + 2 projection shortcuts
    mobile = ops("mobilenet-v2")
    groups = [a.i for n in mobile if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert max(groups) > 1 and any(n.op_type == "Add" for n in mobile)
    dense = [n for n in ops("densenet") if n.op_type == "Concat"]
    assert len(dense) == 12 and all(len(n.input) == 2 for n in dense)
    inception = [n for n in ops("inception") if n.op_type == "Concat"]
    assert len(inception) == 3 and all(len(n.input) == 4 for n in inception)


def test_export_by_name_with_state_dict(tmp_path):
    trained = models.build("lenet-5", seed=7)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    x = _inputs("lenet-5", 2)
    for weights in (trained.state_dict(), tmp_path / "w.pt"):
        path = models.export_model("lenet-5", tmp_path / "l5.onnx", state_dict=weights)
        (got,) = runtime.run(path, {"input": x})
        _assert_close(got, _torch_logits(trained, x))


def test_export_with_state_dict_leaves_the_module_alone(tmp_path):
    model = models.build("lenet-300-100")
    before = model.fc1.weight.detach().clone()
    other = models.build("lenet-300-100", seed=3).state_dict()
    models.export_model(model, tmp_path / "m.onnx", input_shape=(1, 28, 28), state_dict=other)
    assert torch.equal(model.fc1.weight, before)


def test_static_batch_export(tmp_path):
    proto = onnx.load(str(models.export_model("lenet-5", tmp_path / "s.onnx", dynamic_batch=False)))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


@pytest.mark.parametrize("call,message", [
    (lambda p: models.export_model(models.build("lenet-5"), p), "input_shape"),
    (lambda p: models.export_model("lenet-5", p.parent / "missing" / "x.onnx"), "does not exist"),
    (lambda p: models.export_model("lenet-5", p, opset=25), "opset 25"),
    (lambda p: models.export_model("lenet-5", p, state_dict={"fc1.weight": torch.zeros(1)}), "do not fit"),
    (lambda p: models.export_model("lenet-5", p, state_dict=p.parent / "none.pt"), "cannot read weights"),
    (lambda p: models.export_model("nope", p), "unknown model"),
])
def test_export_user_errors(tmp_path, call, message):
    with pytest.raises(OnnxdnsError, match=message):
        call(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_vgg16_imagenet_exports_under_2gb(tmp_path):
    path = models.export_model("vgg16-imagenet", tmp_path / "vgg16.onnx")
    assert 550e6 < path.stat().st_size < 2e9
    proto = modelio.load_model(path)
    assert proto.ir_version <= modelio.MAX_IR_VERSION and modelio.opset_version(proto) == 17
    model = models.build("vgg16-imagenet")
    x = _inputs("vgg16-imagenet", 1)
    (got,) = runtime.run(proto, {"input": x})
    _assert_close(got, _torch_logits(model, x))
