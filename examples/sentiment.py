"""The paper's controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1, App. C.1): the reward/KL frontier.

    python examples/sentiment.py                 # offline: tiny model, bundled reviews_tiny data, VADER reward
    accelerate launch examples/sentiment.py      # the same under accelerate
    python examples/sentiment.py --model "$(python -c 'from dpo_trainer.testing import smollm2_path; print(smollm2_path())')" \\
        --sft_max_steps 10 --sft_learning_rate 1e-4 --max_steps 10 --per_device_train_batch_size 4 \\
        --learning_rate 5e-4 --betas 0.5 --methods dpo,preferred_ft --pair_prompts 16 --eval_prompts 24 \\
        --bon_n 1,2,4 --max_new_tokens 32 --max_length 96 --max_prompt_length 32 \\
        --per_device_eval_batch_size 32 --output_dir runs/smollm2   # SmolLM2-135M-Instruct (LoRA), CPU smoke run
    accelerate launch examples/sentiment.py --model gpt2-large --dataset imdb \\
        --reward_model siebert/sentiment-roberta-large-english --betas 0.05,0.1,0.5,1,5 \\
        --learning_rate 1e-6 --bf16 --output_dir runs/imdb-gpt2-large

Stages, each resumable (run the same command again: finished stages are skipped, an interrupted training
run resumes from its last complete checkpoint) and skippable (`--skip_sft`, `--skip_train`, `--skip_eval`):

1. **sft**: fine-tune the base model on the reviews (each review's first 2-8 words are the prompt, the
   rest the response).
2. **pairs**: N completions (`--samples_per_prompt`, 4 in the paper) of each training prefix from the SFT
   model at temperature 1; every pair of them whose ground-truth rewards differ is a preference pair
   (the paper's 6 pairs per prefix), the higher-scoring completion chosen.
3. **train**: on those pairs, from the SFT model: DPO at each β of `--betas` (the SFT model as π_ref),
   Preferred-FT (SFT on each prefix's best completion) and Unlikelihood (`dpo_trainer.unlikelihood`).
4. **eval**: held-out prefixes sampled at temperature 1 from the SFT model, each trained policy and
   Best-of-N over the SFT model (every N of `--bon_n` from one draw); the mean ground-truth reward and
   KL(π‖π_ref) = mean of log π(y|x) - log π_ref(y|x) over the samples, each with its standard error
   (Best-of-N: log N - (N-1)/N); a table, `plots/frontier.png` and `summary.json`, with whether DPO's
   reward is at least each baseline's at the baseline's KL.

The ground truth (`--reward_model`) is `vader` (the vaderSentiment lexicon, offline; compound score in
[-1, 1]) or a sequence-classification model: the probability of its `--reward_label` class (the paper's
classifier: siebert/sentiment-roberta-large-english, class POSITIVE), or a reward model's one output.
`--dataset` is a hub id with train and test splits (`imdb`), a local folder with `train` / `test` files
(`.jsonl`, `.json`, `.parquet`), or one local file (5% held out); the review is the `--text_column`.
Every `DPOConfig` flag applies to the DPO runs (`--learning_rate`, `--max_steps`, ...). With no `--model`
a tiny Llama is built from a config with a tokenizer trained on the reviews, and the defaults below suit
it; flags given on the command line win. Each response gets EOS appended in training (as every response
does in this library), so keep `--max_new_tokens` long enough for completions to end on their own.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from dpo_trainer import DPOConfig, DPOTrainer
from run_folder import (
    main_decides,
    mark_done,
    prepare_run_dir,
    read_json,
    require_writable,
    save_history,
    save_pretrained_whole,
    stage_done,
    stage_finished,
    start_stage,
    unwritable,
    wait_for_everyone,
    write_json,
    write_jsonl,
    write_summary,
)

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_DATA = os.path.join(HERE, "data", "reviews_tiny")
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
METHODS = ("dpo", "preferred_ft", "unlikelihood")
UNSET_OUTPUT_DIR = "runs/unset"  # no --output_dir given: a new timestamped folder


@dataclass(frozen=True)
class OfflineDefaults:
    """The offline default run, without --model: a tiny model trained from scratch on the bundled reviews.
    Applied unless given on the command line."""

    max_steps: int = 120
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 128
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 10
    logging_steps: int = 10
    max_length: int = 96
    max_prompt_length: int = 32
    save_steps: int = 60
    seed: int = 0
    sft_max_steps: int = 400
    sft_learning_rate: float = 3e-3
    full: bool = True
    pair_prompts: int = 400
    eval_prompts: int = 200
    betas: str = "0.05,0.1,0.5,1,5"
    bon_n: str = "1,2,4,8,16"
    # a tiny model on the CPU: float32 and no recomputation (DPOConfig's defaults are TRL's: bf16 autocast and
    # activation checkpointing, which a run with --model gets)
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class ScriptArguments:
    dataset: str = field(default=BUNDLED_DATA, metadata={"help": "Hub id, local folder or local file."})
    text_column: str = field(default="text", metadata={"help": "The column holding the review."})
    model: str | None = field(
        default=None, metadata={"help": "Base model (hub id or path); none: a tiny model."}
    )
    sft_model: str | None = field(
        default=None, metadata={"help": "Use this SFT model instead of training one."}
    )
    full: bool = field(default=False, metadata={"help": "Train every weight instead of a LoRA adapter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    sft_max_steps: int = field(default=1000, metadata={"help": "SFT optimizer steps."})
    sft_learning_rate: float = field(default=1e-5, metadata={"help": "SFT learning rate."})
    prefix_words: str = field(
        default="2,8", metadata={"help": "Prompt = the review's first k words, k in this range."}
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Use at most this many training reviews."}
    )
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use at most this many test reviews."})
    pair_prompts: int | None = field(
        default=None, metadata={"help": "Training prefixes sampled (default: all)."}
    )
    samples_per_prompt: int = field(
        default=4, metadata={"help": "Completions per training prefix (paper: 4)."}
    )
    betas: str = field(default="0.05,0.1,0.5,1,5", metadata={"help": "DPO runs, one per β."})
    methods: str = field(
        default="dpo,preferred_ft,unlikelihood", metadata={"help": "What the train stage trains."}
    )
    baseline_learning_rate: float | None = field(
        default=None, metadata={"help": "Preferred-FT and Unlikelihood learning rate (default: DPO's)."}
    )
    unlikelihood_alpha: float = field(default=1.0, metadata={"help": "Weight of the unlikelihood term."})
    eval_prompts: int = field(default=256, metadata={"help": "Held-out prefixes sampled."})
    eval_samples_per_prompt: int = field(
        default=1, metadata={"help": "Samples per held-out prefix and policy."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Longest sampled completion."})
    bon_n: str = field(
        default="1,4,16", metadata={"help": "Best-of-N over the SFT model, these N (empty: none)."}
    )
    reward_model: str = field(default="vader", metadata={"help": "vader, or a classifier / reward model."})
    reward_label: str = field(
        default="positive", metadata={"help": "The classifier's class read as the reward."}
    )
    reward_output: str = field(
        default="probability", metadata={"help": "probability or logit of that class."}
    )
    skip_sft: bool = field(default=False, metadata={"help": "Use --model itself as the SFT model."})
    skip_train: bool = field(default=False, metadata={"help": "Skip the pairs and train stages."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip sampling and scoring."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "Width of the offline tiny model."})
    tiny_layers: int = field(default=2, metadata={"help": "Layers of the offline tiny model."})

    def beta_values(self) -> list[float]:
        return [float(b) for b in self.betas.split(",") if b.strip()]

    def bon_values(self) -> list[int]:
        return [int(n) for n in self.bon_n.split(",") if n.strip()]

    def method_names(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def parse_args(argv: list[str]) -> tuple[ScriptArguments, DPOConfig]:
    parser = HfArgumentParser((ScriptArguments, DPOConfig))
    parser.set_defaults(output_dir=UNSET_OUTPUT_DIR)
    script_args, config = parser.parse_args_into_dataclasses(argv)
    if script_args.model is None:
        parser.set_defaults(**asdict(OfflineDefaults()))
        script_args, config = parser.parse_args_into_dataclasses(argv)
    if config.output_dir == UNSET_OUTPUT_DIR:  # the main process's clock names the folder of every process
        stamp = main_decides(lambda: time.strftime("%Y%m%d-%H%M%S"))
        parser.set_defaults(output_dir=os.path.join("runs", f"sentiment-{stamp}"))
        script_args, config = parser.parse_args_into_dataclasses(argv)
    unknown = set(script_args.method_names()) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods takes {', '.join(METHODS)}; unknown: {', '.join(sorted(unknown))}.")
    if script_args.samples_per_prompt < 2:
        raise SystemExit("--samples_per_prompt must be at least 2 to make a pair.")
    try:
        low, high = (int(k) for k in script_args.prefix_words.split(","))
        betas, ns = script_args.beta_values(), script_args.bon_values()
    except ValueError as error:
        raise SystemExit(
            f"--prefix_words, --betas and --bon_n take comma-separated numbers: {error}"
        ) from error
    if not 1 <= low <= high:
        raise SystemExit(
            f"--prefix_words must be 'low,high' with 1 <= low <= high, got {script_args.prefix_words!r}."
        )
    if any(b <= 0 for b in betas) or any(n < 1 for n in ns):
        raise SystemExit("every β must be > 0 and every Best-of-N n >= 1.")
    return script_args, config


# ---------------------------------------------------------------- data and models


def load_reviews(dataset: str, text_column: str, max_train_rows: int | None, max_eval_rows: int | None):
    """Train and test splits with one column, `text`, from a hub id, a local folder or a local file."""
    if os.path.isdir(dataset):
        files = {}
        for split in ("train", "test"):
            found = [os.path.join(dataset, split + ext) for ext in DATA_EXTENSIONS]
            found = [path for path in found if os.path.exists(path)]
            if not found:
                raise FileNotFoundError(f"{dataset} has no {split}{{{','.join(DATA_EXTENSIONS)}}} file.")
            files[split] = found[0]
        kind = "parquet" if files["train"].endswith(".parquet") else "json"
        splits = load_dataset(kind, data_files=files)
    elif os.path.isfile(dataset):
        kind = "parquet" if dataset.endswith(".parquet") else "json"
        splits = load_dataset(kind, data_files=dataset)["train"].train_test_split(test_size=0.05, seed=0)
    else:
        splits = load_dataset(dataset)
    result = []
    for split, limit in (("train", max_train_rows), ("test", max_eval_rows)):
        rows = splits[split]
        if text_column not in rows.column_names:
            raise ValueError(
                f"{dataset} ({split}) has no column {text_column!r}; its columns: {rows.column_names}"
            )
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        rows = rows.select_columns([text_column])
        result.append(rows.rename_column(text_column, "text") if text_column != "text" else rows)
    return result[0], result[1]


WORD_END = re.compile(r"\S+")


def split_review(text: str, index: int, low: int, high: int, seed: int) -> tuple[str, str] | None:
    """``(prefix, rest)``: the review's first k words and everything after them (whitespace kept, so
    ``prefix + rest == text``); k in [low, high] drawn from ``seed`` and the row ``index``, and at most
    the number of words less one. None for a review of fewer than 2 words."""
    ends = [match.end() for match in WORD_END.finditer(text)]
    if len(ends) < 2:
        return None
    k = random.Random(seed * 1_000_003 + index).randint(low, high)
    cut = ends[min(k, len(ends) - 1) - 1]
    return text[:cut], text[cut:]


def review_rows(reviews, script_args: ScriptArguments, seed: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows (chosen = rejected = the rest of the review) for SFT."""
    low, high = (int(k) for k in script_args.prefix_words.split(","))
    rows = []
    for index, text in enumerate(reviews["text"]):
        split = split_review(text, index, low, high, seed)
        if split is not None:
            rows.append({"prompt": split[0], "chosen": split[1], "rejected": split[1]})
    return rows


