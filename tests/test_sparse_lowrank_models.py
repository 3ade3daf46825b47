"""sparse-lowrank on models it was not written for: transformers ([seq, batch, d] attention), int64
token ids and bool masks, exporter Identity nodes in front of biases, depthwise networks where a
split does not pay (never a slower model without saying so), progress and logging."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxdns import cli, modelio, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.lowrank import calibration, speed
from onnxdns.lowrank.layers import MARK
from onnxdns.workflows.sparse_lowrank import SparseLowRank
from passkit import init, make_model, op_types, run, tensor_input

RNG = np.random.default_rng(11)


def normal(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def is_split(model: onnx.ModelProto) -> bool:
    return any(MARK in n.name for n in model.graph.node)


def rel_diff(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
    (ra,), (rb,) = run(a, feeds), run(b, feeds)
    return float(np.linalg.norm(rb - ra) / np.linalg.norm(ra))


# --------------------------------------------------------------------------- torch exports


def _export(module, args, names, dynamic_axes, path):
    torch = pytest.importorskip("torch")
    module.eval()  # gradients stay on: without them torch takes its fused transformer path, which does not export
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"],
                          dynamic_axes=dynamic_axes, dynamo=False, opset_version=17)
    return onnx.load(path)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """nn.TransformerEncoder (batch_first=False: attention on [seq, batch, d]), legacy exporter: the
    second layer's weights and biases (equal to the first's at initialisation) are read through
    Identity nodes, the MatMul weights through Transpose-free initializers."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0), 2, enable_nested_tensor=False)
    return _export(enc, (torch.randn(10, 4, 32),), ["src"], {"src": {1: "batch"}},
                   tmp_path_factory.mktemp("enc") / "encoder.onnx")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BERT-like classifier: int64 token ids -> Embedding (Gather) + positions -> 2 encoder layers
    (batch_first) with a bool padding mask -> Linear on the first token."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.pos = nn.Parameter(torch.randn(16, 32) * 0.1)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 3)

        def forward(self, ids, mask):
            return self.head(self.enc(self.emb(ids) + self.pos, src_key_padding_mask=~mask)[:, 0])

    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
    return _export(Bert(), (ids, mask), ["input_ids", "attention_mask"],
                   {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}},
                   tmp_path_factory.mktemp("bert") / "bert.onnx")


def bert_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 16), bool)
    mask[:, 12:] = rng.random((n, 4)) < 0.5
    return {"input_ids": rng.integers(0, 100, (n, 16)).astype(np.int64), "attention_mask": mask}


@pytest.mark.torch
def test_transformer_encoder_seq_batch_layout_is_split(encoder):
    """Regression: ``IndexError: index 16 is out of bounds for axis 0`` (batch assumed on axis 0).
    The samples are on axis 1 of [seq, batch, d]; every projection (biases read through exporter
    Identity nodes included) is a candidate, the attention products are skipped with a reason."""
    assert "Identity" in op_types(encoder)
    spec, = calibration.input_specs(encoder)
    assert spec.batch_axis == 1
    calib = normal(10, 40, 32)  # [seq, batch, d]: 40 samples
    result = SparseLowRank(calib, target_compression=1.6, iterations=3, threads=1, speed_check=False).apply(encoder)
    d = result.details
    assert d["calibration"]["images"] == 40 and d["split_layers"] >= 2
    names = [r["name"] for r in d["layers"]]
    assert len(names) == 8 and {"/layers.1/linear1/MatMul", "/layers.1/self_attn/Gemm"} <= set(names)
    assert set(d["skipped"].values()) == {"weight is not a constant"} and len(d["skipped"]) == 4
    assert d["clean_up"]["eliminate-identity"]["modified"]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"src": normal(10, 3, 32)}
    assert run(result.model, feeds)[0].shape == (10, 3, 32)
    assert rel_diff(encoder, result.model, feeds) < 0.5
    for row in d["layers"]:
        if row["status"] == "split":
            assert 0 <= row["rel_error"] < 1


