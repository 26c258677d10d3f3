"""Several processes on a machine without a GPU (issue 20): launched without `use_cpu=True`, they train as one
data-parallel run (DPOConfig sets `use_cpu`), where transformers would give each process world_size 1, each
training alone on all the data and writing the same files. examples/hh.py (torchrun) and examples/sentiment.py
(accelerate launch --multi_gpu) run on two CPU processes at tiny settings, without --use_cpu."""

import glob
import json
import logging
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dpo_trainer import DPOConfig
from dpo_trainer import launch as launch_module

from conftest import DIST_TIMEOUT_S, TESTS, TORCHRUN_TWO_PROCESSES, dist_env

ROOT = os.path.dirname(TESTS)
HH = os.path.join(ROOT, "examples", "hh.py")
SENTIMENT = os.path.join(ROOT, "examples", "sentiment.py")
LAUNCHED_CONFIG = TESTS / "dist_scripts" / "launched_config.py"
ACCELERATE_TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "--main_process_port", "0"]  # fmt: skip
NOT_DISTRIBUTED = "process group is initialized, but parallel_mode != ParallelMode.DISTRIBUTED"


def launch(command: list[str], cwd) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            command, env=dist_env(), cwd=str(cwd), capture_output=True, text=True, timeout=DIST_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} timed out after {DIST_TIMEOUT_S}s")
        raise error
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert NOT_DISTRIBUTED not in result.stderr
    return result


def first_epoch_step(folder: str) -> float:
    """The epoch count after the first optimizer step of a stage's training log."""
    with open(os.path.join(folder, "log_history.json")) as handle:
        return next(
            entry["epoch"] for entry in json.load(handle) if entry.get("step") == 1 and "loss" in entry
        )


def assert_no_partial_files(out) -> None:
    assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)


# ---------------------------------------------------------------- DPOConfig


def test_a_launch_of_several_processes_without_an_accelerator_sets_use_cpu(monkeypatch, caplog):
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def args(**overrides):
        return SimpleNamespace(
            **{"use_cpu": False, "deepspeed": None, "accelerator_config": None, **overrides}
        )

    one = args()
    launch_module.use_cpu_for_launched_processes(one)
    assert not one.use_cpu  # one process: as the user set it
    monkeypatch.setenv("WORLD_SIZE", "2")
    launched = args()
    with caplog.at_level(logging.INFO, logger="dpo_trainer.launch"):
        launch_module.use_cpu_for_launched_processes(launched)
    assert launched.use_cpu
    assert "2 processes were launched on a machine without an accelerator, so use_cpu=True" in caplog.text
    # left alone: DeepSpeed (use_cpu would drop it) and a state the user configured beforehand
    for kept in (args(deepspeed={"zero_optimization": {"stage": 2}}),
                 args(accelerator_config={"use_configured_state": True})):  # fmt: skip
        launch_module.use_cpu_for_launched_processes(kept)
        assert not kept.use_cpu
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed config
    kept = args()
    launch_module.use_cpu_for_launched_processes(kept)
    assert not kept.use_cpu
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    # a GPU: accelerate runs the processes data-parallel on it
    monkeypatch.setattr("transformers.utils.is_torch_cuda_available", lambda: True)
    on_gpu = args()
    launch_module.use_cpu_for_launched_processes(on_gpu)
    assert not on_gpu.use_cpu
    # MPS has no multi-process backend: refused, saying what to pass
    monkeypatch.setattr("transformers.utils.is_torch_cuda_available", lambda: False)
    monkeypatch.setattr("transformers.utils.is_torch_mps_available", lambda: True)
    with pytest.raises(ValueError, match=r"\(MPS\) cannot run several processes .*pass use_cpu=True"):
        launch_module.use_cpu_for_launched_processes(args())


