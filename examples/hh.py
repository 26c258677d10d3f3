"""The paper's Anthropic-HH pipeline (Rafailov et al. 2023, Sec. 6, App. B-D): SFT, DPO, judged win rates.

    python examples/hh.py                        # offline: tiny model, bundled hh_tiny data, a few minutes on CPU
    accelerate launch examples/hh.py             # the same under accelerate (one or several processes)
    accelerate launch examples/hh.py --model EleutherAI/pythia-2.8b --dataset Anthropic/hh-rlhf \\
        --beta 0.1 --learning_rate 1e-6 --bf16 --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 16 --judge llm --judge_url http://localhost:8000/v1 \\
        --judge_model my-judge --output_dir runs/pythia-2.8b

Stages, each resumable (run the same command again: finished stages are skipped, an interrupted one
resumes from its last checkpoint) and skippable (`--skip_sft`, `--skip_dpo`, `--skip_eval`):

1. **sft**: fine-tune on the chosen responses (the paper's Preferred-FT baseline and DPO's start).
2. **dpo**: DPO against the SFT model (LoRA by default; `--full` trains every weight, `--qlora` a 4-bit base),
   on the dataset's pairs, or with `--sft_samples_per_prompt N` on pairs of the SFT model's own samples
   (N per training prompt, best against worst by the judge, as in the paper's Sec. 6.1 experiment;
   stage `pairs`).
3. **eval**: sample held-out prompts at several temperatures from the DPO policy, the SFT model and
   Best-of-N over SFT samples (App. D.1); judge them against the data set's chosen response and DPO
   against SFT; write `summary.json`, a table, and plots. `--bon_n 1,4,16,64,128` draws once at the
   largest N and scores every smaller N on the first N samples of that draw (no resampling), with the
   win rate against N in `plots/best_of_n.png` (the paper's Fig. 4).

`--dataset` is a hub id or a local folder with `train` / `test` files (`.jsonl`, `.json`, `.parquet`), or
one local file (5% held out). Rows are raw HH transcripts `{"chosen", "rejected"}`, whose prompt runs to
the last "\\n\\nAssistant:", or rows with an explicit `prompt` (TL;DR summarization: `prompt` = the post,
`chosen` / `rejected` = the summaries; a hub set without a test split is evaluated on its validation
split). The paper's TL;DR settings (App. B, C.2): β 0.5, and the GPT-4 summarization prompt,

    accelerate launch examples/hh.py --model EleutherAI/pythia-2.8b --dataset trl-lib/tldr-preference \\
        --beta 0.5 --learning_rate 1e-6 --bf16 --judge llm --judge_task summarization \\
        --judge_url http://localhost:8000/v1 --judge_model my-judge --output_dir runs/tldr
 Every `DPOConfig` flag applies to the DPO stage (`--beta`, `--learning_rate`, ...).
With no `--model`, a tiny Llama is built from a config with a tokenizer trained on the data, and the
defaults below suit it; flags given on the command line win.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from dpo_trainer import DPOConfig, DPOTrainer
from dpo_trainer.data import check_row_text, detect_format, split_hh_transcript, to_example
from dpo_trainer.data.formats import FORMAT_COLUMNS
from hh_data import rule_score
from run_folder import (
    RUN_MARKER,
    cannot_write,
    main_decides,
    mark_done,
    prepare_run_dir,
    read_json,
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
BUNDLED_DATA = os.path.join(HERE, "data", "hh_tiny")
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
UNSET_OUTPUT_DIR = "runs/unset"  # no --output_dir given: the run folder is chosen from the settings


@dataclass(frozen=True)
class PaperDefaults:
    """The paper's reference implementation truncates HH at 512 tokens, prompts at 256, keeping a long prompt's
    end (the turns nearest the reply); DPOConfig's own defaults follow TRL (1024, no prompt cap, keep_start).
    Applied unless given on the command line."""

    max_length: int = 512
    max_prompt_length: int = 256
    truncation_mode: str = "keep_end"


@dataclass(frozen=True)
class OfflineDefaults:
    """The offline default run, without --model: a tiny model trained from scratch on the bundled data, fully
    fine-tuned (SFT then DPO). Applied unless given on the command line."""

    max_steps: int = 250
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 128
    learning_rate: float = 1e-4
    beta: float = 2.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 10
    logging_steps: int = 10
    max_length: int = 192
    max_prompt_length: int = 128
    save_steps: int = 50
    seed: int = 0
    sft_max_steps: int = 700
    sft_learning_rate: float = 3e-3
    full: bool = True
    eval_prompts: int = 100
    # a tiny model on the CPU: float32 and no recomputation (DPOConfig's defaults are TRL's: bf16 autocast and
    # activation checkpointing, which a run with --model gets)
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class ScriptArguments:
    dataset: str = field(default=BUNDLED_DATA, metadata={"help": "Hub id, local folder or local file."})
    model: str | None = field(
        default=None, metadata={"help": "Base model (hub id or path); none: a tiny model."}
    )
    full: bool = field(default=False, metadata={"help": "DPO on every weight instead of a LoRA adapter."})
    qlora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit NF4 base (needs bitsandbytes)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    sft_max_steps: int = field(default=1000, metadata={"help": "SFT optimizer steps."})
    sft_learning_rate: float = field(default=1e-5, metadata={"help": "SFT learning rate."})
    sft_model: str | None = field(
        default=None, metadata={"help": "Use this SFT model instead of training one."}
    )
    sft_samples_per_prompt: int = field(
        default=0,
        metadata={
            "help": "0: DPO trains on the dataset's pairs. N >= 2: on pairs of the SFT model's own samples, N per "
            "training prompt, best against worst by the judge (the paper's Sec. 6.1 recipe; needs a scoring judge)."
        },
    )
    pair_prompts: int | None = field(
        default=None, metadata={"help": "Training prompts sampled for those pairs (default: all)."}
    )
    pair_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for those pairs."})
    skip_sft: bool = field(default=False, metadata={"help": "DPO straight from --model (no SFT stage)."})
    skip_dpo: bool = field(default=False, metadata={"help": "Skip the DPO stage."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip sampling and judging."})
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows."}
    )
    max_eval_rows: int | None = field(default=200, metadata={"help": "Use at most this many test rows."})
    eval_prompts: int = field(default=256, metadata={"help": "Held-out prompts sampled and judged."})
    temperatures: str = field(default="0.25,0.5,0.75,1.0", metadata={"help": "Sampling temperatures."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled response."})
    bon_n: str = field(
        default="16",
        metadata={"help": "Best-of-N: N, or several N (1,4,16) scored from one draw (0: skip)."},
    )
    bon_temperatures: str = field(default="1.0", metadata={"help": "Best-of-N sampling temperatures."})
    judge: str = field(default="rule", metadata={"help": "rule (bundled data), llm or reward."})
    judge_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible base URL (judge llm)."})
    judge_model: str | None = field(default=None, metadata={"help": "Judge model name (judge llm)."})
    judge_task: str = field(
        default="dialogue", metadata={"help": "The paper's judge prompt: dialogue or summarization."}
    )
    reward_model: str | None = field(default=None, metadata={"help": "Sequence classifier (judge reward)."})
    tiny_hidden_size: int = field(default=128, metadata={"help": "Width of the offline tiny model."})
    tiny_layers: int = field(default=3, metadata={"help": "Layers of the offline tiny model."})
    restart_stale: bool = field(
        default=False,
        metadata={"help": "Start over the stages of --output_dir whose settings changed (kept aside)."},
    )


def parse_args(argv: list[str]) -> tuple[ScriptArguments, DPOConfig]:
    parser = HfArgumentParser((ScriptArguments, DPOConfig))
    parser.set_defaults(**asdict(PaperDefaults()), output_dir=UNSET_OUTPUT_DIR)
    script_args, config = parser.parse_args_into_dataclasses(argv)
    if script_args.model is None:
        parser.set_defaults(**asdict(OfflineDefaults()))
        script_args, config = parser.parse_args_into_dataclasses(argv)
    if config.output_dir == UNSET_OUTPUT_DIR:
        # rerunning the same command continues the last default run; other settings start a new one (the main
        # process picks the folder, every process takes it)
        manifest = run_manifest(script_args, config)
        parser.set_defaults(output_dir=main_decides(lambda: default_output_dir(manifest)))
        script_args, config = parser.parse_args_into_dataclasses(argv)
    if script_args.judge not in ("rule", "llm", "reward"):
        raise SystemExit(f"--judge must be rule, llm or reward, got {script_args.judge!r}.")
    return script_args, config


# ---------------------------------------------------------------- data and models


def load_hh(dataset: str, max_train_rows: int | None, max_eval_rows: int | None):
    """Train and test splits of raw HH rows from a hub id, a local folder or a local file."""
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
        rows = load_dataset(kind, data_files=dataset)["train"]
        check_file_rows(rows, dataset)  # before the shuffled split renumbers them
        splits = rows.train_test_split(test_size=0.05, seed=0)
    else:
        splits = load_dataset(dataset)
    train, test = splits["train"], splits["test" if "test" in splits else "validation"]
    if max_train_rows is not None:
        train = train.select(range(min(max_train_rows, len(train))))
    if max_eval_rows is not None:
        test = test.select(range(min(max_eval_rows, len(test))))
    columns = ["prompt", "chosen", "rejected"] if "prompt" in train.column_names else ["chosen", "rejected"]
    return train.select_columns(columns), test.select_columns(columns)


def check_file_rows(rows, path: str) -> None:
    """Raise for a bad row of one local file, naming its position in the file (row i is line i + 1 of JSONL).

    Text rows are checked as the trainer will read them (an HH transcript must split at its last
    "\\n\\nAssistant:"); message lists need the tokenizer's chat template, which the trainer checks later.
    """
    fmt = detect_format(rows.column_names)
    for index, row in enumerate(rows):
        try:
            check_row_text(row, index)
            if all(isinstance(row[name], str) for name in FORMAT_COLUMNS[fmt]):
                to_example(row, index, fmt)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{path} (row {index} is line {index + 1} of a JSONL file): {error}") from error


def prompt_and_reply(row: dict, index: int) -> tuple[str, str]:
    """A row's prompt and chosen reply: its `prompt` column (TL;DR rows), else split from the HH transcript."""
    if row.get("prompt") is not None:
        return row["prompt"], row["chosen"]
    return split_hh_transcript(row["chosen"], row=index, field="chosen")