def base_model(script_args: ScriptArguments, config: DPOConfig, train, out: str) -> str:
    """Where the base model lives: `--model`, or a tiny Llama (and tokenizer) built offline under `out/base`."""
    if script_args.model is not None:
        return script_args.model
    path = os.path.join(out, "base")
    if not os.path.exists(os.path.join(path, "config.json")) and config.process_index == 0:
        from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

        tokenizer = train_tokenizer(train["text"], vocab_size=800)
        model = tiny_causal_lm(
            tokenizer,
            hidden_size=script_args.tiny_hidden_size,
            num_layers=script_args.tiny_layers,
            num_heads=4,
            seed=config.seed,
        )
        save_pretrained_whole(path, model, tokenizer)
    wait_for_everyone()  # the others load it only once it is written
    return path


def load_tokenizer(path: str):
    """The model's tokenizer; one without a pad token (GPT-2) pads with its EOS."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, config: DPOConfig):
    return AutoModelForCausalLM.from_pretrained(path, **(config.model_init_kwargs or {}))


def load_policy(path: str, sft: str, config: DPOConfig):
    """A trained policy for sampling: full weights, or the SFT model with the adapter merged in."""
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(sft, config), path).merge_and_unload()
    return load_causal_lm(path, config)


def peft_config(script_args: ScriptArguments):
    if script_args.full:
        return None
    from peft import LoraConfig

    alpha = script_args.lora_alpha or 2 * script_args.lora_r
    return LoraConfig(
        r=script_args.lora_r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def make_scorer(script_args: ScriptArguments):
    from dpo_trainer.evaluation.scorers import make_scorer as scorer_for

    return scorer_for(
        script_args.reward_model, label=script_args.reward_label, output=script_args.reward_output
    )


# ---------------------------------------------------------------- stages


def training_args(config: DPOConfig, folder: str, *, max_steps: int, learning_rate: float) -> DPOConfig:
    """The run's settings for an SFT-style stage (a plain Trainer reads only the TrainingArguments fields).

    A copy of the run's config rather than a new `TrainingArguments`: building another one resets
    accelerate's process state, which on CPU turns a multi-process run into independent processes.
    """
    args = copy.deepcopy(config)
    args.output_dir, args.max_steps, args.learning_rate, args.save_total_limit = (
        folder,
        max_steps,
        learning_rate,
        2,
    )
    return args


def run_sft(script_args: ScriptArguments, config: DPOConfig, base: str, train, out: str) -> str:
    """Fine-tune the base model on the reviews; returns the SFT model's folder."""
    from dpo_trainer.sft import sft_trainer

    folder, final = os.path.join(out, "sft"), os.path.join(out, "sft", "final")
    if stage_finished(folder):
        print(f"[sft] already done: {final}")
        return final
    resume = start_stage(folder, "sft")
    started = time.time()
    args = training_args(
        config, folder, max_steps=script_args.sft_max_steps, learning_rate=script_args.sft_learning_rate
    )
    trainer = sft_trainer(
        load_causal_lm(base, config),
        load_tokenizer(base),
        args,
        review_rows(train, script_args, config.seed),
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(final)
    save_history(trainer, folder, config.process_index)
    loss = next((e["train_loss"] for e in reversed(trainer.state.log_history) if "train_loss" in e), None)
    mark_done(folder, {"train_loss": loss, "seconds": time.time() - started}, config.process_index)
    print(f"[sft] {args.max_steps} steps in {time.time() - started:.0f}s: {final}")
    return final


def run_pairs(script_args: ScriptArguments, config: DPOConfig, sft: str, train, out: str) -> list[dict]:
    """N completions per training prefix from the SFT model, scored, and every informative pair of them.

    Writes `pairs/samples.jsonl` (prefix, completions, rewards) and `pairs/train.jsonl` (one row per
    pair with both rewards); a finished stage is read back.
    """
    from dpo_trainer.evaluation.best_of_n import all_preference_pairs, sample_and_score

    folder = os.path.join(out, "pairs")
    samples_path, pairs_path = os.path.join(folder, "samples.jsonl"), os.path.join(folder, "train.jsonl")
    if stage_finished(folder, outputs=("samples.jsonl", "train.jsonl")):
        print(f"[pairs] already done: {pairs_path}")
    else:
        start_stage(folder, "pairs")
        started, stats = time.time(), {}
        rows = review_rows(train, script_args, config.seed)
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))[: script_args.pair_prompts]
        if config.process_index == 0:
            samples, scores = sample_and_score(
                load_causal_lm(sft, config),
                load_tokenizer(sft),
                prompts,
                make_scorer(script_args),
                n=script_args.samples_per_prompt,
                temperature=1.0,
                max_new_tokens=script_args.max_new_tokens,
                batch_size=config.per_device_eval_batch_size,
                seed=config.seed,
            )
            pairs = all_preference_pairs(prompts, samples, scores)
            if not pairs:
                raise SystemExit(
                    "[pairs] every prefix's completions scored alike: no preference pair to train on."
                )
            write_jsonl(
                samples_path,
                [{"prompt": p, "samples": s, "rewards": r} for p, s, r in zip(prompts, samples, scores)],
            )
            write_jsonl(pairs_path, pairs)
            gaps = [pair["chosen_score"] - pair["rejected_score"] for pair in pairs]
            stats = {
                "prompts": len(prompts),
                "samples_per_prompt": script_args.samples_per_prompt,
                "pairs": len(pairs),
                "mean_reward_gap": sum(gaps) / len(gaps),
                "mean_sample_reward": sum(map(sum, scores)) / sum(map(len, scores)),
                "seconds": time.time() - started,
            }
            print(
                f"[pairs] {len(pairs)} pairs from {len(prompts)} prefixes x {script_args.samples_per_prompt} SFT "
                f"completions in {stats['seconds']:.0f}s (mean reward gap {stats['mean_reward_gap']:.3f}): {pairs_path}"
            )
        mark_done(folder, stats, config.process_index)
    return read_jsonl(pairs_path)


