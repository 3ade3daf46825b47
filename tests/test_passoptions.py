"""Pass options from the command line: ``optimize --pass-option PASS.OPTION=VALUE``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from clikit import assert_user_error, run
from onnxdns import modelio
from onnxdns.errors import OnnxdnsError
from onnxdns.passes import PASSES
from onnxdns.passoptions import options_of, parse_pass_options


def test_values_are_typed_from_the_constructor():
    opts = parse_pass_options(["slim-channels.ratio=0.3", "slim-channels.threshold=none", "slim-channels.round-to=8",
                               "add-masks.ops=Conv,Gemm", "sparse-lowrank.speed_check=off", "sparse-lowrank.cost=macs"])
    assert opts == {"slim_channels": {"ratio": 0.3, "threshold": None, "round_to": 8},
                    "add_masks": {"ops": ("Conv", "Gemm")}, "sparse_lowrank": {"speed_check": False, "cost": "macs"}}
    assert isinstance(opts["slim_channels"]["round_to"], int)


@pytest.mark.parametrize("item, fragment", [
    ("slim-channels.ratio=abc", "expected a finite number or none, got 'abc'"),
    ("slim-channels.round_to=1.5", "expected an integer, got '1.5'"),
    ("slim-channels.min_keep=none", "expected an integer, got 'none'"),
    ("add-masks.biases=maybe", "expected true or false"),
    ("slim.ratio=0.3", "unknown pass 'slim'"),
    ("slim-channels.rate=0.3", "pass 'slim-channels' has no option 'rate'; its options: ratio, threshold"),
    ("slim-channels=0.3", "expected PASS.OPTION=VALUE"),
    ("slim-channels.ratio", "expected PASS.OPTION=VALUE"),
])
def test_bad_items_raise_one_line(item, fragment):
    with pytest.raises(OnnxdnsError) as info:
        parse_pass_options([item])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_every_pass_option_is_typed():
    """Each constructor annotation evaluates to a type the parser knows; only sparse-lowrank's data
    (arrays, a dataset name or a source) and its Python-only fine-tuning options are taken as text."""
    from onnxdns.pipelines import option_classes

    untyped = [(name, o.name) for name, cls in option_classes().items() for o in options_of(cls).values()
               if o.kind == "any"]
    assert untyped == [("sparse-lowrank", "calib_data"), ("sparse-lowrank", "finetune_data"),
                       ("sparse-lowrank", "finetune_options")]


@pytest.mark.torch
def test_optimize_slim_channels_ratio_from_the_cli(tmp_path, capsys):
    """The ratio reaches slim-channels: 0.3 prunes fewer channels than 0.7; bad options are one
    line, exit 2, nothing written; ``onnxdns passes`` lists the options."""
    from onnxdns.models import INPUT_SHAPES, build
    from onnxdns.synthetic import randomize_batchnorm
    from onnxdns.testing import export_module

    src = tmp_path / "vgg.onnx"
    modelio.save_model(randomize_batchnorm(export_module(build("vgg-bn"), INPUT_SHAPES["vgg-bn"]), seed=1), src)
    widths = {}
    for ratio in ("0.3", "0.7"):
        out = tmp_path / f"vgg-{ratio}.onnx"
        code, _, err = run(capsys, "optimize", src, "-o", out, "--passes", "slim-channels", "--no-validate",
                           "--pass-option", f"slim-channels.ratio={ratio}", "--pass-option", "slim-channels.min_keep_ratio=0")
        assert code == 0, err
        model = onnx.load(str(out))
        inits = {i.name: i for i in model.graph.initializer}
        widths[ratio] = sum(int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv")
    total = 864  # vgg-bn's conv channels
    assert abs((total - widths["0.3"]) - 0.3 * total) <= 2 and abs((total - widths["0.7"]) - 0.7 * total) <= 2

    out = tmp_path / "bad.onnx"
    for args, fragment in [
        (["--passes", "slim-channels", "--pass-option", "slim-channels.ratio=1.5"], "ratio in [0, 1)"),
        (["--passes", "slim-channels", "--pass-option", "slim-channels.ratio=x"], "expected a finite number"),
        (["--passes", "slim-channels", "--pass-option", "remove-channels.round_to=4"], "not in this pipeline: remove-channels"),
        (["--pass-option", "nope.x=1"], "unknown pass 'nope'"),
    ]:
        code, _, err = run(capsys, "optimize", src, "-o", out, "--no-validate", *args)
        assert_user_error(code, err, fragment)
        assert not out.exists()

    code, text, _ = run(capsys, "passes")
    assert code == 0 and "slim-channels: ratio=0.5 (float or none)" in text and "--pass-option" in text
    code, text, _ = run(capsys, "optimize", "--help")
    assert code == 0 and "--pass-option" in text


def test_target_pipeline_takes_options():
    """Options of a pass of the target pipeline override the target's defaults."""
    from onnxdns import pipelines

    passes = pipelines.get_pipeline("cpu", **parse_pass_options(["remove-channels.round_to=16"]))
    assert next(p for p in passes if p.name == "remove-channels").round_to == 16
    assert np.all([p.name != "slim-channels" for p in passes])
