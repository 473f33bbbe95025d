#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh needs on a GPU machine without network that already has torch and
# transformers, for python 3.12 x86_64, into .whl/ (ignored by git: .git/info/exclude has /.whl/). Copy the
# checkout with .whl/ to that machine; gpu_check.sh installs them into /tmp/site (docs/gpu_check.md).
#   plotly    the analyzers' HTML report (not on the machine)
#   narwhals  plotly's one dependency (on the machine, version unknown: carried so plotly gets the one it is tested with)
#   nvtx      kvtrace's NVTX ranges (not on the machine; a no-op without Nsight attached, but the import path runs)
# Assumed installed there: numpy, tqdm, torch, transformers, tensorboard, tiktoken. Not needed by gpu_check:
# llama-models (tokenizer; the check feeds random token ids), torch-tb-profiler.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  plotly==7.1.0 narwhals==2.29.0 nvtx==0.2.17
ls -l .whl
du -cb .whl/*.whl | tail -1 | awk '{printf "total %.1f MiB\n", $1 / 1048576}'
for w in .whl/*.whl; do
  echo "$w requires: $(unzip -p "$w" '*/METADATA' | grep ^Requires-Dist | grep -v extra | tr '\n' ' ')"
done