def best_completion_rows(out: str) -> list[dict]:
    """Preferred-FT's data: per prefix, its highest-reward completion (the first among equals) as chosen."""
    rows = []
    for entry in read_jsonl(os.path.join(out, "pairs", "samples.jsonl")):
        rewards = entry["rewards"]
        best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
        rows.append(
            {"prompt": entry["prompt"], "chosen": entry["samples"][best], "rejected": entry["samples"][worst]}
        )
    return rows


def run_dpo(
    script_args: ScriptArguments, config: DPOConfig, sft: str, pairs: list[dict], beta: float, out: str
) -> str:
    """DPO at one β against the SFT model; returns the policy's folder."""
    name = f"dpo-beta{beta:g}"
    folder, final = os.path.join(out, name), os.path.join(out, name, "final")
    if stage_finished(folder):
        print(f"[{name}] already done: {final}")
        return final
    resume = start_stage(folder, name)
    started = time.time()
    run_config = copy.deepcopy(config)
    run_config.output_dir, run_config.beta = folder, beta
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    trainer = DPOTrainer(
        load_causal_lm(sft, config),
        args=run_config,
        train_dataset=rows,
        processing_class=load_tokenizer(sft),
        peft_config=peft_config(script_args),
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(final)
    save_history(trainer, folder, config.process_index)
    logged = [e for e in trainer.state.log_history if "rewards/accuracies" in e]
    last = logged[-1] if logged else {}
    info = {"beta": beta, "seconds": time.time() - started, "last_logged": last}
    mark_done(folder, info, config.process_index)
    print(
        f"[{name}] {trainer.state.global_step} steps in {info['seconds']:.0f}s: train reward accuracy "
        f"{last.get('rewards/accuracies', float('nan')):.2f}, margin {last.get('rewards/margins', float('nan')):.2f}: {final}"
    )
    return final


def run_baseline(
    script_args: ScriptArguments, config: DPOConfig, sft: str, method: str, pairs, out: str
) -> str:
    """Preferred-FT or Unlikelihood from the SFT model; returns the policy's folder."""
    from dpo_trainer.sft import sft_trainer
    from dpo_trainer.unlikelihood import unlikelihood_trainer

    name = method.replace("_", "-")
    folder, final = os.path.join(out, name), os.path.join(out, name, "final")
    if stage_finished(folder):
        print(f"[{name}] already done: {final}")
        return final
    resume = start_stage(folder, name)
    started = time.time()
    learning_rate = script_args.baseline_learning_rate or config.learning_rate
    args = training_args(config, folder, max_steps=config.max_steps, learning_rate=learning_rate)
    model, tokenizer = load_causal_lm(sft, config), load_tokenizer(sft)
    if peft_config(script_args) is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(script_args))
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    if method == "preferred_ft":
        trainer = sft_trainer(model, tokenizer, args, best_completion_rows(out), **lengths)
    else:
        rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
        trainer = unlikelihood_trainer(
            model, tokenizer, args, rows, alpha=script_args.unlikelihood_alpha, **lengths
        )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(final)
    save_history(trainer, folder, config.process_index)
    mark_done(
        folder, {"seconds": time.time() - started, "learning_rate": learning_rate}, config.process_index
    )
    print(f"[{name}] {trainer.state.global_step} steps in {time.time() - started:.0f}s: {final}")
    return final


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------- evaluation


