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

`--resume_from_checkpoint` takes a checkpoint folder, or a word: `true` / `yes` / `1` resume from the newest
complete checkpoint in `--output_dir`, `false` / `no` / `0` / `none` start afresh (any case; a folder named
like one of the words is given as `./true`). TRL's script and transformers pass the value on as a path.

A mixture of data sets, as TRL's `DatasetMixtureConfig` (`datasets`, `streaming`, `test_split_size`), is a
`datasets:` list in the YAML file, each entry TRL's `DatasetConfig` (`path`, `name`, `data_dir`,
`data_files`, `split` = "train", `columns`, `fraction`); `--datasets PATH ...` gives entries with a path
only. The entries are loaded (local files and folders as for `--dataset_name`), cut to their `columns`,
concatenated in order, and `test_split_size` holds a share out as the test split (`load_mixture`). As in
TRL, `datasets` wins over `--dataset_name` (a warning says it is ignored).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields

from transformers import HfArgumentParser

from .config import DPOConfig

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# `--resume_from_checkpoint` words (compared lower-cased): the newest checkpoint, or none
RESUME_LATEST = ("true", "yes", "1")
RESUME_NONE = ("false", "no", "0", "none", "")

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """TRL's `DatasetConfig`: one data set of a `datasets:` mixture, with `datasets.load_dataset`'s arguments.

    `path` is a hub id, a local folder, a local data file (`DATA_BUILDERS`; its one split is "train") or a
    builder name such as "json" with `data_files`. `columns` keeps those columns only. `fraction`: the
    entry's share of the mixture, set on every entry or on none (TRL's rule: the shares are normalised, and
    the first round(share x N) rows of each entry are kept, N the largest size that repeats no row).
    """

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None


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
        metadata={
            "help": "Hold out this fraction (or number) of the train split (or mixture) as the test split."
        },
    )
    ignore_bias_buffers: bool = field(
        default=False,
        metadata={"help": "DDP: ignore boolean buffers (TRL's workaround for LM mask buffers)."},
    )
    datasets: list[DatasetConfig] = field(
        default_factory=list,
        metadata={
            "help": "A mixture of data sets (TRL's `datasets`; entries in the YAML file, or paths here)."
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the `datasets` mixture (needs max_steps)."}
    )

    def __post_init__(self):
        # entries of the YAML file arrive as mappings (as in TRL's DatasetMixtureConfig)
        known = {f.name for f in fields(DatasetConfig)}
        self.datasets = list(self.datasets)  # the caller's list (or the YAML file's) is left as it is
        for index, entry in enumerate(self.datasets):
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, DatasetConfig):
                if not isinstance(entry, dict) or "path" not in entry:
                    raise ValueError(f"datasets[{index}] must be a mapping with a `path`, got {entry!r}.")
                unknown = sorted(set(entry) - known)
                if unknown:
                    raise ValueError(
                        f"datasets[{index}] ({entry['path']}): unknown keys {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known))})."
                    )
                entry = DatasetConfig(**entry)
            if isinstance(entry.columns, str):
                entry = dataclasses.replace(entry, columns=[entry.columns])
            self.datasets[index] = entry


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
    if script.dataset_name is None and not script.datasets:
        raise SystemExit(
            "dpo-trainer: --dataset_name (a hub id, a local folder or a data file) or a `datasets:` list in the "
            "--config file is required."
        )
    return script, training, model


