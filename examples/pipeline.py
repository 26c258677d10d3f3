"""The stage machinery of the example pipelines (`hh.py`, `sentiment.py`), so that each script reads as its
experiment: a run is a folder of stages, each marked done when its work is saved, so rerunning the same command
resumes where a killed run stopped.

    <output_dir>/run.json          marks the folder as a run of the script (its arguments, each stage's settings)
    <output_dir>/<stage>/done.json a finished stage and what it produced
    <output_dir>/<stage>/final     a training stage's model (or adapter)

A script declares its stages (`StageSettings`: the flags each one reads and the stages it builds on), opens the
run (`Run.open`: refuses a folder of other files, and a rerun whose changed settings would mix old results with
new ones, naming them; `--restart_stale` moves those stages aside) and runs each stage through `run.stage(name)`:

    stage = run.stage("dpo")
    if not stage.finished():            # an earlier run's stage is skipped
        resume = stage.start()          # the checkpoint an interrupted run left, or None
        ...                             # the stage's own work
        stage.finish(trainer, record)   # `final`, the log history and `done.json`

`train_stage` is that for any `Trainer`; `sft_stage` and `dpo_stage` are the two training stages both pipelines
run; `cached_json` keeps a stage's sampled results so that a rerun reads them back. Stages are named by the
script, so a pipeline may add any number (one per β, one per round of iterative DPO: `StageSettings(f"round{r}",
..., after=(f"round{r - 1}",))` chains each round's fingerprint to the one before, so a changed setting makes
that round and every later one stale). Besides: `parse_args` (a script's flags over a `DPOConfig`), `base_model`
(the offline tiny model), `load_splits`, the model loaders (`load_causal_lm`, `load_for_sampling`,
`load_policy`, `lora_config`, `training_args`) and `print_table`.

Every write is whole or not at all, and every process of a distributed run sees the same answers: the main
process reads, decides and writes; the others wait for it and take its decision. A damaged file (truncated,
half-written) is named in a warning and its stage done again; a finished run is read without writing, so it
can be summarised again from read-only storage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from dpo_trainer.checkpoints import checkpoint_problem, list_checkpoints

# ---------------------------------------------------------------- run folders: whole writes, main-process decisions


RUN_MARKER = "run.json"  # marks a folder as a run folder of an example script, so a rerun may resume in it


def write_whole(path: str, write) -> None:
    """`write(handle)` into `path`, whole or not at all (a killed run leaves no half-written file)."""
    try:
        with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")


def write_json(path: str, value, indent: int = 2) -> None:
    write_whole(path, lambda handle: json.dump(value, handle, indent=indent))


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_whole(path, lambda handle: handle.writelines(json.dumps(row) + "\n" for row in rows))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_json(path: str, instead: str, lines: bool = False):
    """The JSON value of `path` (a list of values with `lines`, JSONL), or None when the file is missing or
    damaged; a damaged file (truncated, half-written) is named in a warning that ends with `instead`, what the
    run does about it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle] if lines else json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        warn(f"{path} is damaged ({type(error).__name__}: {error}); {instead}")
        return None


def main_decides(decide):
    """`decide()`'s value, computed by the main process and given to every process."""
    from accelerate import PartialState

    state = PartialState()
    value = [decide() if state.is_main_process else None]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(value)
    return value[0]


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def processes() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


def stage_done(folder: str) -> dict | None:
    """What a stage of an earlier run recorded when it finished (`done.json`), or None (a damaged `done.json`
    is named in a warning, and the stage counts as unfinished)."""
    return read_json(os.path.join(folder, "done.json"), "the stage is treated as unfinished and done again.")


def stage_finished(folder: str, outputs: tuple[str, ...] = ()) -> bool:
    """Whether a stage finished in an earlier run: its `done.json` and each of its JSON or JSONL `outputs` (file
    names in `folder`) read whole. The main process looks; every process gets its answer."""

    def finished() -> bool:
        if stage_done(folder) is None:
            return False
        for name in outputs:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                warn(f"{path} is missing; the stage is treated as unfinished and done again.")
                return False
            again = "the stage is treated as unfinished and done again."
            if read_json(path, again, lines=name.endswith(".jsonl")) is None:
                return False
        return True

    return main_decides(finished)