def base_model(script_args: ScriptArguments, config: DPOConfig, train, out: str) -> str:
    """Where the base model lives: `--model`, or a tiny Llama (and tokenizer) built offline under `out/base`."""
    if script_args.model is not None:
        return script_args.model
    path = os.path.join(out, "base")
    if not os.path.exists(os.path.join(path, "config.json")) and config.process_index == 0:
        from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

        tokenizer = train_tokenizer((row["chosen"] + row["rejected"] for row in train), vocab_size=2000)
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


def load_causal_lm(
    path: str, script_args: ScriptArguments, config: DPOConfig, *, quantize: bool = False, dtype=None
):
    kwargs = dict(config.model_init_kwargs or {})
    if dtype is not None:
        kwargs.setdefault("dtype", dtype)  # model_init_kwargs win
    if quantize:
        import torch
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def sampling_device():
    """This process's accelerator (accelerate's `PartialState`: cuda:<local rank>, mps, or cpu)."""
    from accelerate import PartialState

    return PartialState().device


def sampling_dtype(config: DPOConfig):
    """Sample in the precision trained in: bf16 with --bf16, fp16 with --fp16, else as saved."""
    import torch

    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None


def load_for_sampling(path: str, script_args: ScriptArguments, config: DPOConfig):
    """A model for sampling, on this process's accelerator (each process samples its share)."""
    model = load_causal_lm(path, script_args, config, dtype=sampling_dtype(config))
    return model.to(sampling_device())


