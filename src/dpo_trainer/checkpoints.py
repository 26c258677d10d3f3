"""Which `checkpoint-N` folder a run may resume from: the newest complete one, never a half-written one.

`transformers.Trainer` picks the highest-numbered `checkpoint-N` folder whatever it holds, so a run killed
while writing a checkpoint (an empty folder, no `trainer_state.json`, a truncated weights file) fails on
every rerun until the folder is deleted by hand. `last_complete_checkpoint` skips such folders and logs why.

A checkpoint is complete when `trainer_state.json` parses (Trainer writes it last), the model or adapter
weights are there (safetensors whose header parses and whose size matches it, every shard of a sharded
index, a readable `torch.save` archive, or a DeepSpeed / FSDP state folder), and every `torch.save` file that
is present (optimizer, scheduler, RNG state, scaler) is a readable archive. The checks read headers and zip
directories only, never whole tensors.

Resuming (`resolve_resume`, `StopsAtTheEnd`) also refuses a checkpoint written by the other kind of run (full
fine-tuning or a PEFT adapter) before Trainer loads it, and trains nothing when the run already reached its last
step (Trainer would take one more step on every such resume).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile

from .config import LOSS_FIELDS, TRAINER_LOSS_FIELDS
from .losses import DEPRECATED_LOSS_NAMES

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def safetensors_problem(path: str) -> str | None:
    """Why `path` is not a whole safetensors file (header unreadable, size not what the header says), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{os.path.basename(path)} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
                return f"{os.path.basename(path)} is truncated (header of {header_len} bytes, file {size})"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"{os.path.basename(path)} cannot be read ({error})"
    if not isinstance(header, dict):
        return f"{os.path.basename(path)} has no safetensors header"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"{os.path.basename(path)}: tensor {name!r} has no data offsets"
        end = max(end, int(offsets[1]))
    expected = 8 + header_len + end
    if size != expected:
        return f"{os.path.basename(path)} holds {size} bytes where its header describes {expected}"
    return None


def torch_file_problem(path: str) -> str | None:
    """Why `path` is not a readable `torch.save` archive (a truncated zip loses its directory), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = os.path.getsize(path)
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{os.path.basename(path)} is truncated"
    except (OSError, zipfile.BadZipFile) as error:
        return f"{os.path.basename(path)} is not a readable torch archive ({error})"
    return None


def _weights_problem(path: str) -> str | None:
    names = set(os.listdir(path))
    for index_name in WEIGHT_INDEXES:
        if index_name in names:
            try:
                with open(os.path.join(path, index_name), encoding="utf-8") as handle:
                    shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                return f"{index_name} cannot be read ({error})"
            for shard in shards:
                if shard not in names:
                    return f"shard {shard} listed in {index_name} is missing"
                problem = _file_problem(os.path.join(path, shard))
                if problem:
                    return problem
            return None
    present = [name for name in WEIGHT_FILES if name in names]
    for name in present:
        problem = _file_problem(os.path.join(path, name))
        if problem:
            return problem
    if present:
        return None
    # DeepSpeed (`global_stepN/`) and FSDP (`pytorch_model_fsdp_0/`) keep the weights in a folder of their own
    engine_folders = [
        name
        for name in names
        if os.path.isdir(os.path.join(path, name))
        and (name.startswith("global_step") or name.startswith("pytorch_model_fsdp"))
    ]
    if any(os.listdir(os.path.join(path, name)) for name in engine_folders):
        return None
    return "no model or adapter weights"


def _file_problem(path: str) -> str | None:
    if os.path.getsize(path) == 0:
        return f"{os.path.basename(path)} is empty"
    if path.endswith(".safetensors"):
        return safetensors_problem(path)
    return torch_file_problem(path)


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, or None when it is complete."""
    if not os.path.isdir(path):
        return "not a folder"
    if not os.listdir(path):
        return "empty folder"
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        return f"no {TRAINER_STATE} (the checkpoint was not finished)"
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE} cannot be read ({type(error).__name__}: {error})"
    problem = _weights_problem(path)
    if problem:
        return problem
    for name in TORCH_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            problem = _file_problem(file)
            if problem:
                return problem
    return None