def resume_from(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: True for the newest checkpoint, None for none,
    else the folder (a YAML `true` / `false` arrives as a bool).

    >>> [resume_from(v) for v in ("true", "True", "1", "yes", "false", "None", "0", "runs/checkpoint-500")]
    [True, True, True, True, None, None, None, 'runs/checkpoint-500']
    """
    if value is None or isinstance(value, bool):
        return value or None
    word = value.strip().lower()
    if word in RESUME_LATEST:
        return True
    if word in RESUME_NONE:
        return None
    return value


def _load_source(path: str, *, file_split: str, streaming: bool, **kwargs):
    """`load_dataset` on a hub id, a local folder or a builder name (with `kwargs`), or on a local data file,
    whose one split is named `file_split`; every split."""
    from datasets import load_dataset

    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATA_BUILDERS:
            raise SystemExit(f"dpo-trainer: {path}: data files must be one of {', '.join(DATA_BUILDERS)}.")
        return load_dataset(DATA_BUILDERS[extension], data_files={file_split: path}, streaming=streaming)
    return load_dataset(path, streaming=streaming, **kwargs)


def load_data(script: ScriptArguments):
    """The `DatasetDict` (or `IterableDatasetDict`) named by `--dataset_name`, or the `datasets` mixture."""
    if script.datasets:
        if script.dataset_name is not None:
            logger.warning(
                "Both `datasets` and `dataset_name` are given: the `datasets` mixture is loaded and "
                "dataset_name=%s is ignored (as in TRL).",
                script.dataset_name,
            )
        data, streaming = load_mixture(script), script.streaming
    else:
        data = _load_source(
            script.dataset_name,
            file_split=script.dataset_train_split,
            streaming=script.dataset_streaming,
            name=script.dataset_config,
        )
        streaming = script.dataset_streaming
    if script.test_split_size is not None:
        if streaming:
            raise SystemExit(
                "dpo-trainer: --test_split_size needs a map-style data set, not --dataset_streaming or "
                "`streaming`."
            )
        size = script.test_split_size
        parts = data[script.dataset_train_split].train_test_split(
            test_size=int(size) if size >= 1 else size, seed=0
        )
        data[script.dataset_train_split], data[script.dataset_test_split] = parts["train"], parts["test"]
    return data


def _entry_name(index: int, entry: DatasetConfig) -> str:
    return f"datasets[{index}] ({entry.path})"


def _load_entry(index: int, entry: DatasetConfig, streaming: bool):
    """One entry of a mixture: its split, cut to its columns."""
    where = _entry_name(index, entry)
    if os.path.isfile(entry.path) and (entry.name, entry.data_dir, entry.data_files) != (None, None, None):
        raise SystemExit(
            f"dpo-trainer: {where} is a data file; `name`, `data_dir` and `data_files` apply to a folder, a hub "
            "data set or a builder such as `json`."
        )
    kwargs = {"name": entry.name, "data_dir": entry.data_dir, "data_files": entry.data_files}
    try:
        splits = _load_source(entry.path, file_split="train", streaming=streaming, **kwargs)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"dpo-trainer: {where} cannot be loaded: {error}") from error
    base = entry.split.split("[", 1)[0]  # "train[:100]": a slice of "train"
    if base not in splits:
        raise SystemExit(
            f"dpo-trainer: {where} has no split {base!r} (splits: {', '.join(splits)}); set the entry's `split`."
        )
    if entry.split == base:
        data = splits[base]
    elif streaming:
        raise SystemExit(f"dpo-trainer: {where}: the split slice {entry.split!r} needs `streaming: false`.")
    else:
        from datasets import load_dataset

        if os.path.isfile(entry.path):
            extension = os.path.splitext(entry.path)[1].lower()
            data = load_dataset(DATA_BUILDERS[extension], data_files={"train": entry.path}, split=entry.split)
        else:
            data = load_dataset(entry.path, split=entry.split, **kwargs)
    if entry.columns is not None:
        available = data.column_names  # None for some streamed data: checked when read
        if available is not None:
            missing = [column for column in entry.columns if column not in available]
            if missing:
                raise SystemExit(
                    f"dpo-trainer: {where} has no column {', '.join(map(repr, missing))} "
                    f"(columns: {', '.join(available)})."
                )
        data = data.select_columns(entry.columns)
    return data


def _check_same_columns(parts: list, entries: list[DatasetConfig]) -> None:
    """The entries of a mixture must have the same columns, of the same types, to be concatenated."""
    first = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if first.column_names is None or part.column_names is None:
            continue
        if set(part.column_names) != set(first.column_names):
            raise SystemExit(
                f"dpo-trainer: the `datasets` entries do not have the same columns: {_entry_name(0, entries[0])} "
                f"has {', '.join(first.column_names)} and {_entry_name(index, entries[index])} has "
                f"{', '.join(part.column_names)}; keep common ones with each entry's `columns`."
            )
        if first.features is None or part.features is None:
            continue
        for column in first.column_names:
            if part.features[column] != first.features[column]:
                raise SystemExit(
                    f"dpo-trainer: column {column!r} holds {first.features[column]} in "
                    f"{_entry_name(0, entries[0])} but {part.features[column]} in "
                    f"{_entry_name(index, entries[index])}; the entries of a mixture must hold the same types."
                )


def load_mixture(script: ScriptArguments):
    """TRL's `get_dataset`: the `datasets` entries loaded, cut to their `columns`, concatenated in order.

    Returns a `DatasetDict` (an `IterableDatasetDict` with `streaming`) whose one split is named by
    `--dataset_train_split` ("train", TRL's name); `load_data` then holds out `test_split_size`. With every
    entry's `fraction` set, each entry contributes its first round(weight x N) rows, the weights being the
    fractions normalised to sum to 1 and N the largest mixture size that repeats no row (as in TRL).
    """
    from datasets import DatasetDict, IterableDatasetDict, concatenate_datasets

    entries = script.datasets
    parts = [_load_entry(index, entry, script.streaming) for index, entry in enumerate(entries)]
    _check_same_columns(parts, entries)
    fractions = [entry.fraction for entry in entries]
    if any(fraction is not None for fraction in fractions):
        unset = [_entry_name(i, e) for i, e in enumerate(entries) if e.fraction is None]
        if unset:
            raise SystemExit(
                f"dpo-trainer: `fraction` must be set on every `datasets` entry or on none; {', '.join(unset)} "
                "has none."
            )
        negative = [_entry_name(i, e) for i, e in enumerate(entries) if e.fraction < 0]
        if negative or sum(fractions) <= 0:
            raise SystemExit(
                f"dpo-trainer: `fraction` must be >= 0 with a positive sum (see {', '.join(negative) or 'all'})."
            )
        if script.streaming:
            raise SystemExit("dpo-trainer: `fraction` needs map-style data sets, not `streaming: true`.")
        weights = [fraction / sum(fractions) for fraction in fractions]
        total = min(len(part) / weight for part, weight in zip(parts, weights) if weight > 0)
        parts = [part.select(range(round(weight * total))) for part, weight in zip(parts, weights)]
    try:
        combined = concatenate_datasets(parts)
    except ValueError as error:
        raise SystemExit(f"dpo-trainer: the `datasets` entries cannot be concatenated: {error}") from error
    logger.info("Mixture of %d data sets: %s rows", len(parts), getattr(combined, "num_rows", "streamed"))
    return (IterableDatasetDict if script.streaming else DatasetDict)({script.dataset_train_split: combined})


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
    source = "the `datasets` mixture" if script.datasets else script.dataset_name
    if script.dataset_train_split not in data:
        raise SystemExit(
            f"dpo-trainer: {source} has no split {script.dataset_train_split!r} "
            f"(splits: {', '.join(data)}); set --dataset_train_split."
        )
    evaluation = None
    if training.eval_strategy != "no":
        if script.dataset_test_split not in data:
            hint = (
                "set test_split_size" if script.datasets else "set --dataset_test_split or --test_split_size"
            )
            raise SystemExit(
                f"dpo-trainer: eval_strategy is {training.eval_strategy.value!r} but {source} has no "
                f"split {script.dataset_test_split!r} (splits: {', '.join(data)}); {hint}."
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
    trainer.train(resume_from_checkpoint=resume_from(training.resume_from_checkpoint))
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