def evaluate_policy(
    name: str, model, reference, tokenizer, prompts, scorer, script_args, config, folder
) -> dict:
    """Samples of ``model`` on the held-out prefixes: mean reward and KL(model ‖ reference), each with its
    standard error (``reference=None``: the model is the reference, KL 0). Cached under ``folder`` (a
    rerun reads it back)."""
    from dpo_trainer.evaluation.kl import KLEstimate, mean_and_stderr, sequence_kl
    from dpo_trainer.evaluation.sampling import sample_responses

    path = os.path.join(folder, f"{name}.json")
    cached = read_json(path, "sampled again.")
    if isinstance(cached, dict) and "result" in cached:
        return cached["result"]
    require_writable(folder, "eval")
    k = script_args.eval_samples_per_prompt
    ids = sample_responses(
        model,
        tokenizer,
        prompts,
        temperature=1.0,  # the KL estimate needs samples from π itself
        max_new_tokens=script_args.max_new_tokens,
        batch_size=config.per_device_eval_batch_size,
        num_samples=k,
        seed=config.seed,
        return_token_ids=True,
    )
    flat_prompts = [prompt for prompt in prompts for _ in range(k)]
    flat_ids = [row for rows in ids for row in rows]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in flat_ids]
    rewards = scorer.score(flat_prompts, texts)
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in flat_prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if reference is None:
        kl = KLEstimate(mean=0.0, stderr=0.0, n=len(flat_ids), log_ratios=(0.0,) * len(flat_ids))
    else:
        kl = sequence_kl(
            model,
            reference,
            prompt_ids,
            flat_ids,
            batch_size=config.per_device_eval_batch_size,
            pad_token_id=pad,
        )
    reward, reward_se = mean_and_stderr(rewards)
    result = {
        "reward": reward,
        "reward_stderr": reward_se,
        "kl": kl.mean,
        "kl_stderr": kl.stderr,
        "n": len(texts),
    }
    samples = [
        {"prompt": p, "completion": t, "reward": r, "log_ratio": lr}
        for p, t, r, lr in zip(flat_prompts, texts, rewards, kl.log_ratios)
    ]
    write_json(path, {"result": result, "samples": samples}, indent=1)
    return result


