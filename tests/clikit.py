"""Helpers of the command-line tests: run ``onnxdns`` in-process, check a user error's one line."""

from __future__ import annotations

from onnxdns.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """``onnxdns ARGS`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, fragment: str = "") -> None:
    """Exit status 2 and exactly one line ``onnxdns: error: ...`` holding ``fragment``."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxdns: error: ")
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
