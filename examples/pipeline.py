"""Run folders shared by the examples (`hh.py`, `sentiment.py`): a run is a folder of stages, each marked done
when its work is saved, so rerunning the same command resumes where a killed run stopped.

    <output_dir>/run.json          marks the folder as a run of the script (with the arguments it started with)
    <output_dir>/<stage>/done.json a finished stage and what it produced

Every write is whole or not at all, and every process of a distributed run sees the same answers: the main
process reads, decides and writes; the others wait for it and take its decision. A damaged file (truncated,
half-written) is named in a warning and its stage done again; a finished run is read without writing, so it
can be summarised again from read-only storage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict

from dpo_trainer.checkpoints import checkpoint_problem, list_checkpoints

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
