"""The stage cache (``onnxdns.workflows.stages``): reuse, invalidation, atomic records."""

from __future__ import annotations

import json
import logging

import pytest

from onnxdns.workflows.stages import Stage, jsonable


def make(tmp_path, calls, config=None, name="train"):
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"

    def run():
        calls.append(name)
        dst.write_bytes(src.read_bytes() + b"!")
        return {"value": 1.5, "tuple": (1, 2)}

    return Stage(name, config or {"lr": 0.1}, [src], [dst], run, tmp_path / "stages")


def test_reused_until_config_input_or_output_changes(tmp_path):
    (tmp_path / "in.bin").write_bytes(b"abc")
    calls: list[str] = []
    first = make(tmp_path, calls)
    assert first() == {"value": 1.5, "tuple": [1, 2], "stage_seconds": first()["stage_seconds"]}
    assert calls == ["train"] and first.reused
    make(tmp_path, calls)()
    assert calls == ["train"]
    make(tmp_path, calls, {"lr": 0.2})()  # another setting
    assert calls == ["train"] * 2
    (tmp_path / "in.bin").write_bytes(b"abd")  # another input
    make(tmp_path, calls, {"lr": 0.2})()
    assert calls == ["train"] * 3
    (tmp_path / "out.bin").write_bytes(b"tampered")  # its output changed
    make(tmp_path, calls, {"lr": 0.2})()
    assert calls == ["train"] * 4
    record = json.loads((tmp_path / "stages" / "train.json").read_text())
    src = str((tmp_path / "in.bin").resolve())  # outside the record folder: an absolute path
    assert record["key"] == {"config": {"lr": 0.2}, "inputs": {src: record["key"]["inputs"][src]}}


def test_a_failed_run_leaves_no_record_and_a_damaged_record_is_redone(tmp_path, caplog):
    (tmp_path / "in.bin").write_bytes(b"abc")
    calls: list[str] = []
    make(tmp_path, calls)()
    stage = make(tmp_path, calls, {"lr": 0.3})
    stage.run = lambda: 1 / 0
    with pytest.raises(ZeroDivisionError):
        stage()
    assert not (tmp_path / "stages" / "train.json").exists()
    (tmp_path / "stages" / "train.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        make(tmp_path, calls)()
    assert calls == ["train"] * 2 and "unreadable stage record" in caplog.text


def test_jsonable():
    import numpy as np

    assert jsonable({"a": (1, np.float32(2.5)), "b": float("nan"), "c": np.arange(2)}) == {"a": [1, 2.5], "b": None,
                                                                                        "c": [0, 1]}
