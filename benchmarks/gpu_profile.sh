#!/usr/bin/env bash
# Where the GPU step's time goes, before any speed work (one call on a lent H100/H200; carry .whl, see
# fetch_gpu_wheels.sh): each GPU preset, both arms, with the step split into collation, attention mask,
# policy forward, chunked LM head, reference forward, backward and optimizer (`bench_dpo.py --profile`,
# device synchronised around each part), and a torch.profiler trace of each arm's last timed step.
# Then the token-budget sweep of our default path (pairs/s and MFU against max_tokens_per_batch).
#   CPU dry run of the same script:  TINY=1 bash benchmarks/gpu_profile.sh
set -uo pipefail
if [[ -z ${TINY:-} ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  PRESETS=${PRESETS:-gpu-full,gpu-lora,gpu-qlora}; SWEEP_PRESET=gpu-full; SIZE=()
else
  PRESETS=cpu; SWEEP_PRESET=cpu; SIZE=(--tiny --wait-idle 0)
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout ${PROFILE_S:-360} python3 benchmarks/bench_dpo.py --preset "$PRESETS" --repeats ${REPEATS:-1} "${SIZE[@]}" \
    --profile --trace-dir "$OUT/traces" --arm-timeout 150 --out "$OUT/profile.jsonl" --log-dir /tmp/profile-logs \
    2>&1 | tee "$OUT/profile.txt"
for budget in ${BUDGETS:-4096 8192 16384 32768}; do
  timeout ${SWEEP_S:-100} python3 benchmarks/bench_dpo.py --preset "$SWEEP_PRESET" --arms ours --repeats 1 "${SIZE[@]}" \
      --ours-args "max_tokens_per_batch=$budget" --arm-timeout $(( ${SWEEP_S:-100} - 5 )) --out "$OUT/budget.jsonl" \
      --log-dir "/tmp/budget-logs-$budget" 2>&1 | grep -E "ours +|pairs/s" | tee -a "$OUT/budget.txt"
done
[[ -d "$OUT/traces" ]] && (cd "$OUT" && tar czf traces.tgz traces && rm -rf traces)