def unwritable(folder: str) -> str | None:
    """Why no file can be written in `folder` (created if missing), or None when one can: a file is made and
    removed (permission bits do not tell a read-only mount, nor what root may do)."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        return error.strerror or str(error)
    return None


def cannot_write(folder: str, stage: str, reason: str) -> str:
    return (
        f"[{stage}] {folder} cannot be written ({reason}), and this stage has work to do. Make the run folder "
        "writable, or choose another --output_dir."
    )


def require_writable(folder: str, stage: str) -> None:
    """Stop with a message when the work of `stage` cannot be written in `folder` (this process only)."""
    reason = unwritable(folder)
    if reason:
        raise SystemExit(cannot_write(folder, stage, reason))


def start_stage(folder: str, stage: str) -> str | None:
    """Before a training stage's work: the stage's folder, writable (else every process stops with a message),
    and the checkpoint to resume from (None: the stage starts over).

    Checkpoint folders newer than the newest complete one are what a kill while saving left (possibly in the
    first checkpoint, so that nothing can be resumed): they are removed with a warning naming them, so that
    the run does not write its checkpoints among their files.
    """

    def decide() -> tuple[str | None, str | None]:
        reason = unwritable(folder)
        if reason:
            return None, cannot_write(folder, stage, reason)
        found, removed = None, []
        for path in list_checkpoints(folder):
            problem = checkpoint_problem(path)
            if problem is None:
                found = path
                break
            removed.append(f"{os.path.basename(path)} ({problem})")
            shutil.rmtree(path)
        if removed:
            then = (
                f"resuming from {os.path.basename(found)}"
                if found
                else "no complete checkpoint: the stage starts over"
            )
            warn(
                f"[{stage}] incomplete checkpoint folders in {folder} (a run killed while saving leaves them so) "
                f"removed: {'; '.join(removed)}; {then}."
            )
        return found, None

    found, error = main_decides(decide)
    if error:
        raise SystemExit(error)
    return found


def mark_done(folder: str, info: dict, process_index: int) -> None:
    """Record a finished stage (main process) with the number of processes that trained it, then wait for every
    process."""
    info = {**info, "processes": processes()}
    if process_index == 0:
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "done.json"), info)
    wait_for_everyone()


def save_pretrained_whole(path: str, *objects) -> None:
    """`save_pretrained` of each of `objects` (a model, its tokenizer) into `path`, whole or not at all: written
    beside it, then renamed (a killed run's leftovers, `path` without `config.json`, are replaced)."""
    for stale in (f"{path}.tmp", path):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    for thing in objects:
        thing.save_pretrained(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def save_history(trainer, folder: str, process_index: int) -> None:
    """The trainer's `log_history` as `<folder>/log_history.json` (main process)."""
    if process_index == 0:
        write_json(os.path.join(folder, "log_history.json"), trainer.state.log_history, indent=1)


def prepare_run_dir(out: str, script_args) -> None:
    """Refuse a folder holding anything but an earlier run of the script (which is then resumed, without
    writing to it); mark a new one with `script_args` (a dataclass) and the start time."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--output_dir {out} is a file, not a folder: choose another --output_dir.")
    marker = os.path.join(out, RUN_MARKER)
    if os.path.exists(marker):
        return
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(
            f"{out} already holds files that are not a run of this script; choose another --output_dir."
        )
    try:
        os.makedirs(out, exist_ok=True)
        write_json(
            marker, {"script_args": asdict(script_args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
    except OSError as error:
        raise SystemExit(
            f"--output_dir {out} cannot be written ({error.strerror or error}: {error.filename}); make it "
            "writable, or choose another --output_dir."
        ) from None


def write_summary(out: str, summary: dict) -> bool:
    """`<out>/summary.json`, or, when the run folder cannot be written (read-only storage), a line saying that the
    results are only printed. Whether it was written."""
    reason = unwritable(out)
    if reason:
        print(
            f"\nsummary: not written, {out} cannot be written ({reason}); the results above are printed only."
        )
        return False
    write_json(os.path.join(out, "summary.json"), summary)
    return True


# ---------------------------------------------------------------- the command line


def arg(default, help: str):
    """A script argument with its `--help` text, for `HfArgumentParser` dataclasses."""
    return field(default=default, metadata={"help": help})


def run_script(main) -> None:
    """`main()`, then the process group torn down (a gloo/NCCL group left for interpreter exit can abort the
    process: "terminate called ...")."""
    import torch

    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


UNSET_OUTPUT_DIR = "runs/unset"  # no --output_dir given: the script names the run folder


def parse_args(argv: list[str], script_class, offline_defaults, new_output_dir, **defaults):
    """`(script_args, config)`: the script's arguments and a `DPOConfig` from `argv`, over `defaults`, and over
    `offline_defaults` (a dataclass) when no `--model` is given; without `--output_dir`, the folder that
    `new_output_dir(script_args, config)` names, decided by the main process for every process."""
    from transformers import HfArgumentParser

    from dpo_trainer import DPOConfig

    parser = HfArgumentParser((script_class, DPOConfig))
    parser.set_defaults(**defaults, output_dir=UNSET_OUTPUT_DIR)
    script_args, config = parser.parse_args_into_dataclasses(argv)
    if script_args.model is None:
        parser.set_defaults(**asdict(offline_defaults))
        script_args, config = parser.parse_args_into_dataclasses(argv)
    if config.output_dir == UNSET_OUTPUT_DIR:
        parser.set_defaults(output_dir=main_decides(lambda: new_output_dir(script_args, config)))
        script_args, config = parser.parse_args_into_dataclasses(argv)
    return script_args, config


# ---------------------------------------------------------------- settings fingerprints


@dataclass(frozen=True)
class StageSettings:
    """What decides a stage's result: its name (its folder in the run), the script's and the config's fields it
    reads, and the stages it builds on, whose fingerprints are chained into its own."""

    name: str
    script_keys: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


# The DPOConfig fields that decide a DPO stage's result besides β (which a stage may set itself).
DPO_SETTINGS = ("loss_type", "loss_weights", "label_smoothing", "rpo_alpha", "learning_rate", "max_steps",
                "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
                "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "max_length",
                "max_prompt_length", "truncation_mode", "precompute_ref_log_probs", "max_tokens_per_batch", "seed",
                "bf16", "fp16", "model_init_kwargs", "on_nonfinite")  # fmt: skip


def run_manifest(stages, script_args, config) -> dict:
    """{stage: {"settings", "fingerprint"}}: every setting that affects the stage's result, and a hash of
    them and of the fingerprints of the stages it builds on, so that a changed stage invalidates all later."""
    manifest = {}
    for stage in stages:
        settings = {key: getattr(script_args, key) for key in stage.script_keys}
        settings.update({key: getattr(config, key, None) for key in stage.config_keys})
        settings = json.loads(json.dumps(settings, default=str))  # as run.json will read back
        settings["after"] = {name: manifest[name]["fingerprint"] for name in stage.after}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        manifest[stage.name] = {"settings": settings, "fingerprint": digest}
    return manifest


def manifest_changes(saved: dict, manifest: dict) -> dict[str, list[str]]:
    """{stage: ["key: old -> new", ...]} for the stages whose fingerprint differs from `saved`'s."""
    changes = {}
    for stage in manifest:
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
    `restart_stale`, move the stale stages' folders aside (`<stage>.stale-<time>`) and start them over.
    Returns what `run.json` holds ({} for a damaged one, whose every stage counts as changed)."""
    marker = os.path.join(out, RUN_MARKER)
    recorded = read_json(marker, "the settings of the run's stages are unknown: each counts as changed.")
    if recorded is None and os.path.exists(marker):
        recorded = {}
        changes = {stage: [f"settings unknown ({marker} is damaged)"] for stage in manifest}
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


def default_output_dir(manifest: dict, prefix: str) -> str:
    """The newest `runs/<prefix>-*` folder run with exactly these settings, else a new timestamped one."""
    runs = sorted(os.listdir("runs")) if os.path.isdir("runs") else []
    runs = [name for name in runs if name.startswith(f"{prefix}-")]
    for name in reversed(runs):
        recorded = read_json(os.path.join("runs", name, RUN_MARKER), "not continued.")
        if isinstance(recorded, dict):
            saved = recorded.get("stages") or {}
            if all((saved.get(s) or {}).get("fingerprint") == manifest[s]["fingerprint"] for s in manifest):
                print(f"continuing the earlier run with the same settings: {os.path.join('runs', name)}")
                return os.path.join("runs", name)
            break  # the last default run had other settings: a new one
    fresh = os.path.join("runs", f"{prefix}-" + time.strftime("%Y%m%d-%H%M%S"))
    taken = [name for name in [fresh] + [f"{fresh}-{i}" for i in range(2, 100)] if not os.path.exists(name)]
    return taken[0]


# ---------------------------------------------------------------- runs and stages


@dataclass
class Run:
    """An open run folder: `out` (the config's `output_dir`), the run's config, and the settings manifest of
    its stages ({} for a script that declares none)."""

    out: str
    config: object
    manifest: dict

    @classmethod
    def open(cls, script_args, config, stages=(), restart_stale: bool = False) -> Run:
        """Take the config's `output_dir` as the run folder (every process): the main process refuses a folder
        holding anything else, and with `stages` (`StageSettings`) checks and records their settings."""
        out = config.output_dir
        manifest = run_manifest(stages, script_args, config)
        if config.process_index == 0:
            prepare_run_dir(out, script_args)
            if stages:
                recorded = check_run_manifest(out, manifest, restart_stale)
                started = {"script_args": asdict(script_args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
                marker = json.loads(json.dumps({**started, **recorded, "stages": manifest}))
                if marker != recorded:  # so that a finished run on read-only storage can be summarised again
                    write_json(os.path.join(out, RUN_MARKER), marker)
        wait_for_everyone()
        return cls(out, config, manifest)

    @property
    def is_main(self) -> bool:
        return self.config.process_index == 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage(self, name: str) -> Stage:
        return Stage(self, name)

    def fingerprint(self, name: str) -> str:
        """The stage's settings fingerprint ("" when the script declares no settings for it)."""
        return (self.manifest.get(name) or {}).get("fingerprint", "")

    def done(self, names) -> dict:
        """{stage: what its `done.json` recorded} for those of `names` that finished."""
        records = {name: stage_done(self.path(name)) for name in names}
        return {name: record for name, record in records.items() if record}

    def write_summary(self, summary: dict, note: str = "") -> None:
        """`summary.json` (main process), and its path printed."""
        if self.is_main and write_summary(self.out, summary):
            print(f"\nsummary: {self.path('summary.json')}{note}")


class Stage:
    """One stage of a run: its folder `<out>/<name>`, and `final` (a training stage's saved model)."""

    def __init__(self, run: Run, name: str):
        self.run, self.name = run, name
        self.folder = run.path(name)
        self.final = os.path.join(self.folder, "final")
        self.started = time.time()

    def finished(self, outputs: tuple[str, ...] = ()) -> bool:
        """Whether an earlier run finished it (its `done.json` and each of its JSON/JSONL `outputs` read whole),
        said when so; every process gets the main process's answer."""
        if not stage_finished(self.folder, outputs):
            return False
        print(
            f"[{self.name}] already done: {os.path.join(self.folder, outputs[-1]) if outputs else self.final}"
        )
        return True

    def start(self) -> str | None:
        """Before the stage's work: its folder, writable, and the checkpoint to resume from (None: from the start)."""
        self.started = time.time()
        return start_stage(self.folder, self.name)

    def finish(self, trainer=None, record: dict | None = None, note: str = "") -> dict:
        """After the stage's work: the trainer's model saved as `final` with its log history, and `done.json`
        written with `record`, the seconds taken and the number of processes. Returns `record` as written."""
        if trainer is not None:
            trainer.save_model(self.final)
            save_history(trainer, self.folder, self.run.config.process_index)
        record = {**(record or {}), "seconds": time.time() - self.started}
        mark_done(self.folder, record, self.run.config.process_index)
        if trainer is not None:
            steps = trainer.state.global_step
            print(f"[{self.name}] {steps} steps in {record['seconds']:.0f}s{note}: {self.final}")
        return record


# ---------------------------------------------------------------- data and models


DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


def load_splits(dataset: str, check_file=None):
    """The splits of `dataset`: a hub id, a local folder with `train` / `test` files (`.jsonl`, `.json`,
    `.parquet`), or one local file (5% held out as `test`), whose rows `check_file(rows, path)` may check first."""
    from datasets import load_dataset

    if os.path.isdir(dataset):
        files = {}
        for split in ("train", "test"):
            found = [os.path.join(dataset, split + ext) for ext in DATA_EXTENSIONS]
            found = [path for path in found if os.path.exists(path)]
            if not found:
                raise FileNotFoundError(f"{dataset} has no {split}{{{','.join(DATA_EXTENSIONS)}}} file.")
            files[split] = found[0]
        kind = "parquet" if files["train"].endswith(".parquet") else "json"
        return load_dataset(kind, data_files=files)
    if os.path.isfile(dataset):
        kind = "parquet" if dataset.endswith(".parquet") else "json"
        rows = load_dataset(kind, data_files=dataset)["train"]
        if check_file is not None:
            check_file(rows, dataset)  # before the shuffled split renumbers them
        return rows.train_test_split(test_size=0.05, seed=0)
    return load_dataset(dataset)


def head(rows, limit: int | None):
    """The first `limit` rows of a Dataset (all of them for None)."""
    return rows if limit is None else rows.select(range(min(limit, len(rows))))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def check_preference_file(rows, path: str) -> None:
    """Raise for a bad row of one local file of preference rows, naming its position in the file (row i is
    line i + 1 of JSONL).

    Text rows are checked as the trainer will read them (an HH transcript must split at its last
    "\\n\\nAssistant:"); message lists need the tokenizer's chat template, which the trainer checks later.
    """
    from dpo_trainer.data import check_row_text, detect_format, to_example
    from dpo_trainer.data.formats import FORMAT_COLUMNS

    fmt = detect_format(rows.column_names)
    for index, row in enumerate(rows):
        try:
            check_row_text(row, index)
            if all(isinstance(row[name], str) for name in FORMAT_COLUMNS[fmt]):
                to_example(row, index, fmt)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{path} (row {index} is line {index + 1} of a JSONL file): {error}") from error


def base_model(run: Run, model: str | None, texts, *, vocab_size: int, hidden_size: int, layers: int) -> str:
    """Where the base model lives: `model`, or a tiny Llama with a tokenizer trained on `texts` (an iterable
    of strings), built offline under `<out>/base` by the main process."""
    if model is not None:
        return model
    path = run.path("base")
    if not os.path.exists(os.path.join(path, "config.json")) and run.is_main:
        from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

        tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
        built = tiny_causal_lm(
            tokenizer, hidden_size=hidden_size, num_layers=layers, num_heads=4, seed=run.config.seed
        )
        save_pretrained_whole(path, built, tokenizer)
    wait_for_everyone()  # the others load it only once it is written
    return path


def load_tokenizer(path: str):
    """The model's tokenizer as it is (one without a pad token stays so: the trainers and samplers pad with
    its EOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str, config, *, quantize: bool = False, dtype=None, peft_config=None):
    """`from_pretrained` with the config's `model_init_kwargs` (which win over `dtype`); `quantize`: a 4-bit NF4
    base (QLoRA) computing in the config's precision; `peft_config`: with a new adapter to train."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(config.model_init_kwargs or {})
    if dtype is not None:
        kwargs.setdefault("dtype", dtype)
    if quantize:
        compute = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return model


def sampling_device():
    """This process's accelerator (accelerate's `PartialState`: cuda:<local rank>, mps, or cpu)."""
    from accelerate import PartialState

    return PartialState().device


def load_for_sampling(path: str, config):
    """A model for sampling on this process's accelerator, in the precision trained in (bf16 with --bf16, fp16
    with --fp16, else as saved)."""
    import torch

    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
    return load_causal_lm(path, config, dtype=dtype).to(sampling_device())


def load_policy(path: str, sft: str, config, *, for_sampling: bool = True):
    """A trained policy: full weights, or the SFT model with the adapter merged in; `for_sampling`: on this
    process's accelerator in the training precision (`load_for_sampling`), else as `load_causal_lm` loads it."""

    def load(folder):
        return load_for_sampling(folder, config) if for_sampling else load_causal_lm(folder, config)

    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        return PeftModel.from_pretrained(load(sft), path).merge_and_unload()
    return load(path)


def lora_config(script_args):
    """The LoRA adapter the script's flags ask for (`lora_r`, `lora_alpha`, default 2 * rank), or None when
    `full` trains every weight (a `qlora` flag always trains an adapter)."""
    if script_args.full and not getattr(script_args, "qlora", False):
        return None
    from peft import LoraConfig

    alpha = script_args.lora_alpha or 2 * script_args.lora_r
    return LoraConfig(
        r=script_args.lora_r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"
    )


# ---------------------------------------------------------------- the training stages


def training_args(config, folder: str, *, only: tuple[str, ...] | None = None, **overrides):
    """The run's settings for a stage writing to `folder`, with `overrides`.

    `only=None`: a copy of the run's config (building another `TrainingArguments` resets accelerate's process
    state, which on CPU turns a multi-process run into independent processes). `only=(fields)`: a fresh
    `TrainingArguments` taking just those fields from the config (so that a flag meant for DPO alone, say
    `--weight_decay`, does not reach a stage whose fingerprint does not name it).
    """
    if only is not None:
        from transformers import TrainingArguments

        return TrainingArguments(
            output_dir=folder, **{key: getattr(config, key) for key in only}, **overrides
        )
    args = copy.deepcopy(config)
    args.output_dir = folder
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def train_stage(run: Run, name: str, make_trainer, record: dict | None = None) -> str:
    """A training stage: `make_trainer(folder)` (any `Trainer`), trained, resumed from the checkpoint an
    interrupted run left, saved as `final` with `record` in `done.json`; skipped when an earlier run finished
    it. Returns the `final` folder."""
    stage = run.stage(name)
    if stage.finished():
        return stage.final
    resume = stage.start()
    trainer = make_trainer(stage.folder)
    trainer.train(resume_from_checkpoint=resume)
    stage.finish(trainer, record)
    return stage.final


def sft_stage(run: Run, base: str, train, eval_dataset=None, *, max_steps: int, learning_rate: float,
              only: tuple[str, ...] | None = None, name: str = "sft") -> str:  # fmt: skip
    """Fine-tune `base` on the chosen responses of `train` (preference rows); returns the model's folder.

    `done.json` records the held-out loss on `eval_dataset`, or without one the last training loss; `only` as
    in `training_args`.
    """
    from dpo_trainer.sft import sft_trainer

    stage, config = run.stage(name), run.config
    if stage.finished():
        return stage.final
    resume = stage.start()
    tokenizer = load_tokenizer(base)
    args = training_args(config, stage.folder, only=only, max_steps=max_steps, learning_rate=learning_rate,
                         save_total_limit=2)  # fmt: skip
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    trainer = sft_trainer(load_causal_lm(base, config), tokenizer, args, train, eval_dataset, **lengths)
    trainer.train(resume_from_checkpoint=resume)
    if eval_dataset is None:
        loss = next((e["train_loss"] for e in reversed(trainer.state.log_history) if "train_loss" in e), None)
        stage.finish(trainer, {"train_loss": loss})
    else:
        loss = trainer.evaluate()["eval_loss"]
        stage.finish(trainer, {"eval_loss": loss}, note=f", held-out loss {loss:.3f}")
    return stage.final


def dpo_stage(run: Run, name: str, sft: str, train, eval_dataset=None, *, peft_config=None,
              quantize: bool = False, record: dict | None = None, start: str | None = None,
              reference: str = "sft", **overrides) -> str:  # fmt: skip
    """DPO from `sft` (also the reference) on `train`'s pairs with the run's config and `overrides` (`beta=...`);
    returns the trained policy's folder (an adapter with `peft_config`; `quantize`: on a 4-bit base).

    `start`: the policy to train on from instead of `sft` (iterative DPO's round r-1: a full model's folder, or a
    LoRA adapter over `sft`), regularised toward `reference`: "sft" (the SFT model) or "previous" (`start`
    itself). A full model's reference is `sft` loaded as `ref_model`, or the default frozen copy of `start`; an
    adapter is trained on as given (no new adapter, no second copy of the base weights) with the library's
    `peft_reference="base"` (the SFT weights under it) or `"copy"` (a frozen copy of the adapter).

    With `eval_dataset`, `done.json` records the held-out metrics before and after training, else the last
    logged training metrics; and `record`.
    """
    from dpo_trainer import DPOTrainer

    stage = run.stage(name)
    if stage.finished():
        return stage.final
    resume = stage.start()
    adapter = start is not None and os.path.exists(os.path.join(start, "adapter_config.json"))
    if start is None or start == sft or adapter:
        model, ref_model = load_causal_lm(sft, run.config, quantize=quantize), None
    else:  # full weights: round r-1's, with the SFT model as the reference or (None) a frozen copy of them
        model = load_causal_lm(start, run.config, quantize=quantize)
        ref_model = load_causal_lm(sft, run.config, quantize=quantize) if reference == "sft" else None
    if adapter:  # round r-1's adapter trained on over the SFT weights
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start, is_trainable=True)
        peft_config, overrides["peft_reference"] = None, "base" if reference == "sft" else "copy"
    trainer = DPOTrainer(
        model,
        ref_model=ref_model,
        args=training_args(run.config, stage.folder, **overrides),
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(sft),
        peft_config=peft_config,
    )
    if eval_dataset is None:
        trainer.train(resume_from_checkpoint=resume)
        logged = [e for e in trainer.state.log_history if "rewards/accuracies" in e]
        last = logged[-1] if logged else {}
        accuracy, margin = (
            last.get("rewards/accuracies", float("nan")),
            last.get("rewards/margins", float("nan")),
        )
        note = f": train reward accuracy {accuracy:.2f}, margin {margin:.2f}"
        stage.finish(trainer, {**(record or {}), "last_logged": last}, note=note)
        return stage.final
    before = trainer.evaluate(metric_key_prefix="before")
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()
    note = (
        f": held-out reward accuracy {after['eval_rewards/accuracies']:.2f}, margin "
        f"{after['eval_rewards/margins']:.2f} (before: {before['before_rewards/accuracies']:.2f}, "
        f"{before['before_rewards/margins']:.2f})"
    )
    stage.finish(trainer, {**(record or {}), "before": before, "after": after}, note=note)
    return stage.final


# ---------------------------------------------------------------- on-policy rounds (iterative DPO)


ROUND_REFERENCE_HELP = (
    "The reference of rounds 2..R: sft (default: every round optimises the same KL-regularised objective "
    "against the SFT model that the frontier measures, reward against KL(π‖π_SFT), as in Xiong et al. 2024's "
    "iterative DPO with its KL to the initial policy) or previous (each round regularised toward the round "
    "before, as in Yuan et al. 2024's self-rewarding iterations: KL to the SFT model may grow by up to a "
    "round's budget each round)."
)
ROUND_REFERENCES = ("sft", "previous")


def round_stages(rounds: int, pairs_keys: tuple[str, ...], pairs_config: tuple[str, ...],
                 train_keys: tuple[str, ...], train_config: tuple[str, ...], after: tuple[str, ...]) -> list:  # fmt: skip
    """The `StageSettings` of rounds 1..R of iterative DPO (none for R = 1, the single-round recipe): `round{r}_pairs`
    (sampling: `rounds` and `pairs_keys`, after round r-1 or, for round 1, `after`) and `round{r}` (training:
    `train_keys`, and `round_reference` from round 2 on), so a changed setting makes that round and every later
    one stale."""
    if rounds < 2:
        return []
    stages = []
    for r in range(1, rounds + 1):
        before = (f"round{r - 1}",) if r > 1 else tuple(after)
        stages.append(StageSettings(f"round{r}_pairs", ("rounds",) + pairs_keys, pairs_config, after=before))
        keys = train_keys + (("round_reference",) if r > 1 else ())
        stages.append(StageSettings(f"round{r}", keys, train_config, after=(f"round{r}_pairs",)))
    return stages


def split_rounds(prompts, rounds: int) -> list[list[str]]:
    """`prompts` in `rounds` disjoint consecutive parts, in order, sizes differing by at most one."""
    prompts = list(prompts)
    if not 1 <= rounds <= len(prompts):
        raise SystemExit(
            f"--rounds {rounds} needs 1 to {len(prompts)} rounds: there are {len(prompts)} pair prompts."
        )
    size, extra = divmod(len(prompts), rounds)
    bounds = [r * size + min(r, extra) for r in range(rounds + 1)]
    return [prompts[bounds[r] : bounds[r + 1]] for r in range(rounds)]


def round_pairs_stage(run: Run, r: int, policy: str, sft: str, prompts, scorer, *, postprocess=None,
                      **sampling) -> list[dict]:  # fmt: skip
    """Round r's pairs: `on_policy_pairs` of `policy` (a folder, an adapter over `sft`) on `prompts` with `sampling`
    (n, rule, margin, temperature, max_new_tokens, batch_size, seed), cached chunk by chunk under the stage folder
    (an interrupted sampling resumes), `postprocess(rows)` applied; `train.jsonl` and the counts in `done.json`."""
    from dpo_trainer.evaluation import on_policy_pairs

    stage = run.stage(f"round{r}_pairs")
    path = os.path.join(stage.folder, "train.jsonl")
    if stage.finished(outputs=("train.jsonl",)):
        return read_jsonl(path)
    stage.start()
    made = on_policy_pairs(load_policy(policy, sft, run.config), load_tokenizer(sft), prompts, scorer,
                           cache_dir=os.path.join(stage.folder, "samples"), disable_progress=run.config.disable_tqdm,
                           **sampling)  # fmt: skip
    rows = [
        {k: row[k] for k in ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")}
        for row in made.rows
    ]
    rows = postprocess(rows) if postprocess else rows
    if not rows:
        raise SystemExit(
            f"[round{r}_pairs] every prompt's samples scored alike: no preference pair to train on."
        )
    flat = [score for scores in made.scores for score in scores]
    record = {**made.counts, "pairs": len(rows), "mean_sample_score": sum(flat) / len(flat),
              "mean_score_gap": sum(p["chosen_score"] - p["rejected_score"] for p in rows) / len(rows)}  # fmt: skip
    if run.is_main:
        write_jsonl(path, rows)
    record = stage.finish(record=record)
    print(
        f"[round{r}_pairs] {len(rows)} pairs from {len(prompts)} prompts in {record['seconds']:.0f}s: {path}"
    )
    return rows


def run_rounds(run: Run, rounds: int, prompts, sft: str, scorer, *, sampling: dict, reference: str,
               eval_dataset=None, postprocess=None, **dpo) -> list[dict]:  # fmt: skip
    """Iterative DPO: round r (1..R) samples from round r-1's policy (round 0's: `sft`) on its own part of `prompts`
    (`split_rounds`), pairs them (`round_pairs_stage`) and trains DPO from that policy (`dpo_stage` with `start`,
    `reference` and `dpo`: peft_config, quantize, overrides). Each is a stage: finished rounds are skipped, an
    interrupted one resumes. Returns one `{"round", "policy", "prompts", "pairs", "seconds"}` per round (seconds:
    its sampling and training, as first run)."""
    policy, entries = sft, []
    for r, part in enumerate(split_rounds(prompts, rounds), start=1):
        rows = round_pairs_stage(run, r, policy, sft, part, scorer, postprocess=postprocess, **sampling)
        train = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
        policy = dpo_stage(run, f"round{r}", sft, train, eval_dataset, start=policy, reference=reference,
                           record={"round": r, "reference": reference, "pairs": len(rows)}, **dpo)  # fmt: skip
        seconds = sum(
            (stage_done(run.path(name)) or {}).get("seconds", 0.0)
            for name in (f"round{r}_pairs", f"round{r}")
        )
        entries.append(
            {"round": r, "policy": policy, "prompts": len(part), "pairs": len(rows), "seconds": seconds}
        )
    return entries


# ---------------------------------------------------------------- results


def cached_json(path: str, compute, *, collective: bool = True, valid=None, indent: int | None = 1, say=None):
    """`compute()`, saved as JSON at `path` by the main process; an earlier run's file is read instead (a
    damaged one, or one that `valid` refuses, is named and computed again).

    `collective`: every process calls it (computing is collective) and takes the main process's decision;
    else only the calling process does. `say`: what was sampled, printed with the time it took.
    """
    folder = os.path.dirname(path)

    def earlier():
        found = read_json(path, "sampled again.")
        return found if found is not None and (valid is None or valid(found)) else None

    def decide() -> tuple[bool, str | None]:  # (read the file, why it cannot be computed)
        if earlier() is not None:
            return True, None
        reason = unwritable(folder)
        return False, reason and cannot_write(folder, "eval", reason)

    found, error = main_decides(decide) if collective else decide()
    if error:
        raise SystemExit(error)
    if found:
        return earlier()
    from accelerate import PartialState

    started, value, state = time.time(), compute(), PartialState()
    if not collective or state.is_main_process:
        if say:
            print(f"{say}: sampled in {time.time() - started:.1f}s by {state.num_processes if collective else 1} "
                  f"process(es) on {state.device.type}")  # fmt: skip
        write_json(path, value, indent=indent)  # whole or not at all
    return value


def print_table(header: list[str], rows: list[list], widths: list[int], title: str = "") -> None:
    """A plain-text table under `title`: the first column left-aligned, the others right-aligned, in `widths`."""
    if title:
        print(title)
    for row in [header] + rows:
        print(
            f"{row[0]:<{widths[0]}}" + "".join(f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:]))
        )
