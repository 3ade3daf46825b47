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


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_input_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), path)
    path.chmod(0)
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, "cannot read: Permission denied")


def test_too_long_input_paths(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), path)
    code, _, err = run(capsys, "inspect", tmp_path / ("x" * 300 + ".onnx"))
    assert_user_error(code, err, "File name too long")
    code, _, err = run(capsys, "validate", path, tmp_path / ("x" * 300 + ".onnx"))
    assert_user_error(code, err, "File name too long")


# --------------------------------------------------------------------------- arguments out of range


@pytest.mark.parametrize("args, fragment", [
    (["train", "{m}", "-o", "{o}", "--epochs", "nan"], "argument --epochs: expected a finite number > 0"),
    (["train", "{m}", "-o", "{o}", "--epochs", "inf"], "argument --epochs"),
    (["train", "{m}", "-o", "{o}", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
    (["train", "{m}", "-o", "{o}", "--weight-decay", "nan"], "argument --weight-decay"),
    (["train", "{m}", "-o", "{o}", "--dns-gamma", "nan"], "argument --dns-gamma"),
    (["train", "{m}", "-o", "{o}", "--lr-step", "0"], "argument --lr-step"),
    (["slim", "{m}", "-o", "{o}", "--finetune-epochs", "nan"], "argument --finetune-epochs"),
    (["slim", "{m}", "-o", "{o}", "--threshold", "nan"], "argument --threshold"),
    (["optimize", "{m}", "-o", "{o}", "--finetune-epochs", "nan"], "argument --finetune-epochs"),
    (["optimize", "{m}", "-o", "{o}", "--target-speedup", "nan"], "argument --target-speedup"),
    (["optimize", "{m}", "-o", "{o}", "--target-compression", "inf"], "argument --target-compression"),
])
def test_numbers_out_of_range_are_usage_errors(args, fragment, model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, *[a.format(m=model_file, o=out) for a in args])
    assert_user_error(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("command", ["validate", "train", "slim"])
@pytest.mark.parametrize("threads", ["100000", "-1", "257"])
def test_thread_counts_are_bounded(command, threads, model_file, tmp_path):
    """--threads 100000 killed the process with SIGSEGV (so this runs in a subprocess)."""
    args = [model_file, model_file] if command == "validate" else [model_file, "-o", tmp_path / "out.onnx"]
    proc = _cli(command, *args, "--threads", threads, "--repeats" if command == "validate" else "--no-progress",
                *(["1"] if command == "validate" else []))
    _assert_one_line_exit_2(proc, "argument --threads: expected an integer in [0, 256]")


@pytest.mark.parametrize("option", [dict(weight_decay=float("nan")), dict(dns_gamma=float("nan")),
                                    dict(epochs=float("inf")), dict(seed=-1), dict(lr=0.0), dict(iterations=0)])
def test_train_api_refuses_nonsense_numbers(option, model_file, tmp_path):
    from onnxdns.workflows import train as train_api

    with pytest.raises(OnnxdnsError, match=next(iter(option))):
        train_api.train(model_file, tmp_path / "out.onnx", progress=False, **option)
    assert not (tmp_path / "out.ckpt").exists()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), path)
    return path


# --------------------------------------------------------------------------- calibration inputs


def _npy(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, array, allow_pickle=True)
    return path


@pytest.mark.parametrize("name, array, fragment", [
    ("inf.npy", np.where(np.arange(784) == 5, np.inf, 0.5).astype(np.float32)[None].repeat(4, 0), "infinite"),
    ("nan.npy", np.full((4, 784), np.nan, np.float32), "NaN"),
    ("huge.npy", np.full((4, 784), 1e300), "NaN or infinite value(s) as float32"),
    ("empty.npy", np.zeros((0, 784), np.float32), "at least 2 samples, got 0"),
    ("strings.npy", np.array([["a", "b"]]), "needs numbers, got calibration data of dtype <U1"),
    ("record.npy", np.zeros((4, 2), dtype=[("a", "f4"), ("b", "i4")]), "needs numbers"),
    ("objects.npy", np.array([[{"a": 1}]], dtype=object), "Python objects"),
])
def test_bad_calibration_arrays(name, array, fragment, model_file, tmp_path, capsys):
    path = _npy(tmp_path, name, array)
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", model_file, "-o", out, "--passes", "sparse-lowrank", "--calib-data", path)
    assert_user_error(code, err, fragment)
    assert not out.exists()


def test_calibration_fifo_is_refused_without_blocking(model_file, tmp_path):
    os.mkfifo(tmp_path / "calib.npy")
    proc = _cli("optimize", model_file, "-o", tmp_path / "out.onnx", "--passes", "sparse-lowrank", "--calib-data",
                tmp_path / "calib.npy", timeout=60)
    _assert_one_line_exit_2(proc, "must be a regular .npy or .npz file")


def test_calibration_samples_beyond_memory(model_file, tmp_path, capsys):
    code, _, err = run(capsys, "optimize", model_file, "-o", tmp_path / "out.onnx", "--passes", "sparse-lowrank",
                       "--calib-samples", "1000000000")
    assert_user_error(code, err, "use fewer calibration samples")


def test_calibration_inputs_api_checks_values():
    from onnxdns.lowrank.calibration import InputSpec, calibration_inputs

    spec = [InputSpec("x", np.dtype(np.float32), ("N", 4), 0)]
    with pytest.raises(OnnxdnsError, match="NaN or infinite"):
        calibration_inputs(np.full((3, 4), np.inf), spec, 3)
    x, _ = calibration_inputs(np.ones((3, 4), np.int64), spec, 2)
    assert x.arrays["x"].dtype == np.float32 and x.arrays["x"].shape == (2, 4)


# --------------------------------------------------------------------------- output paths


@pytest.mark.torch
def test_output_onto_a_fifo_or_device_is_refused(model_file, tmp_path, capsys):
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    targets = [fifo]
    if os.geteuid() == 0:
        import stat

        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a second /dev/null
        targets.append(device)
    for target in targets:
        kind = os.stat(target).st_mode
        for args in (["optimize", model_file, "-o", target, "--no-validate"], ["export", "lenet-5", "-o", target],
                     ["train", model_file, "-o", target, "--iterations", "1", "--subset", "64", "--test-subset", "10"]):
            code, _, err = run(capsys, *args)
            assert_user_error(code, err, "not a regular file")
            assert os.stat(target).st_mode == kind


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (mounting needs root)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.torch
def test_writing_onto_a_full_disk(full_disk, tmp_path, capsys):
    lenet = tmp_path / "lenet.onnx"
    assert run(capsys, "export", "lenet-300-100", "-o", lenet)[0] == 0  # 1 MB: more than the disk holds
    for args in (["export", "lenet-300-100", "-o", full_disk / "m.onnx"],
                 ["optimize", lenet, "-o", full_disk / "m.onnx", "--no-validate"]):
        code, _, err = run(capsys, *args)
        assert_user_error(code, err, "No space left on device")
        assert os.listdir(full_disk) == []  # no partial or temporary file left


def test_non_utf8_file_name_under_an_ascii_terminal(tmp_path):
    """The summary prints the name with backslash escapes instead of failing after the write."""
    src = Path(os.fsdecode(bytes(tmp_path) + b"/in\xff.onnx"))
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out\xff.onnx"))
    onnx.save_model(tiny_model(), src)
    env = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    proc = _cli("optimize", src, "-o", out, "--no-validate", env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"in\\udcff.onnx" in proc.stdout and out.exists()
    proc = _cli("inspect", Path(os.fsdecode(bytes(tmp_path) + b"/missing\xff.onnx")), env=env)
    _assert_one_line_exit_2(proc, "missing\\udcff.onnx: no such file")


# --------------------------------------------------------------------------- one line on stderr


def test_numpy_warnings_do_not_reach_stderr(tmp_path):
    """Infinite weights make numpy warn inside the passes (inf * 0 in the constant analysis); the
    optimized model computes the same infinities, so optimize succeeds, and stderr stays empty."""
    model = tiny_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((784, 10), np.inf, np.float32), "W"))
    src = tmp_path / "inf.onnx"
    onnx.save_model(model, src)
    proc = _cli("optimize", src, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0 and proc.stderr.decode() == "", proc.stderr.decode()
    assert b"validation: passed" in proc.stdout


def test_onnxruntime_log_does_not_reach_stderr(tmp_path):
    """A Gemm whose weight does not fit the declared input fails inside onnxruntime."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [numpy_helper.from_array(W, "W")])
    src = tmp_path / "bad.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), src)
    proc = _cli("validate", src, src, "--repeats", "1")
    err = proc.stderr.decode()
    # onnxruntime 1.19 fails when it runs the model, 1.32 already when its shape inference loads it
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "the input model fails" in err or "onnxruntime cannot load the model" in err, err


# --------------------------------------------------------------------------- training run folders

TINY_RUN = ["--iterations", "4", "--subset", "256", "--test-subset", "100", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> Path:
    from onnxdns.models import export_model

    return export_model("lenet-300-100", tmp_path_factory.mktemp("zoo") / "lenet.onnx")


@pytest.fixture(scope="module")
def finished_run(lenet, tmp_path_factory) -> Path:
    """The checkpoint folder of a 4-step DNS run of LeNet-300-100 on 256 MNIST images."""
    from onnxdns.cli import main

    out = tmp_path_factory.mktemp("run") / "run.onnx"
    assert main(["train", str(lenet), "-o", str(out), *TINY_RUN]) == 0
    return out.with_name("run.ckpt")


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "copy.ckpt"
    shutil.copytree(finished_run, copy)
    return copy


def _resume(capsys, ckpt: Path) -> tuple[int, str, str]:
    return run(capsys, "train", "--resume", ckpt, "-o", ckpt.with_name("resumed.onnx"), "--no-progress")


@pytest.mark.train
def test_untouched_checkpoint_resumes(run_copy, capsys):
    code, _, err = _resume(capsys, run_copy)
    assert code == 0, err
    assert run_copy.with_name("resumed.onnx").exists()


@pytest.mark.train
def test_flipped_bit_in_checkpoint_weights_is_detected(run_copy, capsys):
    from onnxdns.training import loop

    ort_ckpt, state = loop.checkpoint_paths(run_copy)
    data = bytearray(ort_ckpt.read_bytes())
    data[len(data) // 2] ^= 0x04  # inside fc1's 266,000 weights (most of the file)
    ort_ckpt.write_bytes(bytes(data))
    code, _, err = _resume(capsys, run_copy)
    assert_user_error(code, err, "do not match the checksum")
    assert not run_copy.with_name("resumed.onnx").exists()


@pytest.mark.train
@pytest.mark.parametrize("edit, fragment", [
    (lambda text, data: text[: len(text) // 2], "unreadable JSON"),
    (lambda text, data: "{}", "missing key(s) epoch_stats, history, hooks, step"),
    (lambda text, data: "[]", "expected a JSON object"),
    (lambda text, data: __import__("json").dumps({**data, "step": "ten"}), "step must be an integer, got 'ten'"),
    (lambda text, data: __import__("json").dumps({**data, "colour": 1}), "unknown key(s) colour"),
    (lambda text, data: __import__("json").dumps({**data, "step": 10**6}), "beyond this run's 4 steps"),
    (lambda text, data: __import__("json").dumps({**data, "hooks": [{}]}), "method state"),
    (lambda text, data: __import__("json").dumps({**data, "history": [{"epoch": 1}]}), "history"),
])
def test_damaged_checkpoint_metadata_is_one_line_naming_the_file(edit, fragment, run_copy, capsys):
    import json

    from onnxdns.training import loop

    _, state = loop.checkpoint_paths(run_copy)
    text = state.read_text()
    state.write_text(edit(text, json.loads(text)))
    code, _, err = _resume(capsys, run_copy)
    assert_user_error(code, err, fragment)
    assert str(state) in err
    assert not run_copy.with_name("resumed.onnx").exists()


@pytest.mark.train
@pytest.mark.parametrize("content, fragment", [
    ("{", "damaged run file"), ("{}", "no 'config' object"), ('{"config": {"colour": 1}}', "damaged run file"),
])
def test_damaged_run_file_is_one_line(content, fragment, run_copy, capsys):
    (run_copy / "run.json").write_text(content)
    code, _, err = _resume(capsys, run_copy)
    assert_user_error(code, err, fragment)
    assert "run.json" in err


@pytest.mark.train
def test_checkpoint_dir_that_is_a_file(model_file, tmp_path, capsys):
    (tmp_path / "ck").write_text("not a folder")
    code, _, err = run(capsys, "train", model_file, "-o", tmp_path / "o.onnx", "--checkpoint-dir", tmp_path / "ck")
    assert_user_error(code, err, "is not a folder")


@pytest.mark.train
def test_run_killed_before_its_first_checkpoint_can_be_restarted(lenet, tmp_path, capsys, caplog):
    """SIGKILL after the run folder is set up (run.json written) but before the first checkpoint
    (epoch 1 of full MNIST takes 937 steps): --resume says to start over, which then works."""
    import signal
    import time

    out = tmp_path / "k.onnx"
    ckpt = tmp_path / "k.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "onnxdns", "train", str(lenet), "-o", str(out), "--iterations",
                             "3000", "--threads", "1", "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "run.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (ckpt / "run.json").exists() and not (ckpt / "state").exists()
    code, _, err = run(capsys, "train", "--resume", ckpt, "--no-progress")
    assert_user_error(code, err, "stopped before its first checkpoint, there is nothing to resume")
    code, _, err = run(capsys, "train", lenet, "-o", out, *TINY_RUN)
    assert code == 0, err
    assert out.exists() and (ckpt / "state" / "trainer.json").exists()
    assert "holds a run stopped before its first checkpoint; starting it over" in caplog.text


@pytest.mark.train
def test_training_that_diverges_writes_nothing(tmp_path, capsys):
    """An infinite weight (or a learning rate far too high) makes the loss NaN: before, the run
    ended with exit 0 and a model that outputs NaN."""
    model = image_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((10, 784), np.inf, np.float32), "W"))
    src = tmp_path / "inf.onnx"
    onnx.save_model(model, src)
    code, _, err = run(capsys, "train", src, "-o", tmp_path / "out.onnx", "--method", "none", *TINY_RUN)
    assert_user_error(code, err, "training diverged: the loss is nan at step 1")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.train
def test_a_folder_in_use_by_a_running_training_is_not_cleared(lenet, tmp_path, capsys):
    """A run still setting up (no checkpoint yet) must not be mistaken for a killed one."""
    import fcntl

    from onnxdns.workflows import train as train_api

    ckpt = tmp_path / "busy.ckpt"
    ckpt.mkdir()
    (ckpt / "run.json").write_text("{}")
    with open(ckpt / train_api.LOCK_FILE, "a+b") as held:  # what a running train() holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run(capsys, "train", lenet, "-o", tmp_path / "o.onnx", "--checkpoint-dir", ckpt, *TINY_RUN)
        assert_user_error(code, err, "another onnxdns training run is using this folder")
        assert (ckpt / "run.json").read_text() == "{}"
