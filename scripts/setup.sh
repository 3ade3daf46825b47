#!/usr/bin/env bash
# Set up everything onnxdns needs on a fresh Debian machine: the Fashion-MNIST package (when
# root can install it) and the full environment: a Python 3.11 virtual environment in .venv with
# onnxdns and all its extras (train, zoo, test) plus torchvision on the pinned stack of scripts/constraints-full.txt
# (onnxruntime-training-cpu 1.19.2, onnx 1.16.2, torch 2.13.0; see docs/stack.md).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "==> installing Debian package dataset-fashion-mnist"
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "the full environment needs Python 3.11 (onnxruntime-training 1.19.2, torch 2.13.0 on disk)"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $python"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c 'import onnxdns, onnxruntime.training, torch, onnx_graphsurgeon, pytest, PIL' >/dev/null 2>&1; then
  echo "==> installing onnxdns[train,zoo,test] and its pinned stack into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[train,zoo,test]' -c scripts/constraints-full.txt
fi
export PATH="$root/.venv/bin:$PATH"

# ---- torchvision, for benchmarks/torchvision_fmnist.py and tests/test_torchvision_*.py ----------
# A user's model exported the usual way (issue 11). Not in an extra: onnxdns itself never imports
# it. 0.28.0 is the release built against torch 2.13.0 (pinned in scripts/constraints-full.txt).
# The wheel is CUDA-built: beside the CPU torch wheel its C++ ops do not load and a plain
# `import torchvision` stops on pytorch/vision#9085; import_torchvision() in
# benchmarks/torchvision_fmnist.py works around it (the models are pure Python).
if ! .venv/bin/python -c 'import importlib.metadata as m; m.version("torchvision")' >/dev/null 2>&1; then
  echo "==> installing torchvision into .venv"
  .venv/bin/python -m pip install -q torchvision -c scripts/constraints-full.txt
fi

# ---- real models for the validation tests (tests/realmodels.py) --------------------------------
# Trained ONNX models others made, shipped in wheels: PP-OCR detector/classifier/recognizer
# (rapidocr-onnxruntime) and the Silero voice activity detector (silero-vad). --no-deps: their
# dependencies would pull plain onnxruntime, which must never sit beside onnxruntime-training-cpu.
if ! .venv/bin/python -c 'import importlib.metadata as m; m.version("rapidocr-onnxruntime"); m.version("silero-vad")' >/dev/null 2>&1; then
  echo "==> installing the real test models (rapidocr-onnxruntime, silero-vad) with --no-deps"
  .venv/bin/python -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3
fi
# ---- end of real models ---------------------------------------------------------------------------
