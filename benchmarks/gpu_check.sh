#!/usr/bin/env bash
# One-call GPU check, for an H100/H200 machine with CUDA 13, Python 3.12, torch, triton, nvcc,
# pybind11, cmake and ninja and no package index:
#   1. build cbtm with CUDA (pip install --no-index --no-build-isolation --no-deps -e .),
#   2. pytest -m gpu,
#   3. the GPU sections of the assign, mixture, ensemble and generate suites (benchmarks/run.py --device cuda),
#      which write benchmarks/results/<suite>-cuda.json,
# each step under its own timeout and all of them within TOTAL_S seconds (default 470), logs and
# a summary in LOGS (default benchmarks/results/gpu_check/); with GPU_CHECK_OUT=DIR the results,
# the summary and a tarball of the logs are also copied there. It only reads the GPU's state
# (nvidia-smi queries); it never resets or reconfigures the GPU.
#
#   benchmarks/gpu_check.sh --dry-run
# runs the same steps on this machine's CPU so that a typo cannot waste the GPU slot: the shell
# checks (bash -n, shellcheck when installed), the build prerequisites without rebuilding, the gpu
# tests (collected, then skipped), the mixture tests with Triton under TRITON_INTERPRET=1, every
# suite's code at --device cpu --quick,
# and the CUDA sections' own code (assign section 4, the CUDA mixture cases with the Triton kernels
# and torch.compile) on CPU tensors at small sizes. Results go to a temporary directory.
# shellcheck disable=SC2016  # the single-quoted bash -c scripts read their own positional arguments
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
SUITES=(assign mixture ensemble generate)
case "${1:-}" in
  --dry-run)  # the CPU is far slower than the GPU machine: a generous overall limit
    DRY=1 DEVICE=cpu TOTAL_S=${TOTAL_S:-3600} LOGS=$(mktemp -d)
    RESULTS=$LOGS/results ;;
  "")
    DRY=0 DEVICE=cuda TOTAL_S=${TOTAL_S:-470} LOGS=${LOGS:-benchmarks/results/gpu_check}
    RESULTS=benchmarks/results ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$LOGS"
SUMMARY=$LOGS/summary.md
start=$SECONDS
failures=0

# step NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, time left), its output in LOGS/NAME.log
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((TOTAL_S - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "| $name | skipped: out of time | 0 |" >>"$SUMMARY"
    failures=$((failures + 1))
    return
  fi
  local t0=$SECONDS rc status
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  if ((rc != 0)); then
    failures=$((failures + 1))
    tail -n 25 "$LOGS/$name.log"
  fi
  echo "| $name | $status | $((SECONDS - t0)) |" >>"$SUMMARY"
}

{
  echo "# GPU check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$( ((DRY)) && echo ' (dry run on CPU)')"
  echo
  echo "| step | result | s |"
  echo "| --- | --- | ---: |"
} >"$SUMMARY"

if ((DRY)); then
  step shell 30 bash -c 'bash -n "$0" && if command -v shellcheck >/dev/null; then shellcheck "$0"; else echo "shellcheck not installed"; fi' "$0"
  step build-prerequisites 60 bash -c '
    "$0" -c "import setuptools, pybind11, torch, triton; import cbtm._C, cbtm.ops; print(\"torch\", torch.__version__, \"triton\", triton.__version__)" &&
    command -v cmake && { command -v ninja || "$0" -c "import ninja"; } &&
    { command -v nvcc && nvcc --version | tail -n 1 || echo "nvcc not found: the GPU build needs it"; }' "$PY"
  step tests 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider  # collected, skipped without a GPU
  step triton-interpreted 900 env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_mixture.py
  for suite in "${SUITES[@]}"; do
    step "$suite" 900 "$PY" benchmarks/run.py --suite "$suite" --device cpu --quick --out "$RESULTS"
  done
  step cuda-sections-on-cpu 900 env TRITON_INTERPRET=1 "$PY" - <<'EOF'
"""The CUDA-only code of the suites, run on CPU tensors at small sizes."""
import argparse
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.suites import assign, mixture  # noqa: E402

args = argparse.Namespace(quick=True, repeats=1, device="cpu")
rows = []
print(assign._cuda(args, rows, "cpu", (4096, 8192)))
print(assign._cuda_goals(rows))
cases = [(2, V, k, dtype, routing) for _, V, k, dtype, routing in mixture.FULL_CUDA[-1:] + mixture.TARGET_CUDA[-1:]]
rows = []
print(mixture._section(cases[:1], True, "cpu", args, 1.0, rows, True))
print(mixture._section(cases[1:], False, "cpu", args, 1.0, rows, True))
print(mixture._goals(rows, True))
assert {r["method"] for r in rows} == {"triton", "torch fallback", "torch compile", "naive"}, rows
assert max(r["max_abs_err"] for r in rows) < 1e-3, rows
EOF
else
  step environment 30 bash -c '
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
    nvcc --version | tail -n 1 &&
    "$0" -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())"' "$PY"
  step build 240 env CBTM_CUDA=1 CBTM_CUDA_ARCHS="${CBTM_CUDA_ARCHS:-90a}" bash -c '
    "$0" -m pip install --no-index --no-build-isolation --no-deps -e . &&
    "$0" -c "from cbtm import ops, _cuda; assert ops.cuda_available(), _cuda.device_status(); print(\"cbtm._cuda ready\")"' "$PY"
  step tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider
  for suite in "${SUITES[@]}"; do
    step "$suite" 180 "$PY" benchmarks/run.py --suite "$suite" --device cuda
  done
fi

{
  echo
  echo "Total $((SECONDS - start)) s; $failures step(s) not ok. Goals:"
  echo
  "$PY" - "$RESULTS" "$DEVICE" "${SUITES[@]}" <<'EOF'
import json
import sys
from pathlib import Path

results, device = Path(sys.argv[1]), sys.argv[2]
for suite in sys.argv[3:]:
    path = results / f"{suite}-{device}.json"
    if not path.exists():
        print(f"- {suite}: no {path}")
        continue
    for g in json.loads(path.read_text())["goals"]:
        print(f"- {suite}: {g['goal']}: {g['measured']} (target {g['target']}, met: {g['met']})")
EOF
} >>"$SUMMARY" 2>&1
cat "$SUMMARY"

if [[ -n ${GPU_CHECK_OUT:-} ]]; then
  mkdir -p "$GPU_CHECK_OUT"
  cp "$SUMMARY" "$GPU_CHECK_OUT/"
  for suite in "${SUITES[@]}"; do
    cp "$RESULTS/$suite-$DEVICE.json" "$GPU_CHECK_OUT/" 2>/dev/null
  done
  tar -czf "$GPU_CHECK_OUT/gpu_check_logs.tar.gz" -C "$LOGS" --exclude=results .
fi
((failures == 0))