def list_checkpoints(folder: str) -> list[str]:
    """The `checkpoint-N` folders in `folder`, newest (highest N) first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHECKPOINT_NAME.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(found, reverse=True)]


def newest_complete_checkpoint(folder: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete `checkpoint-N` in `folder` or None, [(each newer folder skipped, why)])."""
    skipped = []
    for path in list_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest complete `checkpoint-N` in `folder` (None if none), logging each newer one skipped and why."""
    found, skipped = newest_complete_checkpoint(folder)
    for path, problem in skipped:
        logger.warning("Skipping checkpoint %s: %s.", path, problem)
    return found


def no_checkpoint_message(output_dir: str, skipped: list[tuple[str, str]]) -> str:
    """Why `resume_from_checkpoint=True` finds nothing in `output_dir`, and what to do instead."""
    if not skipped:  # transformers' words for the same case
        return (
            f"No valid checkpoint found in output directory ({output_dir}): resume_from_checkpoint=True resumes "
            "the newest checkpoint-N folder there, and there is none. Pass resume_from_checkpoint=None (or False) "
            "to start the run, or the path of a checkpoint folder to resume from."
        )
    names = "; ".join(f"{os.path.basename(path)}: {problem}" for path, problem in skipped)
    them, they = ("it", "it is") if len(skipped) == 1 else ("them", "they are")
    return (
        f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint-N folder, so no step of the "
        f"run can be resumed. Skipped as half-written (a run killed while saving a checkpoint leaves it so): "
        f"[{names}]. Start the run afresh: delete {them} and pass resume_from_checkpoint=None (or False; "
        f"`--resume_from_checkpoint no` on the command line). Left there, {they} written over by the new "
        "run as it saves the same steps."
    )


# ---------------------------------------------------------------- the DPO settings a checkpoint was trained with

SETTINGS_FILE = "dpo_settings.json"
# a change of these makes the resumed run another experiment (another objective, other data): refused. Other
# changes (β, truncation, the reference's settings, the layout) are warned about.
REFUSED_CHANGES = ("data",) + tuple(name for name in LOSS_FIELDS + TRAINER_LOSS_FIELDS if name != "beta")
# 2: `ipo`, `bco_pair` and `alpha_divergence` compute TRL's forms (before: the papers', now `*_paper`); `sigmoid`
# ignores label_smoothing, as TRL's (before: conservative DPO when label_smoothing > 0, now `cdpo`)
LOSS_NAMES_VERSION = 2


def write_settings(folder: str, settings: dict) -> None:
    """Write `settings` to `folder/dpo_settings.json`, whole or not at all."""
    path = os.path.join(folder, SETTINGS_FILE)
    os.makedirs(folder, exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def read_settings(folder: str) -> dict | None:
    """The settings saved in `folder`, or None when it holds none (e.g. a checkpoint of an older version)."""
    path = os.path.join(folder, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def settings_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, warned): `"key: saved -> current"` for every setting that differs, split by `REFUSED_CHANGES`."""
    refused, warned = [], []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            line = f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            (refused if key in REFUSED_CHANGES else warned).append(line)
    return refused, warned


def _current_names(names):
    """Loss names of settings saved before `LOSS_NAMES_VERSION` 2, with `ipo_trl` / `bco_pair_trl` as `ipo` / `bco_pair`."""
    if not isinstance(names, list):
        return names
    return [DEPRECATED_LOSS_NAMES.get(name, name) for name in names]


def _renamed_loss(saved: dict) -> bool:
    """Whether settings saved before `LOSS_NAMES_VERSION` 2 name a loss whose meaning has changed since."""
    names = saved.get("loss_type") or []
    names = [names] if isinstance(names, str) else names
    alpha = (
        saved.get("f_divergence_type") == "alpha_divergence" and saved.get("f_alpha_divergence_coef") != 0.5
    )
    cdpo = "sigmoid" in names and bool(saved.get("label_smoothing"))
    return bool({"ipo", "bco_pair"} & set(names)) or alpha or cdpo


def check_resume_settings(checkpoint: str, current: dict) -> None:
    """Warn about DPO settings changed since `checkpoint` was saved; refuse a changed loss or data."""
    saved = read_settings(checkpoint)
    if saved is None:
        logger.warning("%s has no dpo_settings.json: the resumed settings go unchecked.", checkpoint)
        return
    older_names = saved.get("loss_names", 1) < LOSS_NAMES_VERSION
    renamed = older_names and _renamed_loss(saved)
    if older_names:  # the previous release's names of TRL's forms
        saved = {**saved, "loss_type": _current_names(saved.get("loss_type"))}
    refused, warned = settings_changes(saved, current)
    if renamed:
        refused.append(
            "loss_names: the checkpoint's loss_type / f_divergence_type meant the paper's form, which is now "
            "named otherwise (ipo_paper, bco_pair_paper, alpha_divergence_paper; sigmoid with label_smoothing: "
            "cdpo)"
        )
    warned = [line for line in warned if not line.startswith("loss_names:")]
    if refused:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained with other settings ({'; '.join(refused + warned)}). "
            "Resuming would mix two experiments; train into a fresh output_dir instead."
        )
    if warned:
        logger.warning("Resuming from %s with changed settings: %s.", checkpoint, "; ".join(warned))


# ---------------------------------------------------------------- which kind of run wrote a checkpoint

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin") + WEIGHT_INDEXES


def checkpoint_kind(path: str) -> tuple[str, str] | None:
    """("adapter", file) for a checkpoint holding PEFT adapter weights only, ("full", file) for one holding the
    whole model's weights, None when its files cannot tell (DeepSpeed / FSDP state folders only, or both kinds)."""
    names = set(os.listdir(path))
    adapter = [name for name in ADAPTER_WEIGHTS if name in names]
    full = [name for name in FULL_WEIGHTS if name in names]
    if adapter and not full:
        return "adapter", adapter[0]
    if full and not adapter:
        return "full", full[0]
    return None


