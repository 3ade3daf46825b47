#!/usr/bin/env bash
# Set up the core environment: .venv-core with Python 3.13 and `pip install -e '.[cpu,test]'`, i.e.
# the compiler with the newest onnx, onnx-ir and onnxruntime and no torch, as a user who does not
# train gets it. scripts/test.sh runs every test that needs neither torch nor onnxruntime-training
# there. Python 3.13 comes from $CORE_PYTHON, python3.13 on PATH, or pyenv. Safe to run again;
# delete .venv-core to pick up newer releases.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

is_313() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1; }
python=""
candidates=("${CORE_PYTHON:-}" python3.13)
if command -v pyenv >/dev/null 2>&1; then
  for p in "$(pyenv root)"/versions/3.13*/bin/python; do candidates+=("$p"); done
fi
for candidate in "${candidates[@]}"; do
  if [ -n "$candidate" ] && is_313 "$candidate"; then python=$candidate; break; fi
done
[ -n "$python" ] || { echo "the core environment needs Python 3.13 (set CORE_PYTHON, or install it with pyenv)"; exit 1; }

if [ ! -x .venv-core/bin/python ]; then
  echo "==> creating .venv-core with $python"
  "$python" -m venv .venv-core
fi
if ! .venv-core/bin/python -c 'import onnxdns, onnxruntime, onnx_graphsurgeon, pytest, PIL' >/dev/null 2>&1; then
  echo "==> installing onnxdns[cpu,test] with the newest onnx, onnx-ir and onnxruntime into .venv-core"
  .venv-core/bin/python -m pip install -q --upgrade pip
  .venv-core/bin/python -m pip install -q --upgrade -e '.[cpu,test]'
fi
if .venv-core/bin/python -c 'import torch' >/dev/null 2>&1; then
  echo "the core environment must not have torch (something pulled it in)"; exit 1
fi
# The same trained test models as the full environment (see scripts/setup.sh), --no-deps; the
# rapidocr wheel is pure Python but declares Python < 3.13, hence --ignore-requires-python.
if ! .venv-core/bin/python -c 'import importlib.metadata as m; m.version("rapidocr-onnxruntime"); m.version("silero-vad")' >/dev/null 2>&1; then
  echo "==> installing the real test models (rapidocr-onnxruntime, silero-vad) with --no-deps into .venv-core"
  .venv-core/bin/python -m pip install -q --no-deps --ignore-requires-python rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3
fi
