#!/usr/bin/env bash
# kvtrace's CUDA checks (docs/gpu_check.md): run from the root of a checkout on a machine with one GPU.
# Wheels in .whl/ (from benchmarks/fetch_gpu_wheels.sh, for a machine without network) are installed first.
# Everything it keeps goes to $OUT: log.txt, summary.json, summary.md and at most 5 .tar.gz run directories.
set -o pipefail
OUT=${OUT:-$PWD/gpu_check_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; \
  python3 -c 'import torch, transformers, plotly; print("torch", torch.__version__, "transformers", transformers.__version__, "plotly", plotly.__version__)'; } 2>&1 | tee "$OUT/log.txt"
# BUDGET_S: seconds after which no step starts (default 440); STEPS: which steps, in order (default all).
BUDGET_S=${BUDGET_S:-440}
PYTHONUNBUFFERED=1 timeout $((BUDGET_S + 30)) python3 benchmarks/gpu_check.py --out "$OUT" --budget-s "$BUDGET_S" \
  ${STEPS:+--steps "$STEPS"} 2>&1 | tee -a "$OUT/log.txt"
