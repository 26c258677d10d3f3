#!/usr/bin/env bash
# examples/hh.py end to end on a lent GPU (`accelerate launch`, one process per GPU), on a model of
# Pythia-2.8B's shape (GPTNeoX, 32 layers, width 2560, vocabulary 50304; random init, bf16 weights, LoRA
# DPO): SFT, DPO and the evaluation stage with its sampling on the GPU, each stage's time printed at the
# end and written to $OUT/times.json. Nothing can be downloaded there, so the model is built and saved
# locally with a byte-level BPE tokenizer trained on the bundled HH data; the bundled data and its rule
# judge are used. Carry .whl (benchmarks/fetch_gpu_wheels.sh: datasets, trl, transformers 5.24, ...).
#
#   bash benchmarks/gpu_hh.sh              # on the GPU machine; about 4-6 minutes on one H200
#   TINY=1 bash benchmarks/gpu_hh.sh       # a tiny GPTNeoX on the CPU: checks the script runs (tests)
#
# Settings (environment): NPROC (processes, default: the GPUs seen), STEPS (SFT and DPO steps, 20),
# PROMPTS (held-out prompts sampled, 128), NEW_TOKENS (64), BON (Best-of-N, 4), HH_S (time limit, 480 s),
# HH_ARGS (more hh.py flags), PYTHON (python3). Results in $OUT: times.json, hh.log (the run's last 200
# lines), summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=${TINY:-0}; PYTHON=${PYTHON:-python3}; SITE=
if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    SITE=/tmp/site:
fi
export PYTHONPATH=$SITE$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; RUN=${RUN:-/tmp/gpu-hh}; mkdir -p "$OUT"; rm -rf "$RUN"; mkdir -p "$RUN"
if [ "$TINY" = 1 ]; then
    NPROC=1; STEPS=${STEPS:-2}; PROMPTS=${PROMPTS:-4}; NEW_TOKENS=${NEW_TOKENS:-8}; BON=${BON:-2}
    LAUNCH=(--cpu --num_processes 1 --mixed_precision no)
    PRECISION=(--use_cpu --per_device_train_batch_size 2 --per_device_eval_batch_size 4 --max_eval_rows 8
               --max_length 128 --max_prompt_length 64)
else
    NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}; STEPS=${STEPS:-20}; PROMPTS=${PROMPTS:-128}
    NEW_TOKENS=${NEW_TOKENS:-64}; BON=${BON:-4}
    LAUNCH=(--num_processes "$NPROC" --mixed_precision bf16 $([ "$NPROC" -gt 1 ] && echo --multi_gpu))
    PRECISION=(--bf16 --model_init_kwargs '{"dtype": "bfloat16"}' --per_device_train_batch_size 8
               --per_device_eval_batch_size 64 --max_eval_rows 64)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      $PYTHON -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
    } 2>&1 | tee "$OUT/gpu.txt"
fi

started=$(date +%s.%N)
TINY=$TINY $PYTHON - "$RUN/base" <<'PY' || exit 1
"""A GPTNeoX of Pythia-2.8B's shape (or a tiny one), random init, saved with a tokenizer trained on the
bundled HH data. Built on the GPU in bf16 when there is one."""
import json, os, sys, time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dpo_trainer.testing import train_tokenizer

started = time.time()
with open("examples/data/hh_tiny/train.jsonl") as handle:
    rows = [json.loads(line) for line in handle]
tokenizer = train_tokenizer((row["chosen"] + row["rejected"] for row in rows), vocab_size=8000)
tiny = os.environ["TINY"] == "1"
tiny_vocab = -(-len(tokenizer) // 128) * 128
shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=tiny_vocab) \
    if tiny else dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240, vocab_size=50304)
config = GPTNeoXConfig(
    **shape, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
)
assert len(tokenizer) <= config.vocab_size, (len(tokenizer), config.vocab_size)  # Pythia's head is wider too
device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
torch.manual_seed(0)
with torch.device(device):
    model = GPTNeoXForCausalLM(config).to(torch.float32 if tiny else torch.bfloat16)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
print(f"[build] GPTNeoX, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {model.dtype}, "
      f"tokenizer of {len(tokenizer)} tokens, built and saved in {time.time() - started:.0f}s")
PY
built=$(date +%s.%N)

timeout "${HH_S:-480}" $PYTHON -m accelerate.commands.launch "${LAUNCH[@]}" examples/hh.py \
    --model "$RUN/base" --output_dir "$RUN/run" --max_train_rows 512 "${PRECISION[@]}" \
    --sft_max_steps "$STEPS" --sft_learning_rate 1e-5 --max_steps "$STEPS" --learning_rate 5e-6 \
    --logging_steps 5 --save_steps 100000 --report_to none --disable_tqdm true \
    --eval_prompts "$PROMPTS" --temperatures 0.7,1.0 --bon_n "$BON" --max_new_tokens "$NEW_TOKENS" \
    ${HH_ARGS:-} > "$RUN/hh.log" 2>&1
status=$?
finished=$(date +%s.%N)
tail -200 "$RUN/hh.log" > "$OUT/hh.log"
grep -E '^\[(sft|dpo|pairs|eval)\]' "$RUN/hh.log"
echo "hh.py: exit $status"
cp "$RUN/run/summary.json" "$OUT/" 2>/dev/null
$PYTHON - "$RUN/run" "$OUT/times.json" "$started" "$built" "$finished" "$status" "$NPROC" <<'PY'
"""Each stage's seconds: the build timed here, SFT and DPO from their done.json, eval from summary.json."""
import json, os, sys

run, path, started, built, finished, status, nproc = sys.argv[1:]


def seconds(*parts):
    try:
        with open(os.path.join(run, *parts)) as handle:
            return json.load(handle).get("seconds")
    except (OSError, ValueError):
        return None


summary = {}
try:
    with open(os.path.join(run, "summary.json")) as handle:
        summary = json.load(handle)
except (OSError, ValueError):
    pass
times = {
    "processes": int(nproc),
    "build_and_save_model": float(built) - float(started),
    "sft": seconds("sft", "done.json"),
    "dpo": seconds("dpo", "done.json"),
    "eval": (summary.get("eval") or {}).get("seconds"),
    "hh_py_wall": float(finished) - float(built),
    "exit": int(status),
}
with open(path, "w") as handle:
    json.dump(times, handle, indent=2)
print("stage seconds: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in times.items()))
PY
exit "$status"
