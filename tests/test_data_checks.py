"""Checks on whole datasets: rows whose responses are token-identical are counted and warned about (issue 20,
item 10); rows longer than a model's positions are refused before training, and with RoPE scaling the positions
the scaling reaches are allowed (item 11)."""

import logging

import pytest
from datasets import Dataset, IterableDataset

from dpo_trainer import DPOTrainer
from dpo_trainer.data.prepare import prepare_dataset
from dpo_trainer.models import position_limit
from dpo_trainer.testing import tiny_causal_lm

from conftest import dpo_config, preference_rows

LOGGER = "dpo_trainer.data.prepare"


def identical_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and "identical token ids" in r.getMessage()
    ]


def test_rows_with_identical_responses_are_counted_once_with_the_first_row(tokenizer, caplog):
    rows = preference_rows(10, seed=5)
    for index in (3, 7):
        rows[index]["rejected"] = rows[index]["chosen"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepared = prepare_dataset(rows, tokenizer, max_length=64, name="train_dataset")
    [message] = identical_warnings(caplog)
    assert message.startswith("train_dataset: 2 of 10 rows (first: row 3) have two responses with identical")
    assert "ln 2" in message
    assert len(prepared) == 10  # kept: the warning informs, it drops nothing


def test_responses_made_identical_by_truncation_and_tokenized_rows_are_counted(tokenizer, caplog):
    # different texts, the same first tokens: cut to the budget, they are the same ids
    rows = [{"prompt": "Tell me:", "chosen": " sure thanks happy", "rejected": " sure thanks no"}] * 2
    rows += preference_rows(3, seed=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_dataset(rows, tokenizer, max_length=64)
        assert not identical_warnings(caplog)
        prepare_dataset(rows, tokenizer, max_length=5, max_prompt_length=3)
    [message] = identical_warnings(caplog)
    assert "2 of 5 rows (first: row 0)" in message
    caplog.clear()
    tokenized = [
        {"prompt_ids": [5, 6], "response_ids": [[7, 8], [7, 9]]},
        {"prompt_ids": [5], "response_ids": [[7], [7]]},
    ]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_dataset(Dataset.from_list(tokenized), tokenizer, max_length=64)
    assert "1 of 2 rows (first: row 1)" in identical_warnings(caplog)[0]


def test_a_ranking_with_two_identical_responses_is_counted(tokenizer, caplog):
    rows = preference_rows(4, seed=2, k=3)
    rows[2]["responses"][2] = rows[2]["responses"][0]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_dataset(rows, tokenizer, max_length=64)
    assert "1 of 4 rows (first: row 2)" in identical_warnings(caplog)[0]


def test_a_streamed_dataset_warns_at_the_first_identical_row(tokenizer, caplog):
    rows = preference_rows(6, seed=5)
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[5]["rejected"] = rows[5]["chosen"]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepared = prepare_dataset(stream, tokenizer, max_length=64)
        assert len(list(prepared)) == 6
    [message] = identical_warnings(caplog)
    assert "rows (first: row 4)" in message


def test_fine_tuning_rows_that_repeat_chosen_as_rejected_warn_nothing(tokenizer, caplog):
    from dpo_trainer.sft import prepare_rows

    rows = [{**row, "rejected": row["chosen"]} for row in preference_rows(6, seed=5)]  # as sentiment.py's SFT
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_rows(rows, rows, tokenizer, 64, None)
        prepare_dataset(
            IterableDataset.from_generator(lambda: iter(rows)), tokenizer, max_length=64, warn_identical=False
        )
    assert not identical_warnings(caplog)


@pytest.mark.parametrize("k", [2, 3])
def test_distinct_responses_warn_nothing(tokenizer, caplog, k):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_dataset(preference_rows(20, seed=9, k=k), tokenizer, max_length=64)
    assert not identical_warnings(caplog)


# ---------------------------------------------------------------- positions under RoPE scaling

ROPE = 10000.0


@pytest.mark.parametrize(
    "rope_parameters, limit",
    [
        (None, 8),  # plain RoPE: the declared context
        ({"rope_type": "linear", "factor": 4.0}, 32),
        ({"type": "linear", "factor": 4.0}, 32),  # the older `rope_scaling` spelling
        ({"rope_type": "yarn", "factor": 4.0}, 32),  # transformers sets original_max_position_embeddings = 8
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2}, 8),  # DeepSeek-V3's way
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}, 16),  # Qwen2.5's recipe
        (
            {
                "rope_type": "llama3",
                "factor": 4.0,
                "original_max_position_embeddings": 4,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
            16,
        ),
        ({"rope_type": "dynamic", "factor": 2.0}, None),  # NTK frequencies recomputed for any longer input
    ],
    ids=[
        "default",
        "linear",
        "linear-rope_scaling",
        "yarn",
        "yarn-scaled-mpe",
        "yarn-qwen",
        "llama3",
        "dynamic",
    ],
)
def test_rope_scaling_extends_the_positions_a_row_may_take(tokenizer, rope_parameters, limit):
    scaling = {}
    if rope_parameters is not None:
        key = "rope_scaling" if "type" in rope_parameters else "rope_parameters"
        scaling = {key: {**rope_parameters, "rope_theta": ROPE}}
    model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, max_position_embeddings=8, **scaling)
    found = position_limit([model])
    if limit is None:
        assert found is None
    else:
        assert found[1] == limit
        assert ("RoPE scaled" in found[0]) == (limit != 8)


def test_a_linear_scaled_model_trains_rows_past_max_position_embeddings(tmp_path, tokenizer):
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": ROPE}
    model = tiny_causal_lm(
        tokenizer, hidden_size=16, num_layers=1, max_position_embeddings=8, rope_parameters=rope
    )
    rows = preference_rows(8, seed=3)
    trainer = DPOTrainer(
        model,
        args=dpo_config(tmp_path, max_length=32, max_steps=1),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    longest = max(len(r["prompt_ids"]) + max(map(len, r["response_ids"])) for r in trainer.train_dataset)
    assert 8 < longest <= 32  # past max_position_embeddings, within what the scaling reaches
    trainer.train()
    long = {"prompt": "Tell me about " + " and the ".join(["garden", "river", "music"] * 6) + ":"}
    long.update(chosen=" thanks happy glad sure.", rejected=" no go away.")
    with pytest.raises(
        ValueError, match=r"row 8 .* reaches 32 positions \(max_position_embeddings=8, RoPE scaled\)"
    ):
        DPOTrainer(
            model,
            args=dpo_config(tmp_path, max_length=64),
            train_dataset=[*rows, long],
            processing_class=tokenizer,
        )