# ---------------------------------------------------------------- stages


def run_sft(script_args: ScriptArguments, config: DPOConfig, base: str, train, test, out: str) -> str:
    """Fine-tune the base model on the chosen responses; returns the SFT model's folder."""
    from dpo_trainer.sft import sft_trainer

    folder, final = os.path.join(out, "sft"), os.path.join(out, "sft", "final")
    if stage_finished(folder):
        print(f"[sft] already done: {final}")
        return final
    resume = start_stage(folder, "sft")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base)
    args = TrainingArguments(
        output_dir=folder,
        max_steps=script_args.sft_max_steps,
        learning_rate=script_args.sft_learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        bf16=config.bf16,
        fp16=config.fp16,
        seed=config.seed,
        report_to=config.report_to,
        use_cpu=config.use_cpu,
        disable_tqdm=config.disable_tqdm,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    model = load_causal_lm(base, script_args, config)
    trainer = sft_trainer(
        model,
        tokenizer,
        args,
        train,
        test,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
    )
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    trainer.save_model(final)
    save_history(trainer, folder, config.process_index)
    mark_done(
        folder, {"eval_loss": metrics["eval_loss"], "seconds": time.time() - started}, config.process_index
    )
    print(
        f"[sft] {args.max_steps} steps in {time.time() - started:.0f}s, held-out loss {metrics['eval_loss']:.3f}: {final}"
    )
    return final


def run_pairs(script_args: ScriptArguments, config: DPOConfig, sft: str, train, out: str):
    """Preference pairs over the SFT model's own samples, labelled by the judge; returns them as a Dataset.

    N samples per training prompt at `--pair_temperature`; the best and the worst by the judge's score
    make a (chosen, rejected) row; prompts whose samples all score alike are dropped. Written to
    `pairs/train.jsonl` (with the scores) by the main process; a finished stage is read back.
    """
    from dpo_trainer.evaluation import sampled_preference_pairs

    folder = os.path.join(out, "pairs")
    path = os.path.join(folder, "train.jsonl")
    if stage_finished(folder, outputs=("train.jsonl",)):
        print(f"[pairs] already done: {path}")
    else:
        start_stage(folder, "pairs")
        judge = make_judge(script_args)
        if not hasattr(judge, "score"):
            raise SystemExit(
                "--sft_samples_per_prompt needs a judge that scores responses: --judge rule or reward."
            )
        started = time.time()
        rows = train.select(range(min(script_args.pair_prompts or len(train), len(train))))
        prompts = list(dict.fromkeys(prompt_and_reply(row, i)[0] for i, row in enumerate(rows)))
        stats = {}
        pairs = sampled_preference_pairs(  # every process samples a share; each gets all the pairs
            load_for_sampling(sft, script_args, config),
            AutoTokenizer.from_pretrained(sft),
            prompts,
            judge,
            n=script_args.sft_samples_per_prompt,
            temperature=script_args.pair_temperature,
            max_new_tokens=script_args.max_new_tokens,
            batch_size=config.per_device_eval_batch_size,
            seed=config.seed,
            across_processes=True,
        )
        if not pairs:
            raise SystemExit("[pairs] every prompt's samples scored alike: no preference pair to train on.")
        if config.process_index == 0:
            write_jsonl(path, pairs)
            gaps = [pair["chosen_score"] - pair["rejected_score"] for pair in pairs]
            stats = {
                "prompts": len(prompts),
                "pairs": len(pairs),
                "mean_score_gap": sum(gaps) / len(gaps),
                "seconds": time.time() - started,
            }
            print(
                f"[pairs] {len(pairs)} pairs from {len(prompts)} prompts x {script_args.sft_samples_per_prompt} SFT "
                f"samples in {stats['seconds']:.0f}s (mean score gap {stats['mean_score_gap']:.2f}): {path}"
            )
        mark_done(folder, stats, config.process_index)
    return load_dataset("json", data_files=path)["train"].select_columns(["prompt", "chosen", "rejected"])


def run_dpo(script_args: ScriptArguments, config: DPOConfig, sft: str, train, test, out: str) -> str:
    """DPO against the SFT model; returns the trained policy's folder (an adapter unless --full)."""
    folder, final = os.path.join(out, "dpo"), os.path.join(out, "dpo", "final")
    if stage_finished(folder):
        print(f"[dpo] already done: {final}")
        return final
    resume = start_stage(folder, "dpo")
    started = time.time()
    config.output_dir = folder
    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = load_causal_lm(sft, script_args, config, quantize=script_args.qlora)
    trainer = DPOTrainer(
        model,
        args=config,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=peft_config(script_args),
    )
    before = trainer.evaluate(metric_key_prefix="before")
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()
    trainer.save_model(final)
    save_history(trainer, folder, config.process_index)
    mark_done(
        folder,
        {"before": before, "after": after, "seconds": time.time() - started, "sft": sft},
        config.process_index,
    )
    print(
        f"[dpo] {trainer.state.global_step} steps in {time.time() - started:.0f}s: held-out reward accuracy "
        f"{after['eval_rewards/accuracies']:.2f}, margin {after['eval_rewards/margins']:.2f} (before: "
        f"{before['before_rewards/accuracies']:.2f}, {before['before_rewards/margins']:.2f}): {final}"
    )
    return final


def peft_config(script_args: ScriptArguments):
    if script_args.full and not script_args.qlora:
        return None
    from peft import LoraConfig

    alpha = script_args.lora_alpha or 2 * script_args.lora_r
    return LoraConfig(
        r=script_args.lora_r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def load_policy(path: str, sft: str, script_args: ScriptArguments, config: DPOConfig):
    """The DPO policy for sampling, on this process's accelerator: full weights, or the SFT model with the
    adapter merged in."""
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_for_sampling(sft, script_args, config), path).merge_and_unload()
    return load_for_sampling(path, script_args, config)


def make_judge(script_args: ScriptArguments, cache_dir: str | None = None):
    """The judge the flags name; an LLM judge keeps its replies in `cache_dir` (reused on a rerun)."""
    from dpo_trainer.evaluation import LLMJudge, RewardModelJudge, RuleJudge

    if script_args.judge == "llm":
        if not (script_args.judge_url and script_args.judge_model):
            raise SystemExit("--judge llm needs --judge_url and --judge_model.")
        cache_file = os.path.join(cache_dir, "llm_judge_replies.jsonl") if cache_dir else None
        try:
            return LLMJudge(
                script_args.judge_url,
                script_args.judge_model,
                task=script_args.judge_task,
                cache_file=cache_file,
            )
        except ValueError as error:
            raise SystemExit(f"--judge llm: {error}") from None
    if script_args.judge == "reward":
        if not script_args.reward_model:
            raise SystemExit("--judge reward needs --reward_model.")
        return RewardModelJudge.from_pretrained(script_args.reward_model, device=sampling_device())
    return RuleJudge(rule_score)


def run_eval(
    script_args: ScriptArguments,
    config: DPOConfig,
    sft: str,
    policy: str | None,
    test,
    out: str,
    fingerprint: str = "",
) -> dict:
    """Sample, judge and plot; returns the summary also written to `out/summary.json`.

    Every process runs it: each samples its share of every batch list on its own accelerator
    (`sample_responses(..., across_processes=True)`, the same samples as one process); the main process
    judges, plots and returns the summary, the others return None.
    """
    from dpo_trainer.evaluation import (
        best_of_n_prefixes,
        plot_training_curves,
        plot_win_rate_vs_n,
        plot_win_rates,
        sample_and_score,
        sample_responses,
        win_rate,
    )

    started = time.time()
    # samples are keyed by the fingerprint of the stages and settings that produced them: a retrained
    # policy or another sampling setting never reads an earlier run's samples
    folder = os.path.join(out, "eval", fingerprint) if fingerprint else os.path.join(out, "eval")
    rows = test.select(range(min(script_args.eval_prompts, len(test))))
    split = [prompt_and_reply(row, i) for i, row in enumerate(rows)]
    prompts, chosen = [p for p, _ in split], [r.strip() for _, r in split]
    tokenizer = AutoTokenizer.from_pretrained(sft)
    judge = make_judge(script_args, cache_dir=os.path.join(out, "eval"))
    models = {"SFT": load_for_sampling(sft, script_args, config)}
    if policy is not None:
        models["DPO"] = load_policy(policy, sft, script_args, config)
    temperatures = [float(t) for t in script_args.temperatures.split(",")]
    sampling = dict(
        max_new_tokens=script_args.max_new_tokens,
        batch_size=config.per_device_eval_batch_size,
        seed=config.seed,
        across_processes=True,
        disable_progress=config.disable_tqdm,
    )

    def sample(model, temperature):
        return [
            s[0].strip()
            for s in sample_responses(model, tokenizer, prompts, temperature=temperature, **sampling)
        ]

    bon_ns = sorted({int(n) for n in script_args.bon_n.split(",") if int(n) > 0})

    def draw(temperature):  # one draw at the largest N; every smaller N reads its first samples
        drawn, scores = sample_and_score(
            models["SFT"], tokenizer, prompts, judge, n=max(bon_ns), temperature=temperature, **sampling
        )
        return [drawn, scores]

    samples = {}  # (method, temperature) -> responses, cached on disk so a rerun skips finished sampling
    for method, model in models.items():
        for temperature in temperatures:
            samples[method, temperature] = cached(folder, method, temperature, sample, model, temperature)
    bon_temperatures = [float(t) for t in script_args.bon_temperatures.split(",")]
    if bon_ns and hasattr(judge, "score"):
        for temperature in bon_temperatures:
            drawn, scores = cached(folder, f"Best of {max(bon_ns)} draw", temperature, draw, temperature)
            for n, (responses, _, _) in best_of_n_prefixes(drawn, scores, bon_ns).items():
                samples[f"Best of {n}", temperature] = [r.strip() for r in responses]

    if config.process_index != 0:  # the other processes only helped to sample
        return None
    results = {"vs_chosen": {}, "dpo_vs_sft": {}}
    for (method, temperature), responses in samples.items():
        rate = win_rate(judge.compare(prompts, responses, chosen))
        results["vs_chosen"].setdefault(method, {})[temperature] = rate
    if policy is not None:
        for temperature in temperatures:
            outcome = judge.compare(prompts, samples["DPO", temperature], samples["SFT", temperature])
            results["dpo_vs_sft"][temperature] = win_rate(outcome)

    plots = {}
    read_only = unwritable(os.path.join(out, "plots"))
    if read_only:  # a finished run on read-only storage: summarised again, its plots kept as they were
        print(f"[eval] plots not drawn: {os.path.join(out, 'plots')} cannot be written ({read_only}).")
    else:
        plots["win_rates"] = plot_win_rates(
            results["vs_chosen"],
            os.path.join(out, "plots", "win_rates.png"),
            title=f"Win rate against the chosen response ({script_args.judge} judge)",
        )
    by_n = {
        f"T={t}": {n: results["vs_chosen"][f"Best of {n}"][t] for n in bon_ns}
        for t in bon_temperatures
        if len(bon_ns) > 1 and (f"Best of {bon_ns[0]}", t) in samples
    }
    if by_n and not read_only:
        plots["best_of_n"] = plot_win_rate_vs_n(
            by_n,
            os.path.join(out, "plots", "best_of_n.png"),
            title=f"Best-of-N over SFT samples against the chosen response ({script_args.judge} judge)",
        )
    history = read_json(os.path.join(out, "dpo", "log_history.json"), "no training curves drawn.")
    if history is not None and not read_only:
        plots["training_curves"] = plot_training_curves(
            history, os.path.join(out, "plots", "training_curves.png")
        )
    summary = {
        "judge": script_args.judge,
        "prompts": len(prompts),
        "win_rate_vs_chosen": {
            m: {str(t): asdict(r) for t, r in by_t.items()} for m, by_t in results["vs_chosen"].items()
        },
        "dpo_vs_sft": {str(t): asdict(r) for t, r in results["dpo_vs_sft"].items()},
        "plots": {name: str(path) for name, path in plots.items()},
        "seconds": time.time() - started,
    }
    print_table(results, script_args.judge, len(prompts))
    return summary


def cached(folder: str, method: str, temperature: float, compute, *args) -> list[str]:
    """`compute(*args)`, saved as JSON under `folder` by the main process; an earlier run's file is read
    instead (a damaged one is named and computed again). Every process takes the main process's decision,
    since computing is collective."""
    from accelerate import PartialState

    path = os.path.join(folder, f"samples-{method.replace(' ', '-').lower()}-t{temperature}.json")
    state = PartialState()

    def decide() -> tuple[bool, str | None]:  # (read the file, why it cannot be computed)
        if read_json(path, "sampled again.") is not None:
            return True, None
        reason = unwritable(folder)
        return False, reason and cannot_write(folder, "eval", reason)

    found, error = main_decides(decide)
    if error:
        raise SystemExit(error)
    if found:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    started = time.time()
    responses = compute(*args)
    if state.is_main_process:
        print(
            f"[eval] {method}, T={temperature}: sampled in {time.time() - started:.1f}s by "
            f"{state.num_processes} process(es) on {state.device.type}"
        )
        write_json(path, responses, indent=1)  # whole or not at all
    return responses


def print_table(results: dict, judge: str, prompts: int) -> None:
    print(
        f"\n[eval] win rate against the data set's chosen response ({judge} judge, {prompts} held-out prompts)"
    )
    temperatures = sorted({t for by_t in results["vs_chosen"].values() for t in by_t})
    print(f"{'method':<14}" + "".join(f"{'T=' + str(t):>28}" for t in temperatures))
    for method, by_t in results["vs_chosen"].items():
        print(f"{method:<14}" + "".join(f"{str(by_t[t]) if t in by_t else '-':>28}" for t in temperatures))
    if results["dpo_vs_sft"]:
        print(
            f"{'DPO vs SFT':<14}"
            + "".join(f"{str(results['dpo_vs_sft'].get(t, '-')):>28}" for t in temperatures)
        )


# ---------------------------------------------------------------- the run


# What decides each stage's result, besides the stages before it (chained through their fingerprints).
STAGES = ("sft", "pairs", "dpo", "eval")
UPSTREAM = {"sft": (), "pairs": ("sft",), "dpo": ("sft", "pairs"), "eval": ("sft", "dpo")}
STAGE_SCRIPT_KEYS = {
    "sft": ("dataset", "model", "max_train_rows", "max_eval_rows", "sft_max_steps", "sft_learning_rate", "sft_model",
            "skip_sft", "tiny_hidden_size", "tiny_layers"),
    "pairs": ("sft_samples_per_prompt", "pair_prompts", "pair_temperature", "max_new_tokens", "judge", "judge_url",
              "judge_model", "judge_task", "reward_model"),
    "dpo": ("full", "qlora", "lora_r", "lora_alpha"),
    "eval": ("eval_prompts", "temperatures", "max_new_tokens", "bon_n", "bon_temperatures", "judge", "judge_url",
             "judge_model", "judge_task", "reward_model"),
}  # fmt: skip
STAGE_CONFIG_KEYS = {
    "sft": ("per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
            "bf16", "fp16", "seed", "max_length", "max_prompt_length", "model_init_kwargs"),
    "pairs": ("seed", "bf16", "fp16"),
    "dpo": ("beta", "loss_type", "loss_weights", "label_smoothing", "rpo_alpha", "learning_rate", "max_steps",
            "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
            "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "max_length",
            "max_prompt_length", "truncation_mode", "precompute_ref_log_probs", "max_tokens_per_batch", "seed",
            "bf16", "fp16", "model_init_kwargs", "on_nonfinite"),
    "eval": ("seed", "bf16", "fp16", "per_device_eval_batch_size"),
}  # fmt: skip


def run_manifest(script_args: ScriptArguments, config: DPOConfig) -> dict:
    """{stage: {"settings", "fingerprint"}}: every setting that affects the stage's result, and a hash of
    them and of the fingerprints of the stages it builds on, so that a changed stage invalidates all later."""
    manifest = {}
    for stage in STAGES:
        settings = {key: getattr(script_args, key) for key in STAGE_SCRIPT_KEYS[stage]}
        settings.update({key: getattr(config, key, None) for key in STAGE_CONFIG_KEYS[stage]})
        settings = json.loads(json.dumps(settings, default=str))  # as run.json will read back
        settings["after"] = {name: manifest[name]["fingerprint"] for name in UPSTREAM[stage]}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        manifest[stage] = {"settings": settings, "fingerprint": digest}
    return manifest


def manifest_changes(saved: dict, manifest: dict) -> dict[str, list[str]]:
    """{stage: ["key: old -> new", ...]} for the stages whose fingerprint differs from `saved`'s."""
    changes = {}
    for stage in STAGES:
        old = (saved.get(stage) or {}).get("settings")
        if old is None or saved[stage].get("fingerprint") == manifest[stage]["fingerprint"]:
            continue
        new = manifest[stage]["settings"]
        changes[stage] = [
            f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)
        ]
    return changes


