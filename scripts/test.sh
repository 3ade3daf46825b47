#!/usr/bin/env bash
# Set up and run the test suite in both environments (what CI runs), full one first:
#   full: .venv, Python 3.11, onnxdns[train,zoo,test] on the pinned stack (scripts/setup.sh): all tests;
#   core: .venv-core, Python 3.13, onnxdns[cpu,test] with the newest onnx, onnx-ir and onnxruntime,
#         no torch (scripts/setup_core.sh): every test not marked torch or train.
# Extra arguments go to pytest in both runs (e.g. tests/test_cli.py -k optimize). Prints the time
# of each part; exits non-zero if either run fails. ONNXDNS_TEST_ENVS=full (or core) runs one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
envs=${ONNXDNS_TEST_ENVS:-full core}
status=0
summary=()

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
versions() { "$1" -c 'import sys, importlib.metadata as m
names = ("onnx", "onnx-ir", "onnxruntime", "onnxruntime-training-cpu", "torch", "numpy")
found = []
for n in names:
    try: found.append(f"{n} {m.version(n)}")
    except m.PackageNotFoundError: pass
print(f"Python {sys.version.split()[0]}: " + ", ".join(found))'; }

# pytest exit status 5 ("no tests collected") is an error for the suite as a whole, but expected
# when the arguments select only tests of the other environment.
run_pytest() {
  local python=$1; shift
  set +e
  "$python" -m pytest -q "$@"
  local rc=$?
  set -e
  if [ "$rc" = 5 ] && [ "$NARGS" -gt 0 ]; then
    echo "(no tests selected in this environment)"; rc=0
  fi
  return "$rc"
}
NARGS=$#

for env in $envs; do
  start=$(now)
  case $env in
    full)
      source scripts/setup.sh
      python=.venv/bin/python
      # what the markers rely on: in this environment nothing may be skipped for a missing part
      "$python" -c 'import torch, onnxruntime.training' ;;
    core)
      bash scripts/setup_core.sh
      python=.venv-core/bin/python ;;
    *) echo "unknown environment '$env' (full, core)"; exit 2 ;;
  esac
  setup_s=$(since "$start")
  echo "==> $env environment ($(versions "$python")); set-up ${setup_s} s"
  start=$(now)
  rc=0
  if [ "$env" = full ]; then
    run_pytest "$python" "$@" || rc=$?
  else
    PATH="$root/.venv-core/bin:$PATH" run_pytest "$python" -m "not torch and not train" "$@" || rc=$?
  fi
  test_s=$(since "$start")
  summary+=("$env environment: set-up ${setup_s} s, tests ${test_s} s, exit status $rc")
  [ "$rc" = 0 ] || status=1
done

echo "==> summary"
printf '    %s\n' "${summary[@]}"
exit "$status"
