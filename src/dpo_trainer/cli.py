"""`dpo-trainer`: DPO from the command line, with the flags of `trl dpo`.

    dpo-trainer --model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \\
        --output_dir Qwen2-0.5B-DPO --use_peft --lora_r 32 --lora_alpha 16
    dpo-trainer --config dpo.yaml --learning_rate 5e-7      # flags given on the command line win over the file

Flags: every `DPOConfig` field (`--beta`, `--max_length`, `--loss_type`, ...), the data flags of TRL's
`ScriptArguments` (`--dataset_name` a hub id, a local folder or a local `.jsonl` / `.json` / `.csv` /
`.parquet` file; `--dataset_config`, `--dataset_train_split`, `--dataset_test_split`,
`--dataset_streaming`) and the model flags of TRL's `ModelConfig` (`--model_name_or_path`, `--dtype`,
`--attn_implementation`, `--use_peft`, `--lora_r`, `--lora_alpha`, ..., `--load_in_4bit`). The YAML file
of `--config` maps flag names to values; an `env:` mapping in it sets environment variables.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .config import DPOConfig

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class ScriptArguments:
    """TRL's `ScriptArguments` (the data set to train on)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id, local folder or local data file of the preference rows."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The data set's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on (with eval_strategy)."}
    )
    dataset_streaming: bool = field(
        default=False, metadata={"help": "Stream the data set (needs max_steps)."}
    )
    test_split_size: float | None = field(
        default=None,
        metadata={"help": "Hold out this fraction (or number) of the train split as the test split."},
    )
    ignore_bias_buffers: bool = field(
        default=False,
        metadata={"help": "DDP: ignore boolean buffers (TRL's workaround for LM mask buffers)."},
    )


@dataclass
class ModelArguments:
    """TRL's `ModelConfig`: which model, in which dtype, with which adapter or quantization."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the model."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    dtype: str | None = field(
        default="float32",
        metadata={
            "help": "Load the model in this dtype.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "LoRA target modules."})
    lora_target_parameters: list[str] | None = field(
        default=None, metadata={"help": "LoRA target parameters."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full."}
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "LoRA task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA (alpha / sqrt(r))."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base model (with LoRA)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit base model (QLoRA, with LoRA)."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit type.", "choices": ["fp4", "nf4"]}
    )
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested (double) quantization."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "4-bit storage dtype."})

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("--load_in_8bit and --load_in_4bit exclude each other.")
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]  # e.g. "all-linear"


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, DPOConfig, ModelArguments), prog="dpo-trainer")


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, DPOConfig, ModelArguments]:
    """Parse flags and an optional `--config FILE.yaml` (its values are defaults the flags override)."""
    import yaml  # a transformers dependency

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SystemExit("dpo-trainer: --config needs a YAML file.")
        path = argv[at + 1]
        del argv[at : at + 2]
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"dpo-trainer: {path} must hold a YAML mapping of flag names to values.")
        for key, value in (values.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        known = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SystemExit(f"dpo-trainer: unknown settings in {path}: {', '.join(unknown)}.")
        for key, value in values.items():
            action = known[key]
            if isinstance(value, (dict, list)) and action.nargs is None:
                value = json.dumps(value)  # dict fields take a JSON string, as on the command line
            action.default, action.required = value, False
    try:
        script, training, model = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # a DPOConfig / ModelArguments check: a message, not a trace
        raise SystemExit(f"dpo-trainer: {error}") from error
    if model.model_name_or_path is None:
        raise SystemExit("dpo-trainer: --model_name_or_path is required (a hub id or a local folder).")
    if script.dataset_name is None:
        raise SystemExit("dpo-trainer: --dataset_name is required (a hub id, a local folder or a data file).")
    return script, training, model


def load_data(script: ScriptArguments):
    """The `DatasetDict` (or `IterableDatasetDict`) named by `--dataset_name`."""
    from datasets import load_dataset

    name = script.dataset_name
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in DATA_BUILDERS:
            raise SystemExit(f"dpo-trainer: {name}: data files must be one of {', '.join(DATA_BUILDERS)}.")
        builder, files = DATA_BUILDERS[extension], {script.dataset_train_split: name}
        data = load_dataset(builder, data_files=files, streaming=script.dataset_streaming)
    else:
        data = load_dataset(name, name=script.dataset_config, streaming=script.dataset_streaming)
    if script.test_split_size is not None:
        if script.dataset_streaming:
            raise SystemExit(
                "dpo-trainer: --test_split_size needs a map-style data set, not --dataset_streaming."
            )
        size = script.test_split_size
        parts = data[script.dataset_train_split].train_test_split(
            test_size=int(size) if size >= 1 else size, seed=0
        )
        data[script.dataset_train_split], data[script.dataset_test_split] = parts["train"], parts["test"]
    return data


def quantization_config(model: ModelArguments):
    if not (model.load_in_4bit or model.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if model.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = model.dtype if model.dtype not in (None, "auto") else "float32"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=getattr(torch, compute),
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model.use_bnb_nested_quant,
        bnb_4bit_quant_storage=model.bnb_4bit_quant_storage,
    )


def peft_config(model: ModelArguments):
    if not model.use_peft:
        return None
    from peft import LoraConfig

    extra = {"target_parameters": model.lora_target_parameters} if model.lora_target_parameters else {}
    return LoraConfig(
        task_type=model.lora_task_type,
        r=model.lora_r,
        target_modules=model.lora_target_modules,
        lora_alpha=model.lora_alpha,
        lora_dropout=model.lora_dropout,
        bias="none",
        use_rslora=model.use_rslora,
        use_dora=model.use_dora,
        modules_to_save=model.lora_modules_to_save,
        **extra,
    )


def run(script: ScriptArguments, training: DPOConfig, model: ModelArguments):
    """Train and save as `trl dpo` does; returns the trainer."""
    from .trainer import DPOTrainer

    init = {
        "revision": model.model_revision,
        "trust_remote_code": training.trust_remote_code,
        "dtype": model.dtype,
    }
    if model.attn_implementation is not None:
        init["attn_implementation"] = model.attn_implementation
    training.model_init_kwargs = {**init, **(training.model_init_kwargs or {})}
    data = load_data(script)
    if script.dataset_train_split not in data:
        raise SystemExit(
            f"dpo-trainer: {script.dataset_name} has no split {script.dataset_train_split!r} "
            f"(splits: {', '.join(data)}); set --dataset_train_split."
        )
    evaluation = None
    if training.eval_strategy != "no":
        if script.dataset_test_split not in data:
            raise SystemExit(
                f"dpo-trainer: eval_strategy is {training.eval_strategy.value!r} but {script.dataset_name} has no "
                f"split {script.dataset_test_split!r} (splits: {', '.join(data)}); set --dataset_test_split."
            )
        evaluation = data[script.dataset_test_split]
    trainer = DPOTrainer(
        model=model.model_name_or_path,
        args=training,
        train_dataset=data[script.dataset_train_split],
        eval_dataset=evaluation,
        quantization_config=quantization_config(model),
        peft_config=peft_config(model),
    )
    if script.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model(training.output_dir)
    trainer.accelerator.print(f"Model saved to {training.output_dir}.")
    if training.push_to_hub:
        trainer.push_to_hub(dataset_name=script.dataset_name)
    return trainer


def main(argv: list[str] | None = None) -> None:
    """The `dpo-trainer` console script."""
    if not (sys.argv[1:] if argv is None else argv):
        make_parser().print_help()
        return
    run(*parse_args(argv))


if __name__ == "__main__":
    main()