def evaluate_best_of_n(sft_model, tokenizer, prompts, scorer, script_args, config, folder) -> dict[int, dict]:
    """Best-of-N over the SFT model for every N of ``--bon_n`` from one draw at the largest N."""
    from dpo_trainer.evaluation.best_of_n import best_of_n_prefixes, sample_and_score
    from dpo_trainer.evaluation.kl import best_of_n_kl, mean_and_stderr

    ns = script_args.bon_values()
    path = os.path.join(folder, f"best-of-{max(ns)}-samples.json")
    cached = read_json(path, "sampled again.")
    if isinstance(cached, list) and len(cached) == 2:
        samples, scores = cached
    else:
        require_writable(folder, "eval")
        samples, scores = sample_and_score(
            sft_model,
            tokenizer,
            prompts,
            scorer,
            n=max(ns),
            temperature=1.0,
            max_new_tokens=script_args.max_new_tokens,
            batch_size=config.per_device_eval_batch_size,
            seed=config.seed + 1,  # a draw of its own, not the SFT policy's samples again
        )
        write_json(path, [samples, scores], indent=None)
    results = {}
    for n, (_, best_scores, _) in best_of_n_prefixes(samples, scores, ns).items():
        reward, reward_se = mean_and_stderr(best_scores)
        results[n] = {"reward": reward, "reward_stderr": reward_se, "kl": best_of_n_kl(n), "kl_stderr": 0.0,
                      "n": len(best_scores)}  # fmt: skip
    return results


