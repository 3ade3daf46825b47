"""Packaging: every package folder is installed, and passes/models install inside onnxdns."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = config["package-dir"]
    found = set()
    for package, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found <= listed, f"not installed: {sorted(found - listed)}"
    assert "passes" not in listed and "models" not in listed  # no top-level packages of those names


def test_core_dependencies_leave_the_runtime_and_torch_to_extras():
    """`pip install onnxdns` brings no torch and no onnxruntime flavour (it goes beside the user's
    onnxruntime or onnxruntime-gpu); each flavour is one extra; training pins its stack."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip()
                for r in requirements}

    # pillow: folders of images as data (onnxdns/sources/images.py)
    assert names(project["dependencies"]) == {"onnx", "onnx-ir", "numpy", "tqdm", "pillow"}
    extras = project["optional-dependencies"]
    assert names(extras["cpu"]) == {"onnxruntime"} and names(extras["cuda"]) == {"onnxruntime-gpu"}
    assert names(extras["train"]) == {"onnxruntime-training-cpu", "onnx", "torch"}
    assert "onnxruntime-training-cpu==1.19.2" in extras["train"]  # no wheel for 3.13: pip says so
    assert "onnx>=1.16,<1.17" in extras["train"]
    assert names(extras["zoo"]) == {"torch"}
    assert {"pytest", "onnx-graphsurgeon"} <= names(extras["test"])
    assert project["requires-python"] == ">=3.10,<3.14"
