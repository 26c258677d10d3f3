#!/usr/bin/env bash
# Every GPU check of the speed/memory and QLoRA work in one call on a lent H100/H200 (carry .whl; see
# fetch_gpu_wheels.sh): the four GPU presets side by side with TRL (our arm on its CUDA default,
# FlexAttention), our full fine-tune on SDPA with a dense mask for comparison, then the layout
# equivalence on the GPU. Each piece has its own time limit, in order of importance;
# results land in $OUT as they are made (8 files at most come back).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate, trl, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, trl.__version__, bitsandbytes.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
PRESETS=${PRESETS:-gpu-full,gpu-full-ckpt,gpu-lora,gpu-qlora}
timeout ${BENCH_S:-330} python3 benchmarks/bench_dpo.py --preset "$PRESETS" --repeats 1 --arm-timeout 150 \
    --out "$OUT/gpu.jsonl" --log-dir /tmp/bench-logs ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
timeout ${SDPA_S:-100} python3 benchmarks/bench_dpo.py --preset gpu-full --arms ours --repeats 1 \
    --ours-args "flex_attention=false" --arm-timeout 95 --out "$OUT/gpu.jsonl" --log-dir /tmp/bench-logs-sdpa \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/sdpa.txt"
tar czf "$OUT/bench-logs.tgz" -C /tmp bench-logs bench-logs-sdpa 2>/dev/null
timeout ${LAYOUT_S:-75} python3 benchmarks/gpu_layouts.py --impls ${LAYOUT_IMPLS:-sdpa,flex_attention} --out "$OUT/layouts.json" 2>&1 | tail -30 | tee "$OUT/layouts.txt"