def reward_at_kl(points: list[dict], kl: float) -> float | None:
    """The reward of the piecewise-linear curve through ``points`` (sorted by KL) at ``kl``; None outside it."""
    ordered = sorted(points, key=lambda p: p["kl"])
    for left, right in zip(ordered, ordered[1:]):
        if left["kl"] <= kl <= right["kl"]:
            if right["kl"] == left["kl"]:
                return max(left["reward"], right["reward"])
            t = (kl - left["kl"]) / (right["kl"] - left["kl"])
            return left["reward"] + t * (right["reward"] - left["reward"])
    if len(ordered) == 1 and ordered[0]["kl"] == kl:
        return ordered[0]["reward"]
    return None


def compare_at_matched_kl(dpo_points: list[dict], baseline: dict) -> dict:
    """Is DPO's reward at least ``baseline``'s at the baseline's KL?

    "yes" when the DPO curve (linear between its β points) reaches the baseline's reward at its KL, or a DPO
    point has no more KL and at least the reward (dominates); "no" when the curve is below it there, or the
    baseline dominates a DPO point; "inconclusive" otherwise (the baseline's KL is outside DPO's range).
    """
    at = reward_at_kl(dpo_points, baseline["kl"])
    verdict = None
    if at is not None:
        verdict = "yes" if at >= baseline["reward"] else "no"
    elif any(p["kl"] <= baseline["kl"] and p["reward"] >= baseline["reward"] for p in dpo_points):
        verdict = "yes"
    elif any(p["kl"] >= baseline["kl"] and p["reward"] <= baseline["reward"] for p in dpo_points):
        verdict = "no"
    return {"baseline_kl": baseline["kl"], "baseline_reward": baseline["reward"], "dpo_reward_at_kl": at,
            "dpo_at_least_baseline": verdict or "inconclusive"}  # fmt: skip


