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
