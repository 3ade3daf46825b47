"""External data in and out (issue 13): optimize reads models whose weights live in data files
beside them, writes such outputs (atomically, model file and data file together), and counts the
data files in the bytes on disk. The refusals of unsafe locations are in test_fuzz_regressions.py;
here they are checked on the lazy (memory-mapped) path that optimize uses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from test_cli import assert_user_error, run, sha, tiny_model

from onnxdns import api, modelio
from onnxdns.stats import model_stats

W = numpy_helper.to_array(tiny_model().graph.initializer[0])


def external_model(folder: Path, name: str = "m.onnx", location: str = "m.onnx.data") -> Path:
    path = folder / name
    onnx.save_model(tiny_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _initializers(path: Path) -> dict[str, TensorProto]:
    return {t.name: t for t in onnx.load_model(str(path), load_external_data=False).graph.initializer}


def _locations(path: Path) -> set[str]:
    return {e.value for t in _initializers(path).values() for e in t.external_data if e.key == "location"}


def test_external_input_gives_external_output_and_bytes_count_the_data(tmp_path):
    src = external_model(tmp_path)
    before = sha(src), sha(tmp_path / "m.onnx.data")
    out = tmp_path / "out.onnx"
    result = api.optimize(src, out)
    assert result.ok, result.validation.message
    assert result.validation.status == "passed"
    assert _locations(out) == {"out.onnx.data"}
    assert result.before.file_bytes == src.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert result.after.file_bytes == out.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    assert result.after.file_bytes > W.nbytes  # not just the small model file
    assert (sha(src), sha(tmp_path / "m.onnx.data")) == before
    loaded = modelio.load_model(out)
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), W)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_inline_input_stays_one_file_unless_external_data_is_asked(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), src)
    one = tmp_path / "one.onnx"
    code, out, err = run(capsys, "optimize", src, "-o", one, "--no-validate")
    assert code == 0, err
    assert _locations(one) == set() and not (tmp_path / "one.onnx.data").exists()
    two = tmp_path / "two.onnx"
    code, out, err = run(capsys, "optimize", src, "-o", two, "--no-validate", "--external-data")
    assert code == 0, err
    assert _locations(two) == {"two.onnx.data"}
    data = (tmp_path / "two.onnx.data").stat().st_size
    assert data == W.nbytes
    bytes_row = next(line for line in out.splitlines() if line.startswith("bytes on disk"))
    assert f"{two.stat().st_size + data:,}" in bytes_row


def test_inspect_counts_the_data_file(tmp_path, capsys):
    src = external_model(tmp_path)
    code, out, err = run(capsys, "inspect", src)
    assert code == 0, err
    total = src.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert f"({total:,} bytes)" in out


def test_stats_of_an_external_model_equal_those_of_the_inline_one(tmp_path):
    src = external_model(tmp_path)
    inline = model_stats(tiny_model())
    proto, files = modelio.load_unread(src)
    assert proto.graph.initializer[0].data_location == TensorProto.EXTERNAL  # not read into memory
    external = model_stats(proto, model_path=src)
    assert (external.params, external.nonzeros, external.macs, external.layers) == \
        (inline.params, inline.nonzeros, inline.macs, inline.layers)
    assert files == {os.path.realpath(tmp_path / "m.onnx.data")}


def test_load_ir_maps_external_weights_lazily(tmp_path):
    src = external_model(tmp_path)
    loaded = modelio.load_ir(src)
    tensor = loaded.model.graph.initializers["W"].const_value
    assert tensor.__class__.__name__ == "ExternalTensor"
    assert np.array_equal(tensor.numpy(), W)
    assert loaded.external and loaded.disk_bytes == src.stat().st_size + W.nbytes


def test_output_over_the_protobuf_limit_is_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 1000)  # stands for 2 GB: W alone is 31 KB
    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), src)
    out = tmp_path / "out.onnx"
    result = api.optimize(src, out, validate=False)
    assert result.ok
    assert _locations(out) == {"out.onnx.data"}


@pytest.mark.parametrize("location", ["../m.onnx.data", "/tmp/m.onnx.data"])
def test_traversal_is_refused_before_anything_is_written(location, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    src = external_model(folder)
    os.replace(folder / "m.onnx.data", tmp_path / "m.onnx.data")
    model = onnx.load_model(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", src, "-o", out, "--no-validate")
    assert_user_error(code, err, "refused")
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()


def test_output_data_file_may_not_be_the_inputs(tmp_path, capsys):
    src = external_model(tmp_path, location="out.onnx.data")
    before = sha(tmp_path / "out.onnx.data")
    out = tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", src, "-o", out, "--no-validate")
    assert_user_error(code, err, "refusing to overwrite a file of the input model (out.onnx.data)")
    assert not out.exists() and sha(tmp_path / "out.onnx.data") == before


def test_failed_write_leaves_neither_file(tmp_path, capsys):
    """The data file cannot be put in place (a folder has its name): refused before writing, no
    model file appears either."""
    src = external_model(tmp_path)
    out = tmp_path / "out.onnx"
    (tmp_path / "out.onnx.data").mkdir()
    (tmp_path / "out.onnx.data" / "keep").write_text("x")
    code, _, err = run(capsys, "optimize", src, "-o", out, "--no-validate")
    assert_user_error(code, err, "out.onnx.data: is a directory")
    assert not out.exists()
    assert (tmp_path / "out.onnx.data" / "keep").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