def run_eval(
    script_args: ScriptArguments, config: DPOConfig, sft: str, policies: dict[str, str], test, out: str
) -> dict:
    """Sample, score and plot; returns the summary's `eval` part."""
    from dpo_trainer.evaluation.plots import plot_frontier

    started = time.time()
    folder = os.path.join(out, "eval")
    low, high = (int(k) for k in script_args.prefix_words.split(","))
    prompts = []
    for index, text in enumerate(test["text"]):
        split = split_review(text, index, low, high, config.seed)
        if split is not None:
            prompts.append(split[0])
        if len(prompts) == script_args.eval_prompts:
            break
    tokenizer = load_tokenizer(sft)
    scorer = make_scorer(script_args)
    reference = load_causal_lm(sft, config)
    results = {
        "SFT": evaluate_policy(
            "sft", reference, None, tokenizer, prompts, scorer, script_args, config, folder
        )
    }
    print(f"[eval] SFT: reward {results['SFT']['reward']:.3f}")
    for name, path in policies.items():
        model = load_policy(path, sft, config)
        stage = os.path.basename(os.path.dirname(path))  # dpo-beta0.1, preferred-ft, unlikelihood
        results[name] = evaluate_policy(
            stage, model, reference, tokenizer, prompts, scorer, script_args, config, folder
        )
        print(f"[eval] {name}: reward {results[name]['reward']:.3f}, KL {results[name]['kl']:.3f}")
        del model
    bon = (
        evaluate_best_of_n(reference, tokenizer, prompts, scorer, script_args, config, folder)
        if script_args.bon_values()
        else {}
    )
    for n, result in bon.items():
        results[f"Best of {n}"] = result

    groups = {"SFT": [dict(results["SFT"], label="")]}
    dpo_points = [
        dict(r, label=f"β={name.split('=')[1]}") for name, r in results.items() if name.startswith("DPO β=")
    ]
    if dpo_points:
        groups["DPO"] = dpo_points
    for name in ("Preferred-FT", "Unlikelihood"):
        if name in results:
            groups[name] = [dict(results[name], label="")]
    if bon:
        groups["Best-of-N (SFT)"] = [dict(r, label=f"N={n}") for n, r in bon.items()]
    reward_label = (
        "VADER compound"
        if script_args.reward_model == "vader"
        else f"{script_args.reward_model} ({script_args.reward_output})"
    )
    plots = {}
    read_only = unwritable(os.path.join(out, "plots"))
    if read_only:  # a finished run on read-only storage: summarised again, its plot kept as it was
        print(f"[eval] plot not drawn: {os.path.join(out, 'plots')} cannot be written ({read_only}).")
    else:
        plots["frontier"] = str(
            plot_frontier(
                groups,
                os.path.join(out, "plots", "frontier.png"),
                title=f"Reward against KL, {len(prompts)} held-out prefixes",
                reward_label=f"Mean reward ({reward_label})",
                kl_scale="symlog" if max(r["kl"] for r in results.values()) > 10 else "linear",
            )
        )
    comparisons = {
        name: compare_at_matched_kl(dpo_points, results[name])
        for name in ("Preferred-FT", "Unlikelihood")
        if name in results and dpo_points
    }
    print_table(results, comparisons, len(prompts), reward_label)
    return {
        "reward": reward_label,
        "prompts": len(prompts),
        "results": results,
        "dpo_vs_baselines_at_matched_kl": comparisons,
        "plots": plots,
        "seconds": time.time() - started,
    }


