"""Regression tests for the fuzz findings of issue 10 ("Never silently wrong"), grouped by topic.

Each test is a case that made the released CLI read outside the model's folder, crash, hang, exit 1
on a user mistake, accept a nonsensical value, or print more than one line on an error. They run
the real command line (in-process, or as a subprocess where a hang or a crash is the failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_cli import assert_user_error, image_model, run, sha, tiny_model

from onnxdns import modelio
from onnxdns.errors import OnnxdnsError


def _cli(*args, timeout: float = 120, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m onnxdns ARGS`` in a real process (bytes, so file names need not be UTF-8)."""
    cmd = [sys.executable, "-m", "onnxdns", *[os.fsencode(a) if isinstance(a, Path) else a for a in args]]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def _assert_one_line_exit_2(proc: subprocess.CompletedProcess, fragment: str = "") -> None:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("onnxdns: error: "), err
    assert fragment in err, err


# --------------------------------------------------------------------------- external data


W = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)


def external_model(folder: Path, location: str = "w.bin") -> Path:
    """tiny_model with its weight W in the external file ``location`` (beside the model)."""
    model = tiny_model()
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def set_location(path: Path, location: str, **extra: str) -> None:
    model = onnx.load_model(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            entries.update(location=location, **extra)
            del t.external_data[:]
            for k, v in entries.items():
                t.external_data.add(key=k, value=v)
    path.write_bytes(model.SerializeToString())


def test_external_data_in_the_models_folder_is_read(tmp_path, monkeypatch):
    path = external_model(tmp_path)
    monkeypatch.chdir("/")
    model = modelio.load_model(path)
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), W)


def _secret(tmp_path: Path) -> Path:
    """A file outside the model's folder holding exactly as many bytes as W: only the location
    check can stop it (the size check would stop /etc/passwd)."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"S" * W.nbytes)
    return secret


def test_symlinked_external_file_leaving_the_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    path = external_model(folder)
    (folder / "w.bin").unlink()
    (folder / "w.bin").symlink_to(_secret(tmp_path))
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", path, "-o", out, "--no-validate")
    assert_user_error(code, err, "leaves the model's folder")
    assert not out.exists()


def test_symlinked_folder_leaving_the_model_folder_is_refused(tmp_path, capsys):
    """``etc -> /etc`` style: the link is a folder on the way to the data file."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = _secret(tmp_path)
    (folder / "etc").symlink_to(secret.parent)
    path = external_model(folder)
    set_location(path, "etc/secret.bin")
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, "leaves the model's folder")


def test_symlink_inside_the_folder_is_followed(tmp_path):
    path = external_model(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "w.bin").rename(tmp_path / "data" / "real.bin")
    (tmp_path / "w.bin").symlink_to(Path("data") / "real.bin")
    assert np.array_equal(numpy_helper.to_array(modelio.load_model(path).graph.initializer[0]), W)


@pytest.mark.parametrize("location, fragment", [
    ("/etc/passwd", "absolute locations are refused"),
    ("../outside/secret.bin", "'..' are refused"),
    ("sub/../../outside/secret.bin", "'..' are refused"),
    ("", "no file location"),
])
def test_absolute_and_parent_locations_are_user_errors(location, fragment, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    _secret(tmp_path)
    path = external_model(folder)
    set_location(path, location)
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, fragment)


@pytest.mark.parametrize("extra, fragment", [
    ({"offset": "40000"}, "past the end of the file"),
    ({"offset": "8", "length": str(W.nbytes)}, "past the end of the file"),
    ({"offset": "-1"}, "negative offset"),
    ({"length": "ten"}, "not an integer"),
    ({"length": "16"}, "need 31360 bytes, the file holds 16"),
])
def test_offsets_and_lengths_outside_the_file(extra, fragment, tmp_path, capsys):
    path = external_model(tmp_path)
    set_location(path, "w.bin", **extra)
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, fragment)


def test_external_data_on_a_fifo_is_refused_without_blocking(tmp_path):
    path = external_model(tmp_path)
    (tmp_path / "w.bin").unlink()
    os.mkfifo(tmp_path / "w.bin")
    _assert_one_line_exit_2(_cli("inspect", path, timeout=60), "not a regular file")


def test_external_data_on_a_device_is_refused(tmp_path, capsys):
    path = external_model(tmp_path)
    (tmp_path / "w.bin").unlink()
    (tmp_path / "w.bin").symlink_to("/dev/zero")  # outside the folder as well: rejected either way
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err)
    set_location(path, "dev/zero")
    (tmp_path / "dev").mkdir()
    os.mknod(tmp_path / "dev" / "zero", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 5))
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, "not a regular file")


