#!/usr/bin/env bash
# Every GPU check of the speed/memory issue in one call on a lent H100/H200 (carry .whl; see
# fetch_gpu_wheels.sh): the layout tests on the GPU, then the three GPU presets side by side with TRL.
# Results land in $OUT (8 files at most come back).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -x tests/test_layouts.py tests/test_logprobs.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
python3 benchmarks/bench_dpo.py --preset gpu-full,gpu-full-ckpt,gpu-lora --repeats 1 \
    --out "$OUT/gpu.jsonl" --log-dir /tmp/bench-logs 2>&1 | tee "$OUT/bench.txt"
tar czf "$OUT/bench-logs.tgz" -C /tmp bench-logs 2>/dev/null
