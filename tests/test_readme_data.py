"""Every command of the README's "Your own data" section runs as shown, on a small conv model
built here, a folder of photos, a .npz and the README's own loader.py (no torch)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import onnx

from onnxdns.cli import main
from test_sources import class_folder, conv_model

README = Path(__file__).resolve().parent.parent / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("### Your own data")
    end = min(i for i in (text.find("\n## ", start), text.find("\n### ", start + 10)) if i > 0)
    return text[start:end]


def test_readme_data_commands_run(tmp_path, monkeypatch, capsys):
    text = section()
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
                if line.startswith("onnxdns ")]
    loader = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(commands) == 4 and len(loader) == 1
    monkeypatch.chdir(tmp_path)
    onnx.save(conv_model(size=224), tmp_path / "model.onnx")
    class_folder(tmp_path / "photos")
    np.savez(tmp_path / "val.npz", images=np.random.default_rng(0).random((4, 3, 224, 224), dtype=np.float32),
             labels=np.array([0, 1, 2, 3]))
    (tmp_path / "loader.py").write_text(loader[0])
    for command in commands:
        args = shlex.split(command)[1:]
        code = main(args)
        out, err = capsys.readouterr()
        assert code == 0, (command, err)
        assert "onnxdns: error" not in err, (command, err)
    assert (tmp_path / "small.onnx").exists() and (tmp_path / "split.onnx").exists()
