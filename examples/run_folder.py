"""Run folders shared by the examples (`hh.py`, `sentiment.py`): a run is a folder of stages, each marked done
when its work is saved, so rerunning the same command resumes where a killed run stopped.

    <output_dir>/run.json          marks the folder as a run of the script (with the arguments it started with)
    <output_dir>/<stage>/done.json a finished stage and what it produced

Every write is whole or not at all, and every process of a distributed run sees the same answers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

RUN_MARKER = "run.json"  # marks a folder as a run folder of an example script, so a rerun may resume in it


def write_json(path: str, value, indent: int = 2) -> None:
    """Write `value` as JSON, whole or not at all (a killed run leaves no half-written file)."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=indent)
    os.replace(f"{path}.tmp", path)


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def stage_done(folder: str) -> dict | None:
    """What a stage of an earlier run recorded when it finished (`done.json`), or None."""
    path = os.path.join(folder, "done.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def stage_finished(folder: str) -> bool:
    """Whether a stage finished in an earlier run, the same answer on every process: each looks before
    any may go on (and the main process writes `done.json` only after the stage's work)."""
    done = stage_done(folder) is not None
    wait_for_everyone()
    return done


def mark_done(folder: str, info: dict, process_index: int) -> None:
    """Record a finished stage (main process), then wait for every process."""
    if process_index == 0:
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "done.json"), info)
    wait_for_everyone()


def save_history(trainer, folder: str, process_index: int) -> None:
    """The trainer's `log_history` as `<folder>/log_history.json` (main process)."""
    if process_index == 0:
        write_json(os.path.join(folder, "log_history.json"), trainer.state.log_history, indent=1)


def prepare_run_dir(out: str, script_args) -> None:
    """Refuse a folder holding anything but an earlier run of the script (which is then resumed); mark a new
    one with `script_args` (a dataclass) and the start time."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, RUN_MARKER)):
        raise SystemExit(
            f"{out} already holds files that are not a run of this script; choose another --output_dir."
        )
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, RUN_MARKER)
    if not os.path.exists(marker):
        write_json(
            marker, {"script_args": asdict(script_args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
