#!/usr/bin/env bash
# DeepSpeed ZeRO-3 and FSDP2 against a plain single device, on one lent GPU, through the accelerate
# configs in examples/accelerate/ (each arm: `accelerate launch --num_processes 1 --config_file ...`).
# Each arm trains the same 19M-parameter Llama for 8 DPO steps (float32, plain SGD, a separate frozen
# reference model) with an evaluation before and after; `gpu_engines.py compare` then checks per-step
# losses, DPO metrics, evaluations and final weights against the single-device arm and that the engines
# really sharded policy and reference, and prints a VERDICT line (exit 1 if any arm differs).
# Needs the wheels of benchmarks/fetch_gpu_wheels.sh (carry .whl). About 3-4 minutes; results in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl/engines/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; RUN=/tmp/gpu-engines; mkdir -p "$OUT"; rm -rf "$RUN"; mkdir -p "$RUN"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate, deepspeed; print(torch.__version__, transformers.__version__, accelerate.__version__, deepspeed.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
arm() {  # name, config file: one process, full precision (the configs' bf16 would blur the comparison)
    timeout "${ARM_S:-240}" python3 -m accelerate.commands.launch --num_processes 1 --mixed_precision no \
        --config_file "examples/accelerate/$2" benchmarks/gpu_engines.py train --arm "$1" --out "$RUN" \
        ${ENGINE_ARGS:-} > "$RUN/$1.log" 2>&1
    echo "$1: exit $?"; tail -60 "$RUN/$1.log" > "$OUT/$1.log"
}
arm single single_gpu.yaml
arm zero3 deepspeed_zero3.yaml
arm fsdp2 fsdp2.yaml
python3 benchmarks/gpu_engines.py compare --out "$RUN" 2>&1 | tee "$OUT/verdict.txt"
status=${PIPESTATUS[0]}
cp "$RUN"/*.json "$OUT/" 2>/dev/null
exit "$status"
