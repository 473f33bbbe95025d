#!/usr/bin/env bash
# Issue 6 on the nvidia-h200 device machine, in one call of the device tool's `run`:
#   command: bash benchmarks/gpu_check.sh     carry: [".whl"]     timeout_s: 540
# (.whl/ comes from benchmarks/fetch_gpu_wheels.sh, run first on the CPU machine; docs/gpu_check.md.)
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
PYTHONUNBUFFERED=1 timeout 470 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