def check_run_kind(checkpoint: str, adapter: bool) -> None:
    """Refuse to resume a full fine-tuning checkpoint with a PEFT adapter run, or the other way round.

    Trainer would load what it can of the weights, then fail deep inside `torch.optim` (the saved optimizer
    state holds other parameter groups: "loaded state dict contains a parameter group that doesn't match the
    size of optimizer's group").
    """
    found = checkpoint_kind(checkpoint)
    if found is None or (found[0] == "adapter") == adapter:
        return
    file = found[1]
    if adapter:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was written by a full fine-tuning run (it holds {file}, the "
            "whole model's weights, and an optimizer state for all of them), and this run trains a PEFT adapter "
            "(peft_config, or a PeftModel given as the model). To continue that run, resume it as it was "
            "trained, without peft_config. To train an adapter on top of its weights, give the checkpoint folder "
            "as the model of a new run, in another output_dir."
        )
    raise ValueError(
        f"Cannot resume from {checkpoint}: it was written by a PEFT adapter run (it holds {file}, the adapter's "
        "weights only, and an optimizer state for them), and this run is full fine-tuning (no peft_config, and "
        "the model is not a PeftModel). To continue that run, resume it as it was trained, with the same "
        "peft_config. To fine-tune the whole model from it, merge the adapter into its base model (peft's "
        "merge_and_unload) and give that model to a new run, in another output_dir."
    )


# ---------------------------------------------------------------- resuming


def resolve_resume(
    resume_from_checkpoint,
    output_dir: str,
    accelerator,
    current_settings=None,
    *,
    adapter: bool | None = None,
) -> str | bool | None:
    """The checkpoint `Trainer.train` should resume from, checked.

    `True` takes the newest *complete* checkpoint of `output_dir` (rank 0 chooses, every process follows),
    where Trainer would take the newest folder even when a kill left it half-written; with none, the error
    names the folders skipped and says how to start afresh. A path must hold a complete checkpoint, written by
    the same kind of run (full fine-tuning or a PEFT adapter: `adapter` says which this run is; None does not
    check) and, when `current_settings` is given (a callable returning this run's settings), trained with the
    same loss and data.
    """
    if resume_from_checkpoint is True:
        found = [newest_complete_checkpoint(output_dir) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found)
        path, skipped = found[0]
        for skipped_path, problem in skipped if accelerator.is_main_process else ():
            logger.warning("Skipping checkpoint %s: %s.", skipped_path, problem)
        if path is None:
            raise ValueError(no_checkpoint_message(output_dir, skipped))
        resume_from_checkpoint = path
        logger.info("Resuming from %s", resume_from_checkpoint)
    if isinstance(resume_from_checkpoint, str):
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
        if adapter is not None:
            check_run_kind(resume_from_checkpoint, adapter)
        if current_settings is not None:
            check_resume_settings(resume_from_checkpoint, current_settings())
    return resume_from_checkpoint


class StopsAtTheEnd:
    """A `transformers.Trainer` mixin: resuming a run that already reached its last step trains nothing.

    Trainer decides to stop only after a step (`DefaultFlowCallback.on_step_end`: global_step >= max_steps).
    Resumed at global step g with E optimizer steps per epoch, it restarts the epoch loop at epoch g // E with
    g % E steps skipped: when max_steps (or the epochs' steps) is a multiple of E that loop is empty, otherwise
    it runs one more step (and saves one more checkpoint) on every resume of a finished run. Here the run
    resumed at or past its last step goes through Trainer as one whose epochs are all done: the checkpoint's
    weights, optimizer and state are loaded, no step is taken, nothing is saved, and a warning says so.

    transformers 5.24-5.25: `Trainer._inner_training_loop` calls `_init_training_state(max_steps,
    num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)`, which loads the checkpoint's
    `TrainerState` and returns (epochs_trained, steps_trained_in_current_epoch); the loop runs the epochs
    `range(epochs_trained, num_train_epochs)`.
    """

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None or self.state.global_step < max_steps:
            return epochs_trained, steps_trained
        step, args = self.state.global_step, self.args
        planned = (
            f"max_steps={args.max_steps}"
            if args.max_steps > 0
            else f"num_train_epochs={args.num_train_epochs}"
        )
        where = (
            f"already reached its last step, {step} of {max_steps}"
            if step == max_steps
            else f"is at step {step}, past its last step {max_steps}"
        )
        logger.warning(
            "Resuming from %s: the run %s (%s), so there is nothing to train. The model holds the checkpoint's "
            "weights; no step is taken and no checkpoint is written. To train further, raise max_steps or "
            "num_train_epochs.",
            resume_from_checkpoint,
            where,
            planned,
        )
        return num_train_epochs, 0


def run_settings(args, layout: str, data_fingerprint: str | None) -> dict:
    """What `write_settings` saves beside a checkpoint and `check_resume_settings` compares: every DPOConfig
    field that decides the result (`DPOConfig.result_settings`, from `config.RESULT_FIELDS`), the layout and
    the data's fingerprint."""
    return {
        **args.result_settings(),
        "layout": layout,
        "data": data_fingerprint,
        "loss_names": LOSS_NAMES_VERSION,
    }
