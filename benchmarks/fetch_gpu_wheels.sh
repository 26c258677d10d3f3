#!/usr/bin/env bash
# Download, into .whl/, the pure-Python wheels the lent GPU machine lacks (it has torch, transformers,
# peft, accelerate, pyarrow, pandas, xxhash, but not datasets, dill, multiprocess or trl).
# Run it here, then carry .whl to the GPU machine and run benchmarks/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0
ls -la .whl
