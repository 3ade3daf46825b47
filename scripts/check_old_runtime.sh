#!/usr/bin/env bash
# Manual check (not in CI: it downloads onnxruntime 1.17): a model optimized in the core
# environment (newest onnx, onnx-ir, onnxruntime; scripts/setup_core.sh) still loads and gives the
# same outputs in onnxruntime 1.17, the oldest release onnxdns[cpu] allows. The model is the
# residual-add + concat net of tests/test_install.py (IR 7, opset 13) with zeroed channels.
# Needs Python 3.11 (onnxruntime 1.17 wheels stop at 3.11). Usage: bash scripts/check_old_runtime.sh [VERSION]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
version=${1:-1.17.3}
work=${TMPDIR:-/tmp}/onnxdns-old-runtime
mkdir -p "$work"

bash scripts/setup_core.sh
PYTHONPATH=tests .venv-core/bin/python -c "
import onnx, sys
from test_install import residual_concat_model
onnx.save(residual_concat_model(), '$work/in.onnx')"
.venv-core/bin/onnxdns optimize "$work/in.onnx" -o "$work/out.onnx" --quiet >/dev/null

if [ ! -x "$work/venv/bin/python" ]; then
  python3.11 -m venv "$work/venv"
fi
"$work/venv/bin/python" -m pip install -q "onnxruntime==$version" "numpy<2"
"$work/venv/bin/python" - "$work/in.onnx" "$work/out.onnx" <<'PY'
import sys
import numpy as np
import onnxruntime as ort

x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
outs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in sys.argv[1:]]
diff = float(np.max(np.abs(outs[0] - outs[1])))
print(f"onnxruntime {ort.__version__}: input and optimized model load; max abs diff {diff:.3g}")
sys.exit(0 if diff <= 1e-5 * max(1.0, float(np.max(np.abs(outs[0])))) else 1)
PY
