"""DPO on Anthropic-HH-format preference data (Rafailov et al. 2023, Sec. 6).

    python examples/hh.py                        # offline: tiny model, bundled hh_tiny data, ~1 min on CPU
    accelerate launch examples/hh.py             # the same under accelerate (one or several processes)
    accelerate launch examples/hh.py --model EleutherAI/pythia-2.8b --dataset Anthropic/hh-rlhf \\
        --lora_r 64 --beta 0.1 --learning_rate 1e-6 --bf16 --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 16 --output_dir runs/pythia-2.8b-dpo

`--dataset` is a hub id or a local folder holding `train.jsonl` / `test.jsonl` (or `.json`, `.parquet`),
or one local file (then 5% of it is held out). Rows are raw HH transcripts `{"chosen", "rejected"}`; the
prompt runs to the last "\\n\\nAssistant:". Every `DPOConfig` / `TrainingArguments` flag is accepted
(`--beta`, `--learning_rate`, `--max_steps`, `--bf16`, ...). With no `--model`, a tiny Llama is built
from a config with a tokenizer trained on the data, and the defaults below suit it; flags you pass win.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoTokenizer, HfArgumentParser

from dpo_trainer import DPOConfig, DPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_DATA = os.path.join(HERE, "data", "hh_tiny")
# Settings for the offline tiny model; any flag given on the command line overrides them.
TINY_DEFAULTS = {
    "max_steps": "200",
    "per_device_train_batch_size": "16",
    "per_device_eval_batch_size": "32",
    "learning_rate": "1e-3",
    "lr_scheduler_type": "cosine",
    "warmup_steps": "10",
    "logging_steps": "20",
    "max_length": "192",
    "max_prompt_length": "128",
    "save_strategy": "no",
    "seed": "0",
}
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass
class ScriptArguments:
    dataset: str = field(default=BUNDLED_DATA, metadata={"help": "Hub id, local folder or local file."})
    model: str | None = field(default=None, metadata={"help": "Hub id or local path; none: a tiny model."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows."}
    )
    max_eval_rows: int | None = field(default=200, metadata={"help": "Use at most this many test rows."})


def parse_args(argv: list[str]) -> tuple[ScriptArguments, DPOConfig]:
    given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    defaults = [] if "model" in given else [f"--{k}={v}" for k, v in TINY_DEFAULTS.items() if k not in given]
    if "output_dir" not in given:
        defaults.append(f"--output_dir={os.path.join('runs', 'hh-' + time.strftime('%Y%m%d-%H%M%S'))}")
    script_args, config = HfArgumentParser((ScriptArguments, DPOConfig)).parse_args_into_dataclasses(
        defaults + argv
    )
    return script_args, config


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
        splits = load_dataset(kind, data_files=dataset)["train"].train_test_split(test_size=0.05, seed=0)
    else:
        splits = load_dataset(dataset)
    train, test = splits["train"], splits["test"]
    if max_train_rows is not None:
        train = train.select(range(min(max_train_rows, len(train))))
    if max_eval_rows is not None:
        test = test.select(range(min(max_eval_rows, len(test))))
    return train.select_columns(["chosen", "rejected"]), test.select_columns(["chosen", "rejected"])


def build_model(script_args: ScriptArguments, config: DPOConfig, train):
    """The policy and its tokenizer: from `--model`, or a tiny Llama built from a config, offline."""
    if script_args.model is not None:
        return script_args.model, AutoTokenizer.from_pretrained(script_args.model)
    from dpo_trainer.tiny import tiny_causal_lm, train_tokenizer

    tokenizer = train_tokenizer((row["chosen"] + row["rejected"] for row in train), vocab_size=2000)
    return tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=config.seed), tokenizer


def peft_config(script_args: ScriptArguments):
    if script_args.lora_r <= 0:
        return None
    from peft import LoraConfig

    alpha = script_args.lora_alpha or 2 * script_args.lora_r
    return LoraConfig(
        r=script_args.lora_r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def check_output_dir(config: DPOConfig) -> None:
    """Refuse to write into a folder that already holds files, unless resuming from it."""
    if config.resume_from_checkpoint or not os.path.isdir(config.output_dir):
        return
    if os.listdir(config.output_dir):
        raise SystemExit(
            f"{config.output_dir} already holds files; choose another --output_dir or pass "
            "--resume_from_checkpoint to continue that run."
        )


def main(argv: list[str] | None = None) -> dict:
    script_args, config = parse_args(sys.argv[1:] if argv is None else argv)
    check_output_dir(config)
    train, test = load_hh(script_args.dataset, script_args.max_train_rows, script_args.max_eval_rows)
    model, tokenizer = build_model(script_args, config, train)
    trainer = DPOTrainer(
        model,
        args=config,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=peft_config(script_args),
    )
    before = trainer.evaluate(metric_key_prefix="before")
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    after = trainer.evaluate()
    trainer.save_model()
    summary = {"before_training": before, "after_training": after, "output_dir": config.output_dir}
    if trainer.is_world_process_zero():
        with open(os.path.join(config.output_dir, "metrics.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        print_summary(before, after)
    return summary


def print_summary(before: dict, after: dict) -> None:
    names = [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
    ]
    print(f"\n{'held-out metric':<22}{'before':>12}{'after':>12}")
    for name in names:
        print(
            f"{name:<22}{before.get('before_' + name, float('nan')):>12.4f}{after.get('eval_' + name, float('nan')):>12.4f}"
        )


if __name__ == "__main__":
    main()