@pytest.mark.torch
def test_bert_like_model_with_token_ids_and_mask(bert):
    """Regression: ``InvalidArgument ... expected: (tensor(int64))``. Calibration data: a dict of
    arrays named after the inputs (int64 ids, bool mask), or random inputs of the right dtypes."""
    inputs = bert_inputs(48)
    result = SparseLowRank(inputs, target_compression=1.6, iterations=3, threads=1,
                               speed_check=False).apply(bert)
    assert result.details["split_layers"] >= 2 and result.details["calibration"]["images"] == 48
    assert [i.type.tensor_type.elem_type for i in result.model.graph.input] == [TensorProto.INT64, TensorProto.BOOL]
    feeds = bert_inputs(5, seed=1)
    assert run(result.model, feeds)[0].shape == (5, 3)
    assert rel_diff(bert, result.model, feeds) < 0.5
    randomly = SparseLowRank(None, calib_samples=32, target_compression=1.6, iterations=2, threads=1,
                                 speed_check=False).apply(bert)
    assert randomly.details["split_layers"] >= 1 and "random" in randomly.details["calibration"]["data"]


@pytest.mark.torch
def test_calibration_data_is_checked_against_the_inputs(bert):
    with pytest.raises(OnnxdnsError, match="named after the model inputs"):
        SparseLowRank({"input_ids": bert_inputs(8)["input_ids"]}, speed_check=False).apply(bert)
    with pytest.raises(OnnxdnsError, match="one input"):
        SparseLowRank(bert_inputs(8)["input_ids"], speed_check=False).apply(bert)
    floats = dict(bert_inputs(8), input_ids=normal(8, 16))
    with pytest.raises(OnnxdnsError, match="integer or boolean"):
        SparseLowRank(floats, speed_check=False).apply(bert)
    short = dict(bert_inputs(8), attention_mask=np.ones((6, 16), bool))
    with pytest.raises(OnnxdnsError, match="different numbers of samples"):
        SparseLowRank(short, speed_check=False).apply(bert)


