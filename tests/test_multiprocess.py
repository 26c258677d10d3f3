"""DPOTrainer with two data-parallel CPU processes (torchrun, gloo) trains exactly like one process.

`tests/dist_scripts/train_dpo.py` is launched twice with the same seed, data, tiny model and global batch
of 4: once as a plain single process with per-device batch 4, once under
`python -m torch.distributed.run --standalone --nproc_per_node 2` with per-device batch 2. (Not
`accelerate launch --cpu --num_processes 2`: that silently starts one process.) The two-process launch
trains twice, with a live frozen reference and with `precompute_ref_log_probs=True`; both must match the
single process with a live reference: per-step loss and DPO metrics (means over the 4 examples of the
global batch, gathered from both processes), the final weights, and the eval metrics on a held-out set of
7 rows, whose last batch is split unevenly (3 examples over 2 processes of batch 2, so accelerate pads it
with a repeated example that must not be counted). Every run also evaluates before training, as
examples/hh.py does; Trainer alone then marks the policy prepared and never wraps it in DDP, so the
processes would train on unsynchronised gradients (the grad norm and weight checks below catch that).
"""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import DPO_METRICS, TORCHRUN_TWO_PROCESSES, launch_dist_script

pytestmark = pytest.mark.slow

MODES = ("live", "precompute")


@pytest.fixture(scope="module")
def runs(one_process_runs, tmp_path_factory):
    """{"one": {"live": ...}, "two": {"live": ..., "precompute": ...}}: what rank 0 wrote, plus `out`."""
    two = launch_dist_script(
        TORCHRUN_TWO_PROCESSES,
        tmp_path_factory.mktemp("two_processes"),
        per_device_batch=2,
        modes=",".join(MODES + ("adapter",)),
    )
    return {"one": one_process_runs, "two": two}


def _weights(run: dict, rank: int) -> dict[str, torch.Tensor]:
    return load_file(run["out"] / f"{run['mode']}-rank{rank}.safetensors")


def test_two_process_launch_is_really_data_parallel(runs):
    assert runs["one"]["live"]["world_size"] == 1
    for mode in MODES:
        run = runs["two"][mode]
        assert run["world_size"] == 2, mode
        assert run["distributed_type"] == "DistributedType.MULTI_CPU", mode
        assert run["global_step"] == runs["one"]["live"]["global_step"] == 4


@pytest.mark.parametrize("mode", MODES)
def test_each_step_sees_the_same_global_batch(runs, mode):
    # The comparison below is only meaningful if step k trains on the same 4 examples in both runs.
    one, two = runs["one"]["live"]["batches"], runs["two"][mode]["batches"]
    assert len(one) == len(two) == 4
    assert all(len(batch) == 4 for batch in one)
    assert two == one
    assert len({tuple(row) for batch in one for row in batch}) > 4  # the steps see different examples


@pytest.mark.parametrize("mode", MODES)
def test_per_step_loss_and_dpo_metrics_match_one_process(runs, mode):
    one, two = runs["one"]["live"]["train_logs"], runs["two"][mode]["train_logs"]
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one] == [1, 2, 3, 4]
    assert one[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    assert len({round(entry["loss"], 4) for entry in one}) == 4  # training moves the loss
    for a, b in zip(one, two):
        step = a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), step  # of the all-reduced gradient
        for name in DPO_METRICS:
            assert name in b, (step, name)
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (step, name)


@pytest.mark.parametrize("mode", MODES)
def test_final_weights_match_one_process(runs, mode, make_model):
    one, rank0, rank1 = (
        _weights(runs["one"]["live"], 0),
        _weights(runs["two"][mode], 0),
        _weights(runs["two"][mode], 1),
    )
    initial = make_model(seed=3).state_dict()  # the script builds the same tokenizer and model
    assert set(one) == set(rank0) == set(rank1) == set(initial)
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"DDP replicas diverged: {name}"
        torch.testing.assert_close(
            rank0[name], one[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert any(not torch.equal(one[name], initial[name]) for name in one)  # and training did move them


def test_precomputed_reference_is_computed_once_and_shared(runs):
    run = runs["two"]["precompute"]
    assert len(run["ref_logps"]) == 16 and len(run["eval_ref_logps"]) == 7
    assert len(os.listdir(run["out"] / "work" / "precompute" / "cache")) == 2  # train and eval, by rank 0


@pytest.mark.parametrize("mode", MODES)
def test_eval_dpo_metrics_count_each_example_once(runs, mode):
    one, two = runs["one"]["live"]["eval"], runs["two"][mode]["eval"]
    assert one["eval_rewards/accuracies"] not in (0.0, 1.0)  # a fraction k/7: a repeated example would show
    for name in DPO_METRICS:
        key = f"eval_{name}"
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("mode", MODES)
def test_eval_loss_counts_each_example_once(runs, mode):
    # The single process gives the exact mean over the 7 examples (its last batch of 3 is truncated right).
    # With 2 processes, rank 1's last batch is [example 6, a repeat of example 0]: its loss is the mean of
    # both, and Trainer's `gather_for_metrics(loss.repeat(batch_size))` then keeps that contaminated mean.
    one, two = runs["one"]["live"]["eval"], runs["two"][mode]["eval"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4), (
        "eval_loss counts the example that accelerate repeats to even out the last eval batch"
    )


def test_a_given_adapter_is_its_own_frozen_reference_under_ddp(runs):
    # A PeftModel with a trained adapter (peft_config=None): π_ref is a frozen copy of that adapter on every
    # process, so the evaluation before training is ln 2, and two processes train as one.
    one, two = runs["one"]["adapter"], runs["two"]["adapter"]
    for run in (one, two):
        assert run["before"]["before_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert run["train_logs"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert two["world_size"] == 2 and two["batches"] == one["batches"]
    assert len({round(entry["loss"], 4) for entry in one["train_logs"]}) > 1  # training moves the loss
    for a, b in zip(one["train_logs"], two["train_logs"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    rank0, rank1 = _weights(two, 0), _weights(two, 1)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"DDP replicas diverged: {name}"
        torch.testing.assert_close(rank0[name], _weights(one, 0)[name], rtol=1e-4, atol=1e-5)