def check_run_manifest(out: str, manifest: dict, restart_stale: bool) -> dict:
    """Refuse to rerun `out` with settings that would mix old results with new ones, naming the keys; with
    `--restart_stale`, move the stale stages' folders aside (`<stage>.stale-<time>`) and start them over.
    Returns what `run.json` holds ({} for a damaged one, whose every stage counts as changed)."""
    marker = os.path.join(out, RUN_MARKER)
    recorded = read_json(marker, "the settings of the run's stages are unknown: each counts as changed.")
    if recorded is None and os.path.exists(marker):
        recorded = {}
        changes = {stage: [f"settings unknown ({marker} is damaged)"] for stage in STAGES}
    else:
        changes = manifest_changes((recorded or {}).get("stages") or {}, manifest)
    stale = {stage: lines for stage, lines in changes.items() if os.path.exists(os.path.join(out, stage))}
    if stale and not restart_stale:
        listed = "\n".join(f"  {stage}: " + "; ".join(lines) for stage, lines in stale.items())
        raise SystemExit(
            f"{out} was run with other settings; its results would be reused as if they were new:\n{listed}\n"
            "Pass --restart_stale to start those stages (and the ones after) over, or choose another --output_dir."
        )
    for stage in stale:
        aside = os.path.join(out, f"{stage}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(os.path.join(out, stage), aside)
        print(f"[{stage}] settings changed; the earlier results are kept in {aside}")
    return recorded or {}


def default_output_dir(manifest: dict) -> str:
    """The newest `runs/hh-*` folder run with exactly these settings, else a new timestamped one."""
    runs = sorted(os.listdir("runs")) if os.path.isdir("runs") else []
    runs = [name for name in runs if name.startswith("hh-")]
    for name in reversed(runs):
        marker = os.path.join("runs", name, RUN_MARKER)
        recorded = read_json(marker, "not continued.")
        if isinstance(recorded, dict):
            saved = recorded.get("stages") or {}
            if all((saved.get(s) or {}).get("fingerprint") == manifest[s]["fingerprint"] for s in STAGES):
                print(f"continuing the earlier run with the same settings: {os.path.join('runs', name)}")
                return os.path.join("runs", name)
            break  # the last default run had other settings: a new one
    fresh = os.path.join("runs", "hh-" + time.strftime("%Y%m%d-%H%M%S"))
    taken = [name for name in [fresh] + [f"{fresh}-{i}" for i in range(2, 100)] if not os.path.exists(name)]
    return taken[0]


def validate_flags(script_args: ScriptArguments) -> None:
    """Check the judge and sampling flags before any training, not after hours of it."""
    from dpo_trainer.evaluation.judges import TASK_PROMPTS

    for name in ("temperatures", "bon_temperatures"):
        for text in getattr(script_args, name).split(","):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{name} must be comma-separated numbers, got {text!r}.") from None
            if not (value >= 0 and value != float("inf")):
                raise SystemExit(f"--{name}: a temperature must be a finite number >= 0, got {text!r}.")
    for text in script_args.bon_n.split(","):
        if not text.strip().isdigit():
            raise SystemExit(f"--bon_n must be comma-separated whole numbers >= 0, got {text!r}.")
    if script_args.judge_task not in TASK_PROMPTS:
        raise SystemExit(
            f"--judge_task must be one of {', '.join(TASK_PROMPTS)}, got {script_args.judge_task!r}."
        )
    needs_judge = not script_args.skip_eval or script_args.sft_samples_per_prompt
    if needs_judge and script_args.judge == "llm":
        make_judge(script_args)  # checks the URL and model flags; sends nothing
    if needs_judge and script_args.judge == "reward" and not script_args.reward_model:
        raise SystemExit("--judge reward needs --reward_model.")


def main(argv: list[str] | None = None) -> dict:
    script_args, config = parse_args(sys.argv[1:] if argv is None else argv)
    out = config.output_dir
    validate_flags(script_args)
    manifest = run_manifest(script_args, config)
    if config.process_index == 0:
        prepare_run_dir(out, script_args)
        recorded = check_run_manifest(out, manifest, script_args.restart_stale)
        started = {"script_args": asdict(script_args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        marker = json.loads(json.dumps({**started, **recorded, "stages": manifest}))
        if marker != recorded:  # so that a finished run on read-only storage can be summarised again
            write_json(os.path.join(out, RUN_MARKER), marker)
    wait_for_everyone()
    train, test = load_hh(script_args.dataset, script_args.max_train_rows, script_args.max_eval_rows)
    base = base_model(script_args, config, train, out)
    if script_args.skip_sft or script_args.sft_model:
        sft = script_args.sft_model or base
    else:
        sft = run_sft(script_args, config, base, train, test, out)
    if script_args.sft_samples_per_prompt and not script_args.skip_dpo:
        if script_args.sft_samples_per_prompt < 2:
            raise SystemExit("--sft_samples_per_prompt must be 0 (the dataset's pairs) or at least 2.")
        train = run_pairs(script_args, config, sft, train, out)
    policy = None if script_args.skip_dpo else run_dpo(script_args, config, sft, train, test, out)
    if policy is None and os.path.exists(os.path.join(out, "dpo", "final")):
        policy = os.path.join(out, "dpo", "final")  # an earlier run's policy
    summary = {"output_dir": out, "sft_model": sft, "dpo_policy": policy}
    if not script_args.skip_eval:  # every process samples; run_eval returns None off the main process
        fingerprint = manifest["eval"]["fingerprint"]
        summary["eval"] = run_eval(script_args, config, sft, policy, test, out, fingerprint=fingerprint)
    if config.process_index == 0:
        for stage in ("sft", "dpo"):
            done = stage_done(os.path.join(out, stage))
            if done:
                summary[stage] = done
        if write_summary(out, summary):
            print(f"\nsummary: {os.path.join(out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    try:
        main()
    finally:  # a gloo/NCCL group left for interpreter exit can abort the process ("terminate called ...")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
