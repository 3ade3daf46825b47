"""Every command the README shows is run here, so the README cannot rot.

* The ``## Use`` block: each ``onnxdns`` line runs as written, in a temporary folder, one after
  the other (each reads the previous one's files). Only the training lengths are shortened
  (``--epochs 5`` and ``--iterations 16000`` would take minutes): every other argument is the
  README's own.
* The Python block of "From Python, and inside your own ONNX pipeline" runs as written on a
  ``model.onnx`` with zeroed channels.
* ``scripts/demo.sh`` (the main job) runs on a short schedule into a temporary folder;
  ``scripts/test.sh`` is what CI runs, so it is run by CI itself.
* Install lines (``pip install ...``) and benchmark commands (long experiments, see
  ``benchmarks/``) are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: Shorter training for the test; the README's values are checked to be what is replaced.
SHORTER = {"--epochs": ("5", "0.02"), "--iterations": ("16000", "40")}


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start:end if end >= 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """The ``onnxdns`` commands of a bash block, comments removed."""
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "onnxdns":
            commands.append(words)
    return commands


def _shorten(words: list[str]) -> list[str]:
    out = list(words)
    for i, w in enumerate(out[:-1]):
        if w in SHORTER:
            readme_value, short = SHORTER[w]
            assert out[i + 1] == readme_value, f"README changed {w} {out[i + 1]}: update SHORTER"
            out[i + 1] = short
    return out


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.torch
@pytest.mark.train
def test_use_block_runs_as_written(tmp_path):
    blocks = _blocks(_section("## Use"), "bash")
    commands = _commands(blocks[0])
    assert [c[1] for c in commands] == ["export", "train", "train", "optimize", "validate", "inspect", "passes"]
    printed = {}
    for words in commands:
        done = _run([sys.executable, "-m", "onnxdns", *_shorten(words)[1:]], tmp_path)
        assert done.returncode == 0, f"{' '.join(words)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        printed[words[1]] = done.stdout
    assert {"lenet5.onnx", "dense.onnx", "dns.onnx", "small.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert "validation: passed" in printed["optimize"]
    assert "accuracy" in printed["validate"] and "top-1 agreement" in printed["validate"]
    assert "fold-masks" in printed["passes"]


def _zeroed_channels_model() -> onnx.ModelProto:
    """Conv(8) -> Relu -> Conv(4) with half the first conv's output channels zero."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[::2] = 0
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_python_block_runs_as_written(tmp_path):
    code = _blocks(_section("### From Python"), "python")[0]
    onnx.save_model(_zeroed_channels_model(), tmp_path / "model.onnx")
    code += "\nprint(sum(1 for _ in small.graph.node), sum(int(np.prod(i.dims)) for i in small.graph.initializer))\n"
    done = _run([sys.executable, "-c", "import numpy as np\n" + code], tmp_path)
    assert done.returncode == 0, done.stderr
    nodes, params = map(int, done.stdout.split())
    assert nodes == 3 and params == 4 * 3 * 9 + 4 * 4 * 9  # half the channels removed on both sides


@pytest.mark.torch
@pytest.mark.train
@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo-out"), DEMO_DENSE_EPOCHS="0.05",
               DEMO_DNS_ITERATIONS="40")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = _run(["bash", str(ROOT / "scripts" / "demo.sh")], ROOT, env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "5/5 validate" in done.stdout and "accuracy" in done.stdout
    assert (tmp_path / "demo-out" / "lenet5-small.onnx").exists()
