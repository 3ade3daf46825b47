"""The README's "Your own model, your own data" commands run as shown, on a BatchNorm-folded torch
export and a flat folder of images without labels; training shortened (``--iterations 3000`` ->
4, ``--epochs 5`` -> 3: the README's values are checked to be what is replaced)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxdns.cli import main

pytestmark = [pytest.mark.train, pytest.mark.torch]

README = Path(__file__).resolve().parent.parent / "README.md"
SHORTER = {"--iterations": ("3000", "4"), "--epochs": ("5", "3")}


def commands() -> list[list[str]]:
    text = README.read_text()
    start = text.index("## Your own model, your own data")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    lines = block.splitlines()
    variable = re.match(r'M="([^"]*)"', lines[0])
    assert variable, lines[0]
    out = []
    for line in lines[1:]:
        words = shlex.split(line.split("#")[0].replace("$M", variable.group(1)))
        for i, word in enumerate(words[:-1]):
            if word in SHORTER:
                assert words[i + 1] == SHORTER[word][0], (word, words[i + 1])
                words[i + 1] = SHORTER[word][1]
        out.append(words)
    return out


def folded_net():
    import torch
    from torch import nn

    from onnxdns.testing import export_folded

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return export_folded(net, (3, 32, 32))


def test_readme_own_model_commands_run(tmp_path, monkeypatch, capsys):
    from PIL import Image

    cmds = commands()
    assert [c[:2] for c in cmds] == [["onnxdns", "train"], ["onnxdns", "optimize"], ["onnxdns", "slim"],
                                      ["onnxdns", "optimize"], ["onnxdns", "validate"]]
    monkeypatch.chdir(tmp_path)
    model = folded_net()
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # exported the usual way
    onnx.save(model, "model.onnx")
    rng = np.random.default_rng(0)
    Path("photos").mkdir()
    for i in range(80):  # 72 train + 8 held out: one batch of 64
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(f"photos/{i:03d}.png")
    for words in cmds:
        code = main(words[1:])
        out, err = capsys.readouterr()
        assert code == 0, (words, err[-2000:])
        assert "onnxdns: error" not in err, (words, err)
    for name in ("dns.onnx", "dns-small.onnx", "slim.onnx", "split.onnx"):
        assert Path(name).exists(), name
    convs = lambda m: [n for n in onnx.load(m).graph.node if n.op_type == "Conv"]  # noqa: E731
    widths = lambda m: sum(i.dims[0] for i in onnx.load(m).graph.initializer  # noqa: E731
                           if i.name in {n.input[1] for n in convs(m)})
    assert widths("slim.onnx") < widths("model.onnx")  # channels removed from a model without BatchNorm