def sparse_external_model(folder: Path) -> tuple[Path, np.ndarray]:
    """A Gemm whose weight is a sparse initializer with its values in ``v.bin``."""
    dense = np.zeros((784, 10), np.float32)
    dense[::7, 3] = np.arange(1, 113, dtype=np.float32)
    sp = modelio.array_to_sparse("W", dense)
    (folder / "v.bin").write_bytes(sp.values.raw_data)
    sp.values.ClearField("raw_data")
    sp.values.data_location = TensorProto.EXTERNAL
    sp.values.external_data.add(key="location", value="v.bin")
    model = tiny_model()
    del model.graph.initializer[:]
    model.graph.sparse_initializer.append(sp)
    path = folder / "sparse.onnx"
    path.write_bytes(model.SerializeToString())
    return path, dense


def test_sparse_external_data_is_read_from_the_models_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    path, dense = sparse_external_model(folder)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "v.bin").write_bytes(np.full(112, 99, np.float32).tobytes())
    monkeypatch.chdir(elsewhere)
    model = modelio.load_model(path)
    assert np.array_equal(modelio.sparse_to_array(model.graph.sparse_initializer[0]), dense)
    ir_model = modelio.to_ir(model)
    assert np.array_equal(ir_model.graph.initializers["W"].const_value.numpy(), dense)


def test_sparse_external_data_symlinked_outside_is_refused(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    path, _ = sparse_external_model(folder)
    secret = tmp_path / "secret.bin"
    secret.write_bytes((folder / "v.bin").read_bytes())
    (folder / "v.bin").unlink()
    (folder / "v.bin").symlink_to(secret)
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", path, "-o", out, "--no-validate")
    assert_user_error(code, err, "sparse initializer 'W' (values)")
    assert not out.exists()


def test_external_data_in_a_subgraph_is_checked(tmp_path, capsys):
    """An If whose branch holds a Constant with external data linked outside the folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = _secret(tmp_path)
    value = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value="c.bin")
    value.external_data.add(key="length", value="16")
    (folder / "c.bin").symlink_to(secret)
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [f"{name}_out"], value=value)], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "if.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, "leaves the model's folder")


# --------------------------------------------------------------------------- model structure at load


def _with_initializer(tmp_path: Path, edit) -> Path:
    model = tiny_model()
    edit(model.graph.initializer[0])
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: setattr(t, "raw_data", t.raw_data[:16]), "need 31360 bytes, the file holds 16"),
    (lambda t: (t.ClearField("dims"), t.dims.extend([1 << 28, 3])), "the file holds 31360"),  # 3 GB declared
    (lambda t: (t.ClearField("raw_data"), t.float_data.extend([1.0] * 5)), "need 7840 float_data values"),
    (lambda t: setattr(t, "data_type", 999), "unknown data type 999"),
    (lambda t: setattr(t, "data_type", TensorProto.UNDEFINED), "data type UNDEFINED"),
])
def test_initializer_data_must_match_its_dims_and_type(edit, fragment, tmp_path, capsys):
    path = _with_initializer(tmp_path, edit)
    before = sha(path)
    for args in (["inspect", path], ["optimize", path, "-o", tmp_path / "out.onnx"]):
        code, _, err = run(capsys, *args)
        assert_user_error(code, err, fragment)
    assert not (tmp_path / "out.onnx").exists() and sha(path) == before


def conv_model(group: int, out_channels: int = 6, in_channels: int = 4, weight_in: int | None = None) -> onnx.ModelProto:
    w = np.ones((out_channels, weight_in if weight_in is not None else in_channels // max(group, 1) or 1, 3, 3),
                np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], group=group)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("model, fragment", [
    (conv_model(0), "group must be at least 1, got 0"),
    (conv_model(-1), "group must be at least 1, got -1"),
    (conv_model(3, out_channels=6, in_channels=4, weight_in=2), "input 'x' has 4 channels"),
    (conv_model(4, out_channels=6, in_channels=4, weight_in=1), "group 4 does not divide"),
    (conv_model(1, out_channels=0), "has 0 output channels"),
])
def test_conv_group_and_channels_are_checked_at_load(model, fragment, tmp_path, capsys):
    path = tmp_path / "conv.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, fragment)


def test_consistent_grouped_conv_loads(tmp_path):
    path = tmp_path / "conv.onnx"
    path.write_bytes(conv_model(2, out_channels=6, in_channels=4).SerializeToString())
    assert modelio.load_model(path).graph.node[0].op_type == "Conv"


def test_unreadable_and_too_long_input_paths(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), path)
    path.chmod(0)
    try:
        if os.geteuid() != 0:  # root reads anything
            code, _, err = run(capsys, "inspect", path)
            assert_user_error(code, err, "Permission denied")
    finally:
        path.chmod(0o644)
    code, _, err = run(capsys, "inspect", tmp_path / ("x" * 300 + ".onnx"))
    assert_user_error(code, err, "File name too long")
    code, _, err = run(capsys, "validate", path, tmp_path / ("x" * 300 + ".onnx"))
    assert_user_error(code, err, "File name too long")