def print_table(results: dict, comparisons: dict, prompts: int, reward_label: str) -> None:
    print(f"\n[eval] {prompts} held-out prefixes, reward: {reward_label}; ± one standard error")
    print(f"{'method':<18}{'reward':>20}{'KL(π‖π_ref)':>20}{'samples':>9}")
    for name, r in results.items():
        reward = f"{r['reward']:.3f} ± {r['reward_stderr']:.3f}"
        kl = (
            f"{r['kl']:.3f} ± {r['kl_stderr']:.3f}"
            if not name.startswith("Best of")
            else f"{r['kl']:.3f} (bound)"
        )
        print(f"{name:<18}{reward:>20}{kl:>20}{r['n']:>9}")
    for name, c in comparisons.items():
        at = (
            "(outside the β points' KL range)"
            if c["dpo_reward_at_kl"] is None
            else f"{c['dpo_reward_at_kl']:.3f}"
        )
        print(
            f"DPO vs {name} at {name}'s KL {c['baseline_kl']:.3f}: DPO {at}, {name} {c['baseline_reward']:.3f} "
            f"-> DPO at least {name}: {c['dpo_at_least_baseline']}"
        )


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    script_args, config = parse_args(sys.argv[1:] if argv is None else argv)
    out = config.output_dir
    if config.process_index == 0:
        prepare_run_dir(out, script_args)
    wait_for_everyone()
    train, test = load_reviews(script_args.dataset, script_args.text_column, script_args.max_train_rows,
                               script_args.max_eval_rows)  # fmt: skip
    base = base_model(script_args, config, train, out)
    if script_args.sft_model or script_args.skip_sft:
        sft = script_args.sft_model or base
    else:
        sft = run_sft(script_args, config, base, train, out)

    policies = {}  # display name -> folder
    methods = script_args.method_names()
    if not script_args.skip_train:
        pairs = run_pairs(script_args, config, sft, train, out)
        if "dpo" in methods:
            for beta in script_args.beta_values():
                policies[f"DPO β={beta:g}"] = run_dpo(script_args, config, sft, pairs, beta, out)
        for method, name in (("preferred_ft", "Preferred-FT"), ("unlikelihood", "Unlikelihood")):
            if method in methods:
                policies[name] = run_baseline(script_args, config, sft, method, pairs, out)
    else:  # an earlier run's policies
        for beta in script_args.beta_values():
            path = os.path.join(out, f"dpo-beta{beta:g}", "final")
            if "dpo" in methods and os.path.exists(path):
                policies[f"DPO β={beta:g}"] = path
        for method, name in (("preferred_ft", "Preferred-FT"), ("unlikelihood", "Unlikelihood")):
            path = os.path.join(out, method.replace("_", "-"), "final")
            if method in methods and os.path.exists(path):
                policies[name] = path

    summary = {"output_dir": out, "sft_model": sft, "policies": policies}
    if not script_args.skip_eval and config.process_index == 0:
        summary["eval"] = run_eval(script_args, config, sft, policies, test, out)
    if config.process_index == 0:
        for stage in ["sft", "pairs"] + [os.path.basename(os.path.dirname(p)) for p in policies.values()]:
            done = stage_done(os.path.join(out, stage))
            if done:
                summary.setdefault("stages", {})[stage] = done
        summary["seconds"] = time.time() - started
        if write_summary(out, summary):
            print(f"\nsummary: {os.path.join(out, 'summary.json')} ({summary['seconds']:.0f}s)")
    return summary


if __name__ == "__main__":
    try:
        main()
    finally:  # a gloo/NCCL group left for interpreter exit can abort the process ("terminate called ...")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
