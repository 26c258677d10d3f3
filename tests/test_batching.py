"""Token-budget batch sampler: whole examples, budget respected, fixed partition, new order each epoch."""

import random

import pytest

from dpo_trainer.data.batching import TokenBudgetBatchSampler, example_tokens


def test_every_example_once_and_the_budget_respected():
    lengths = [random.Random(0).randint(1, 40) for _ in range(200)]
    lengths[17] = 500  # longer than the budget: a batch of its own
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=100, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert [17] in batches
    assert all(sum(lengths[i] for i in b) <= 100 for b in batches if b != [17])
    assert len(sampler) == len(batches)


def test_partition_fixed_order_changes_with_epoch_and_seed():
    lengths = list(range(1, 60))
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=120, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))  # same batches, same step costs
    assert first != second
    assert list(TokenBudgetBatchSampler(lengths, max_tokens=120, seed=1)) == first
    assert list(TokenBudgetBatchSampler(lengths, max_tokens=120, seed=2)) != first


def test_example_tokens_counts_the_prompt_once_only_when_shared():
    assert example_tokens(10, [3, 4], "shared_prompt") == 17
    assert example_tokens(10, [3, 4], "packed") == 27
    assert example_tokens(10, [3, 4, 5], "padded") == 42


def test_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler([1, 2], max_tokens=0)


def test_two_processes_train_every_pair_once_per_epoch_with_an_odd_number_of_budget_batches(tmp_path):
    # accelerate shards a batch sampler by dealing its batches round-robin; with an odd count it completes the
    # last round with the epoch's first batch again (even_batches), so that batch's pairs would train twice.
    import json
    import subprocess
    from collections import Counter

    from conftest import TESTS, TORCHRUN_TWO_PROCESSES, dist_env

    script = TESTS / "dist_scripts" / "budget_epoch.py"
    command = [*TORCHRUN_TWO_PROCESSES, str(script), "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    proc = subprocess.run(
        command, env=dist_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = json.loads((tmp_path / "budget_epoch.json").read_text())
    assert run["world_size"] == 2 and len(run["one_process_batches"]) % 2 == 1  # the case in question
    first, second = run["trained"]
    assert len(first) + len(second) == run["rows"]
    assert Counter(first + second) == Counter(range(run["rows"]))  # every pair exactly once, none twice


@pytest.mark.parametrize("num_processes", [2, 3, 8])
def test_the_batches_are_a_multiple_of_the_processes_each_example_once(num_processes, caplog):
    lengths = [random.Random(1).randint(1, 40) for _ in range(101)]
    for max_tokens in range(40, 200, 7):
        sampler = TokenBudgetBatchSampler(lengths, max_tokens=max_tokens, seed=5, num_processes=num_processes)
        batches = list(sampler)
        assert len(batches) % num_processes == 0 and sampler.repeated == 0
        assert sorted(i for b in batches for i in b) == list(range(101))
        assert all(sum(lengths[i] for i in b) <= max_tokens for b in batches)
        one = TokenBudgetBatchSampler(lengths, max_tokens=max_tokens, seed=5)
        assert len(batches) - len(one) < num_processes  # as few splits as it takes
    assert "train twice" not in caplog.text


def test_single_example_batches_that_cannot_be_shared_evenly_are_counted(caplog):
    with caplog.at_level("WARNING", logger="dpo_trainer.data.batching"):
        sampler = TokenBudgetBatchSampler([9, 8, 7], max_tokens=10, seed=0, num_processes=2)
    assert len(sampler) == 4 and sampler.repeated == 1  # each of the 2 processes takes 2 steps
    batches = list(sampler)
    assert len(batches) == 4 and batches[3] == batches[0]  # the epoch's first batch, again at its end
    assert sorted(i for batch in batches[:3] for i in batch) == [0, 1, 2]
    assert "the 3 batches (each a single example) cannot be shared evenly by 2 processes" in caplog.text
    assert "1 pair(s) train twice per epoch" in caplog.text
