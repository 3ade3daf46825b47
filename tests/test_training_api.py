"""End to end on real MNIST subsets: DNS learns, prunes and splices; magnitude pruning; dense."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxdns import runtime
from onnxdns.data import load_dataset
from onnxdns.errors import OnnxdnsError
from onnxdns.models import export_model
from onnxdns.passes.fold_masks import FoldMasksPass
from onnxdns.training import artifacts, loop
from onnxdns.workflows import train as api
from onnxdns.training.cli import add_train_arguments, run_train
from onnxdns.training.session import TrainingSession

pytestmark = pytest.mark.train  # every test needs onnxruntime-training (onnxdns[train])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zoo")
    return {name: export_model(name, folder / f"{name}.onnx") for name in ("lenet-300-100", "lenet-5")}


@pytest.fixture(scope="module")
def dns_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("dns") / "dns.onnx"
    result = api.train(models["lenet-300-100"], out, method="dns", epochs=3, subset=2000, lr=0.05, dns_c="0.5",
                       seed=0, threads=2, progress=False)
    return result


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_dns_learns_prunes_and_splices(dns_run):
    r = dns_run
    assert r.final_accuracy > 0.7  # 2000 training images, 3 epochs, from random initial weights
    assert r.history[-1].test_accuracy == r.final_accuracy and len(r.history) == 3
    assert 0.2 < r.total_density < 0.8 and all(d < 1 for d in r.density.values())
    surgery = r.method_summary["surgery"]
    assert r.method_summary["spliced"] > 0  # pruned weights came back
    assert all(s["spliced"] > 0 for s in surgery.values())


def test_dns_output_model(dns_run, models):
    """The output: masks as initializers behind Mul(W, mask), IR <= 10, same predictions as the
    eval model of the training session, folded exactly by fold-masks."""
    model = onnx.load(str(dns_run.output))
    assert model.ir_version <= 10
    inits = _inits(dns_run.output)
    masks = {n: a for n, a in inits.items() if n.endswith("__mask")}
    assert set(masks) == {f"fc{i}.{k}__mask" for i in (1, 2, 3) for k in ("weight", "bias")}
    assert sum(n.op_type == "Mul" for n in model.graph.node) == 6
    density = np.count_nonzero(masks["fc1.weight__mask"]) + np.count_nonzero(masks["fc1.bias__mask"])
    assert density / (masks["fc1.weight__mask"].size + masks["fc1.bias__mask"].size) == pytest.approx(dns_run.density["fc1"])

    test = load_dataset("mnist", "test")
    x, y = np.ascontiguousarray(test.images[:500]), np.ascontiguousarray(test.labels[:500])
    logits = runtime.run(model, {"input": x})[0]
    ort_ckpt, _ = loop.checkpoint_paths(dns_run.checkpoint_dir)
    session = TrainingSession(artifacts.Artifacts.load(dns_run.checkpoint_dir / api.ARTIFACTS_DIR), ort_ckpt)
    _, eval_logits = session.eval_step([x, y])
    np.testing.assert_allclose(logits, eval_logits, rtol=0, atol=1e-5)
    assert (logits.argmax(1) == eval_logits.argmax(1)).all()

    folded = FoldMasksPass()(model)
    assert not any(n.endswith("__mask") for n in _inits_proto(folded))
    np.testing.assert_allclose(runtime.run(folded, {"input": x})[0], logits, rtol=0, atol=1e-5)


def _inits_proto(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer}


def test_dns_conv_and_fc_phases(models, tmp_path):
    """LeNet-5: conv layers get surgery in the conv phase only, fc layers in the fc phase only."""
    r = api.train(models["lenet-5"], tmp_path / "l5.onnx", method="dns", iterations=12, subset=640, test_subset=200,
                  dns_phases="conv:5,fc:5", dns_c="conv=0.5,fc=1", seed=1, threads=2, progress=False)
    surgery = r.method_summary["surgery"]
    assert r.method_summary["phases"] == [{"kinds": "conv", "start": 0, "end": 5}, {"kinds": "fc", "start": 5, "end": 10}]
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert 1 <= surgery[layer]["updates"] <= 5 and r.density[layer] < 1


def test_magnitude_pruning(models, tmp_path):
    src = models["lenet-300-100"]
    r = api.train(src, tmp_path / "mag.onnx", method="magnitude", iterations=60, subset=1280, test_subset=500,
                  sparsity="fc=0.8,fc3=0.5", rounds=2, lr=0.05, threads=2, progress=False)
    assert r.method_summary["events"] == [0, 30] and r.method_summary["rounds_done"] == 2
    inits = _inits(r.output)
    for layer, sparsity in (("fc1", 0.8), ("fc2", 0.8), ("fc3", 0.5)):
        w, mask = inits[f"{layer}.weight"], inits[f"{layer}.weight__mask"]
        assert f"{layer}.bias__mask" not in inits  # biases are not pruned by default
        assert np.count_nonzero(mask) == round((1 - sparsity) * mask.size)
        assert r.density[layer] == pytest.approx(1 - sparsity, abs=1e-3)
        assert not w[mask == 0].any()  # pruned weights stay at zero (masked gradient)
    assert r.final_accuracy > 0.5


def test_dense_training(models, tmp_path):
    r = api.train(models["lenet-300-100"], tmp_path / "dense.onnx", method="none", epochs=2, subset=2000,
                  test_subset=500, lr=0.05, threads=2, progress=False)
    assert r.final_accuracy > 0.6 and r.density == {} and r.total_density == 1.0
    assert not any(n.endswith("__mask") for n in _inits(r.output))


def test_bad_input_is_one_line_error(models, tmp_path):
    src = models["lenet-300-100"]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cases = [
        (dict(input_path=tmp_path / "missing.onnx", output_path=tmp_path / "o.onnx"), "no such file"),
        (dict(input_path=src, output_path=src), "the output path is the input model"),
        (dict(input_path=src, output_path=tmp_path / "o.onnx", method="obd"), "unknown method"),
        (dict(input_path=src, output_path=tmp_path / "o.onnx", momentum=1.0), "momentum"),
        (dict(input_path=src, output_path=tmp_path / "nodir" / "o.onnx"), "does not exist"),
        (dict(input_path=src, output_path=tmp_path / "o.onnx", dns_c="fc7=1", iterations=2), "unknown layer"),
        (dict(resume=tmp_path), "not a training checkpoint folder"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OnnxdnsError, match=message) as info:
            api.train(progress=False, **kwargs)
        assert "\n" not in str(info.value)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def test_cli_arguments(models, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args([str(models["lenet-300-100"]), "-o", str(tmp_path / "c.onnx"), "--method", "magnitude",
                              "--iterations", "10", "--subset", "640", "--test-subset", "200", "--rounds", "1",
                              "--sparsity", "0.5", "--no-progress", "--threads", "2"])
    assert args.lr is None and args.method == "magnitude"  # unset options keep defaults (or the checkpoint's)
    assert run_train(args) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and str(tmp_path / "c.onnx") in out
    with pytest.raises(OnnxdnsError, match="needs IN.onnx"):
        run_train(parser.parse_args(["--method", "dns"]))


def test_method_registry_matches_cli_choices():
    from onnxdns.training.config import METHODS
    from onnxdns.training.methods import METHOD_CLASSES

    assert tuple(METHOD_CLASSES) == METHODS


def test_average_pool_model_trains(tmp_path):
    """onnxruntime 1.19's AveragePoolGrad crashes the process on a symbolic batch dimension: the
    training graph is built for the fixed training batch size, the eval model stays dynamic."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 13 * 13, 10))
    src = export_model(net, tmp_path / "avgpool.onnx", input_shape=(1, 28, 28))
    r = api.train(src, tmp_path / "out.onnx", method="dns", iterations=4, subset=256, test_subset=100, batch_size=32,
                  dns_c="0", threads=1, progress=False)
    assert r.steps == 4 and r.history[-1].test_loss > 0
    training = onnx.load(str(r.checkpoint_dir / api.ARTIFACTS_DIR / artifacts.TRAINING_MODEL))
    assert training.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 32


def test_weights_in_constant_nodes_train(models, tmp_path):
    """Exporters such as paddle2onnx (the PP-OCR models) store weights as ``Constant`` nodes, not
    initializers: training lifts them into trainable initializers (exact) instead of finding none."""
    model = onnx.load(str(models["lenet-300-100"]))
    inits = {i.name: i for i in model.graph.initializer}
    consts = [onnx.helper.make_node("Constant", [], [name], value=inits[name]) for name in inits]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    src = tmp_path / "constants.onnx"
    onnx.save(model, str(src))
    r = api.train(src, tmp_path / "out.onnx", method="dns", iterations=3, subset=256, test_subset=100, batch_size=32,
                  dns_c="0.5", threads=1, progress=False)
    assert r.steps == 3
    out = onnx.load(str(tmp_path / "out.onnx"))
    trained = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    weights = [n for n, t in inits.items() if len(t.dims) == 2]
    assert weights and all(n in trained for n in weights)
    assert any(not np.array_equal(trained[n], numpy_helper.to_array(inits[n])) for n in weights)