@pytest.mark.torch
def test_cli_takes_an_npz_of_named_inputs(bert, tmp_path, capsys):
    src, out, npz = tmp_path / "bert.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(bert, src)
    np.savez(npz, **bert_inputs(32))
    status = cli.main(["optimize", str(src), "-o", str(out), "--passes", "sparse-lowrank", "--calib-data", str(npz),
                       "--target-compression", "1.6", "--no-speed-check", "--no-validate"])
    text = capsys.readouterr()
    assert status == 0, text.err
    assert "speed check skipped" in text.out and is_split(onnx.load(out))
    np.savez(npz, ids=bert_inputs(8)["input_ids"])
    status = cli.main(["optimize", str(src), "-o", str(tmp_path / "o2.onnx"), "--passes", "sparse-lowrank",
                       "--calib-data", str(npz)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("onnxdns: error:") and "named after the model inputs" in err
    assert not (tmp_path / "o2.onnx").exists()


def test_cli_npz_of_a_one_input_model_and_unreadable_npz(tmp_path, capsys):
    src, npz, bad = tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "bad.npz"
    onnx.save(identity_net(), src)
    np.savez(npz, x=normal(48, 24))
    status = cli.main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--passes", "sparse-lowrank",
                       "--calib-data", str(npz), "--target-compression", "2", "--no-validate"])
    text = capsys.readouterr()
    assert status == 0, text.err
    assert "calibration: array (48 samples)" in text.out and "speed check" in text.out
    bad.write_bytes(b"PK\x03\x04 not a zip file")
    status = cli.main(["optimize", str(src), "-o", str(tmp_path / "o2.onnx"), "--passes", "sparse-lowrank",
                       "--calib-data", str(bad)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("onnxdns: error:") and "cannot read calibration inputs" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o2.onnx").exists()


# --------------------------------------------------------------------------- exporter clean-up


def identity_net() -> onnx.ModelProto:
    """x [N, 24] -> Gemm (weight and bias through Identity) -> Relu -> MatMul (weight = Transpose of a
    Constant node) + bias through Identity -> Relu -> Gemm -> logits, as legacy exporters write."""
    nodes = [
        helper.make_node("Identity", ["w1"], ["w1_id"]), helper.make_node("Identity", ["b1"], ["b1_id"]),
        helper.make_node("Gemm", ["x", "w1_id", "b1_id"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Constant", [], ["w2c"], value=onnx.numpy_helper.from_array(normal(32, 32, scale=0.2))),
        helper.make_node("Transpose", ["w2c"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["r1", "w2t"], ["m2"], name="fc2"),
        helper.make_node("Identity", ["b2"], ["b2_id"]),
        helper.make_node("Add", ["m2", "b2_id"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], name="fc3", transB=1),
    ]
    inits = [init("w1", normal(32, 24, scale=0.3)), init("b1", normal(32, scale=0.1)), init("b2", normal(32, scale=0.1)),
             init("w3", normal(10, 32, scale=0.3)), init("b3", normal(10, scale=0.1))]
    return make_model(nodes, [tensor_input("x", ["N", 24])], [tensor_input("logits", ["N", 10])], inits)


def test_unusable_calibration_arrays_are_user_errors():
    model = identity_net()
    bad = normal(16, 24)
    bad[3, 5] = np.nan
    with pytest.raises(OnnxdnsError, match="NaN or infinite"):
        SparseLowRank(bad, speed_check=False).apply(model)
    with pytest.raises(OnnxdnsError, match="at least 2 samples"):
        SparseLowRank(normal(1, 24), speed_check=False).apply(model)
    with pytest.raises(OnnxdnsError, match="does not fit model input"):
        SparseLowRank(normal(16, 20), speed_check=False).apply(model)


def test_weights_and_biases_behind_identity_and_constants_are_candidates():
    """Regression: a legacy export left most layers dense ("bias is not a constant"). The pass runs
    eliminate-identity and fold-constants itself: every layer is a candidate."""
    model = identity_net()
    result = SparseLowRank(None, calib_samples=64, target_compression=2.0, iterations=3, threads=1,
                               speed_check=False).apply(model)
    d = result.details
    assert d["skipped"] == {}
    assert [r["name"] for r in d["layers"]] == ["fc1", "fc2", "fc3"]
    assert d["clean_up"]["eliminate-identity"]["modified"] and d["clean_up"]["fold-constants"]["modified"]
    assert d["split_layers"] >= 1 and "Identity" not in op_types(result.model)
    onnx.checker.check_model(result.model, full_check=True)


# --------------------------------------------------------------------------- never slower


def gemm_chain() -> onnx.ModelProto:
    """x [N, 64] -> 3 x (Gemm 64x64 -> Relu) -> Gemm 64->10: layers so small that splitting any of
    them into two or three nodes costs more than it saves on onnxruntime CPU."""
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        nodes += [helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        inits += [init(f"w{i}", normal(64, 64, scale=0.15)), init(f"b{i}", normal(64, scale=0.1))]
        prev = f"r{i}"
    nodes.append(helper.make_node("Gemm", [prev, "w9", "b9"], ["logits"], name="head", transB=1))
    inits += [init("w9", normal(10, 64, scale=0.2)), init("b9", normal(10, scale=0.1))]
    return make_model(nodes, [tensor_input("x", ["N", 64])], [tensor_input("logits", ["N", 10])], inits)


def test_a_split_that_does_not_pay_is_undone():
    """The MAC target splits every layer; measured on onnxruntime the split model is slower, so the
    pass undoes the splits (halving, then none) and says so, with every measurement."""
    model = gemm_chain()
    result = SparseLowRank(None, calib_samples=160, target_speedup=3.0, cost="macs", iterations=2,
                               threads=1).apply(model)
    d = result.details
    check = d["speed_check"]
    assert not check["skipped"] and check["batches"] == [1, 8] and check["fallback"] == "no split"
    assert [a["split_layers"] for a in check["attempts"]] == [4, 2, 1]
    for attempt in check["attempts"]:
        assert not attempt["accepted"] and set(attempt["latency"]) == {"1", "8"}
        assert min(t["speedup"] for t in attempt["latency"].values()) < check["min_speedup"]
    assert not result.modified and not is_split(result.model) and d["split_layers"] == 0
    assert {r["status"] for r in d["layers"]} == {"undone"}
    from onnxdns.lowrank.report import layer_table

    text = layer_table(d)
    assert "undone" in text and "no split made the model faster" in text


def test_fallback_candidates_rebuild_the_kept_splits_exactly():
    """The speed check's smaller candidates are rebuilt from the unsplit model and the fitted factors:
    with every layer they equal the pass's split model, with a subset only those layers are split."""
    from onnxdns.lowrank import split

    base = identity_net()
    ir_model = modelio.to_ir(base)
    from onnxdns.passes.sparse_lowrank import clean_up as _clean_up

    _clean_up(ir_model)
    cleaned = modelio.to_proto(ir_model)
    inputs = calibration.Inputs({"x": normal(64, 24)}, {"x": 0})
    fitted: dict = {}
    details = split.split_model(ir_model, inputs, split.Settings(target_compression=2.5, iterations=2, threads=1),
                                fitted=fitted)
    full = modelio.to_proto(ir_model)
    names = [r["name"] for r in details["layers"] if r["status"] == "split"]
    assert len(names) >= 2 and sorted(fitted) == sorted(names)
    again = modelio.to_ir(cleaned)
    assert split.apply_fitted(again, [fitted[n] for n in names]) == names
    feeds = {"x": normal(5, 24)}
    np.testing.assert_array_equal(run(modelio.to_proto(again), feeds)[0], run(full, feeds)[0])
    one = modelio.to_ir(cleaned)
    split.apply_fitted(one, [fitted[names[0]]])
    one = modelio.to_proto(one)
    split_nodes = {n.name.split(MARK)[0] for n in one.graph.node if MARK in n.name}
    assert split_nodes == {names[0]}
    assert 0 < rel_diff(cleaned, one, feeds) and 0 < rel_diff(full, one, feeds)


def test_speed_check_on_an_unavailable_target_provider_is_reported_skipped():
    """--target cuda times the split on CUDA; where there is none the report says it was not timed."""
    from onnxdns.pipelines import custom_pipeline

    (slr,) = custom_pipeline(["sparse-lowrank"], target="cuda")
    assert slr.provider == "CUDAExecutionProvider" and slr.settings.round_to == 8
    if "CUDAExecutionProvider" in runtime.available_providers():
        pytest.skip("a CUDA provider is available here")
    result = SparseLowRank(None, calib_samples=64, target_compression=2.0, iterations=1, threads=1,
                               provider="CUDAExecutionProvider").apply(identity_net())
    check = result.details["speed_check"]
    assert check["skipped"] and "CUDAExecutionProvider is not available" in check["reason"]
    assert is_split(result.model)


def conv_stack(width: int = 64) -> onnx.ModelProto:
    """x [N, 8, 32, 32] -> Conv 8->w -> Relu -> 2 x (Conv w->w 3x3 -> Relu) -> GAP: most time in
    two wide convolutions, which a 4x cheaper split makes clearly faster."""
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"])]
    inits = [init("w0", normal(width, 8, 3, 3, scale=0.2)), init("b0", normal(width, scale=0.1))]
    for i in (1, 2):
        nodes += [helper.make_node("Conv", [f"r{i - 1}", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        inits += [init(f"w{i}", normal(width, width, 3, 3, scale=0.05)), init(f"b{i}", normal(width, scale=0.1))]
    nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["out"]))
    return make_model(nodes, [tensor_input("x", ["N", 8, 32, 32])], [tensor_input("out", ["N", width, 1, 1])], inits)


def test_a_split_that_pays_is_kept_with_its_measurement():
    model = conv_stack()
    result = SparseLowRank(None, calib_samples=24, target_speedup=3.0, skip=("conv0",), iterations=2,
                               threads=1).apply(model)
    check = result.details["speed_check"]
    assert check["fallback"] == "none" and len(check["attempts"]) == 1
    assert all(t["speedup"] >= check["min_speedup"] for t in check["attempts"][0]["latency"].values())
    assert result.modified and is_split(result.model) and result.details["split_layers"] == 2


def test_fallback_keeps_the_splits_that_pay():
    """speed.check on real onnxruntime sessions: the candidate with both layers is slower than the
    input (one "split" adds work), the one keeping only the larger-benefit layer is faster."""
    heavy, light = conv_stack(64), conv_stack(16)
    slow = onnx.ModelProto()
    slow.CopyFrom(heavy)
    for i in range(4):  # the same convolution computed again and added: more than twice the work
        slow.graph.node.insert(len(slow.graph.node) - 1, helper.make_node(
            "Conv", ["r1", "w2", "b2"], [f"extra{i}"], pads=[1, 1, 1, 1]))
        slow.graph.node.insert(len(slow.graph.node) - 1, helper.make_node("Add", [f"r2" if i == 0 else f"sum{i - 1}",
                                                                                  f"extra{i}"], [f"sum{i}"]))
    slow.graph.node[-1].input[0] = "sum3"
    built = []

    def build(kept):
        built.append(list(kept))
        return slow if "small" in kept else light

    inputs = calibration.Inputs({"x": normal(8, 8, 32, 32)}, {"x": 0})
    report = speed.check(heavy, ["small", "big"], {"big": 100.0, "small": 1.0}, build, inputs, [1, 4])
    assert built == [["big", "small"], ["big"]]
    assert report["fallback"] == "fewer splits" and report["kept"] == ["big"]
    assert [a["accepted"] for a in report["attempts"]] == [False, True]
    assert report["attempts"][1]["undone"] == ["small"]


# --------------------------------------------------------------------------- MobileNetV3-style network


@pytest.fixture(scope="module")
def mobilenet_v3(tmp_path_factory):
    return mobilenet_v3_model(tmp_path_factory.mktemp("mnv3") / "mnv3.onnx")


def mobilenet_v3_model(path) -> onnx.ModelProto:
    """A small MobileNetV3-style net (depthwise convs, hardswish, squeeze-excitation), 96x96."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))

    def block(cin, cexp, cout, stride, se):
        layers = [nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish(),
                  nn.Conv2d(cexp, cexp, 3, stride, 1, groups=cexp, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish()]
        if se:
            layers.append(SE(cexp))
        layers += [nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers)

    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
                        block(16, 16, 16, 2, True), block(16, 72, 24, 2, False), block(24, 88, 24, 1, False),
                        block(24, 96, 40, 2, True), nn.Conv2d(40, 240, 1), nn.Hardswish(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(240, 10))
    for m in net.modules():  # trained-looking BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return _export(net, (torch.randn(1, 3, 96, 96),), ["image"], {"image": {0: "batch"}}, path)


@pytest.mark.torch
def test_mobilenet_v3_style_net_is_never_returned_slower(mobilenet_v3):
    """Depthwise convolutions stay dense (reported); whatever the pass returns was measured at least
    ``min_speedup`` faster than its input at batch 1 and 8, or has no split; an independent
    side-by-side measurement agrees that it is not slower."""
    from onnxdns.validate import measure_latency

    result = SparseLowRank(None, calib_samples=24, target_speedup=2.0, iterations=2).apply(mobilenet_v3)
    d = result.details
    assert any(reason == "grouped or depthwise convolution" for reason in d["skipped"].values())
    check = d["speed_check"]
    assert not check["skipped"] and check["attempts"]
    if is_split(result.model):
        final = check["attempts"][-1]
        assert final["accepted"] and final["split_layers"] == d["split_layers"] == len(check["kept"])
        assert all(t["speedup"] >= check["min_speedup"] for t in final["latency"].values())
    else:
        assert check["fallback"] == "no split" and d["split_layers"] == 0
    for batch in (1, 8):
        feeds = {"image": normal(batch, 3, 96, 96)}
        lat = measure_latency({"in": mobilenet_v3, "out": result.model}, feeds, repeats=60)
        assert lat["out"].median_ms <= lat["in"].median_ms * 1.15, (batch, lat)


# --------------------------------------------------------------------------- progress, imports


def test_progress_bars_and_stage_logging(capsys, caplog):
    caplog.set_level(logging.INFO, logger="onnxdns")
    SparseLowRank(None, calib_samples=32, target_compression=2.0, iterations=1, threads=1, speed_check=False,
                      progress=True).apply(identity_net())
    err = capsys.readouterr().err
    assert "sparse-lowrank calibrate" in err and "sample/s" in err and "sparse-lowrank fit" in err
    text = caplog.text
    for stage in ("clean-up eliminate-identity", "calibration inputs", "calibration pass 1/1", "allocation done",
                  "fitting fc"):
        assert stage in text, stage


def test_the_pass_without_finetuning_imports_neither_torch_nor_training(tmp_path):
    """The core environment (Python 3.13) has neither torch nor onnxruntime-training."""
    path = tmp_path / "net.onnx"
    onnx.save(identity_net(), path)
    code = ("import sys, onnx\n"
            "sys.modules['torch'] = sys.modules['onnxruntime.training'] = None  # importing them now fails\n"
            "from onnxdns.workflows.sparse_lowrank import SparseLowRank\n"
            f"r = SparseLowRank(None, calib_samples=32, target_compression=2.0, iterations=1, threads=1)"
            f".apply(onnx.load({str(path)!r}))\n"
            "assert r.details['layers'] and not r.details['speed_check']['skipped']\n"
            "print('done')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "done"


def test_a_model_with_a_static_batch_of_one_is_calibrated_one_sample_per_run():
    """An export without dynamic axes ([1, 24]): every run feeds one sample; timed at batch 1."""
    model = identity_net()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    spec, = calibration.input_specs(model)
    assert calibration.static_batch([spec]) == 1
    result = SparseLowRank(normal(40, 24), target_compression=2.0, iterations=2, threads=1).apply(model)
    d = result.details
    assert d["calibration"]["images"] == 40 and d["calibration"]["eval_images"] == 8
    assert d["speed_check"]["batches"] == [1]
    assert run(result.model, {"x": normal(1, 24)})[0].shape == (1, 10)


def ocr_detector_path():
    """The trained PP-OCRv4 text detector (MobileNetV3-style, dynamic H/W) of the installed
    ``rapidocr-onnxruntime`` wheel (``scripts/setup.sh`` installs it with ``--no-deps``)."""
    import importlib.util
    import os
    from pathlib import Path

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        if os.environ.get("CI") == "true":
            pytest.fail("rapidocr-onnxruntime is not installed: scripts/setup.sh installs it (pip install --no-deps)")
        pytest.skip("rapidocr-onnxruntime is not installed")
    path = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.is_file():
        pytest.fail(f"{path} is missing from the installed rapidocr-onnxruntime")
    return path


@pytest.mark.slow
def test_trained_ocr_detector_is_never_returned_slower():
    """The trained PP-OCRv4 detector (depthwise convs, hardswish, SE blocks), calibrated on
    Fashion-MNIST images resized to 3x64x64: what the pass returns was measured faster than the
    input, or has no split; an independent side-by-side measurement agrees that it is not slower."""
    from onnxdns.data import load_dataset
    from onnxdns.validate import measure_latency

    model = onnx.load(ocr_detector_path())
    images = calibration.fit_images(np.asarray(load_dataset("fashion-mnist", "train").images[:12], np.float32),
                                    (3, 64, 64))
    result = SparseLowRank(images, target_speedup=2.0, iterations=2, sensitivity=False).apply(model)
    d = result.details
    assert any(reason == "grouped or depthwise convolution" for reason in d["skipped"].values())
    check = d["speed_check"]
    if is_split(result.model):
        final = check["attempts"][-1]
        assert final["accepted"] and final["split_layers"] == d["split_layers"]
        assert all(t["speedup"] >= check["min_speedup"] for t in final["latency"].values())
    else:
        assert check["skipped"] or check["fallback"] == "no split"
    for batch in (1, 8):
        feeds = {model.graph.input[0].name: images[:batch]}
        lat = measure_latency({"in": model, "out": result.model}, feeds, repeats=30)
        assert lat["out"].median_ms <= lat["in"].median_ms * 1.15, (batch, lat)