@pytest.mark.slow
def test_two_launched_processes_make_one_data_parallel_config(tmp_path):
    """Under torchrun, a DPOConfig without use_cpu: world_size 2 in each process, and the precision of one
    process on this machine (the bf16 default falls back to float32 without use_cpu in both)."""
    launch([*TORCHRUN_TWO_PROCESSES, str(LAUNCHED_CONFIG), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    alone = DPOConfig(output_dir=str(tmp_path / "alone"), report_to="none")
    for rank, seen in enumerate(ranks):
        assert seen == {"process_index": rank, "world_size": 2, "parallel_mode": "distributed", "use_cpu": True,
                        "bf16": alone.bf16, "device": "cpu"}  # fmt: skip


# ---------------------------------------------------------------- the examples

HH_FLAGS = [
    "--sft_max_steps", "3", "--max_steps", "3", "--max_train_rows", "32", "--max_eval_rows", "8",
    "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "2", "--eval_prompts", "4",
    "--temperatures", "0.5", "--bon_n", "2", "--max_new_tokens", "8", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.mark.slow
def test_hh_on_two_processes_trains_as_one_data_parallel_run(tmp_path):
    """Every stage of examples/hh.py under torchrun (no --use_cpu, no --output_dir: the folder both processes
    use is the main process's choice): SFT and DPO train with 2 processes, each step taking 2 x 8 of the 32
    rows (2 steps an epoch, where a process training alone takes 4), and the run's outputs are whole."""
    from transformers import AutoModelForCausalLM

    launch([*TORCHRUN_TWO_PROCESSES, HH, *HH_FLAGS], tmp_path)
    [out] = glob.glob(str(tmp_path / "runs" / "hh-*"))
    for stage in ("sft", "dpo"):
        with open(os.path.join(out, stage, "done.json")) as handle:
            assert json.load(handle)["processes"] == 2, stage
        assert first_epoch_step(os.path.join(out, stage)) == pytest.approx(1 / 2), stage
    checkpoint = os.path.join(out, "dpo", "checkpoint-2")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))  # one per process
    for model in ("sft/final", "dpo/final"):
        AutoModelForCausalLM.from_pretrained(os.path.join(out, model))
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    assert set(summary["eval"]["win_rate_vs_chosen"]) == {"SFT", "DPO", "Best of 2"}
    assert summary["output_dir"] == os.path.relpath(out, tmp_path)
    assert_no_partial_files(out)


SENTIMENT_FLAGS = [
    "--sft_max_steps", "3", "--max_steps", "3", "--max_train_rows", "64", "--max_eval_rows", "16",
    "--pair_prompts", "8", "--samples_per_prompt", "3", "--betas", "0.5", "--methods", "dpo,preferred_ft",
    "--eval_prompts", "6", "--bon_n", "1,2", "--max_new_tokens", "8", "--logging_steps", "1",
    "--save_steps", "2", "--per_device_train_batch_size", "4", "--tiny_hidden_size", "32", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.mark.slow
def test_sentiment_on_two_processes_trains_as_one_data_parallel_run(tmp_path):
    """examples/sentiment.py under `accelerate launch --multi_gpu --num_processes 2` on the CPU (no --use_cpu):
    every training stage records 2 processes, and DPO takes 2 x 4 pairs a step."""
    out = tmp_path / "run"
    launch([*ACCELERATE_TWO_PROCESSES, SENTIMENT, "--output_dir", str(out), *SENTIMENT_FLAGS], tmp_path)
    for stage in ("sft", "pairs", "dpo-beta0.5", "preferred-ft"):
        with open(out / stage / "done.json") as handle:
            assert json.load(handle)["processes"] == 2, stage
    with open(out / "pairs" / "train.jsonl") as handle:
        pairs = sum(1 for _ in handle)
    two, alone = 1 / math.ceil(pairs / 8), 1 / math.ceil(pairs / 4)
    assert two != alone  # the data tells one run of two processes from one process training alone
    assert first_epoch_step(str(out / "dpo-beta0.5")) == pytest.approx(two)
    with open(out / "summary.json") as handle:
        results = json.load(handle)["eval"]["results"]
    assert set(results) == {"SFT", "DPO β=0.5", "Preferred-FT", "Best of 1", "Best of 2"}
    assert_no_partial_files(out)
