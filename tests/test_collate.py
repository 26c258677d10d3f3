"""PaddedCollator: the exact tensors of its docstring, the scoring-plan invariant, K ranked responses."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random

import pytest
import torch

from dpo_trainer.data.collate import PaddedCollator

PAD = 0
DOCSTRING_FEATURES = [
    {"prompt_ids": [5, 6], "response_ids": [[7, 2], [8, 9, 2]]},
    {"prompt_ids": [10], "response_ids": [[11, 2], [2]]},
]


def long(values):
    return torch.tensor(values, dtype=torch.long)


def random_features(rng, batch_size, num_responses, *, allow_empty=True):
    def ids(low, high):
        return [rng.randrange(1, 50) for _ in range(rng.randint(low, high))]

    return [
        {
            "prompt_ids": ids(1, 7),
            "response_ids": [ids(0 if allow_empty else 1, 6) for _ in range(num_responses)],
        }
        for _ in range(batch_size)
    ]


def test_docstring_example_exact_tensors():
    batch = PaddedCollator(pad_token_id=PAD)(DOCSTRING_FEATURES)
    expected = {
        "input_ids": long([[5, 6, 7, 2, 0], [10, 11, 2, 0, 0], [5, 6, 8, 9, 2], [10, 2, 0, 0, 0]]),
        "attention_mask": long([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
        "score_index": long([1, 2, 5, 6, 11, 12, 13, 15]),
        "score_target": long([7, 2, 11, 2, 8, 9, 2, 2]),
        "score_seq": long([0, 0, 1, 1, 2, 2, 2, 3]),
        "response_lengths": long([[2, 3], [2, 1]]),
    }
    assert batch.keys() == expected.keys()
    for name, tensor in expected.items():
        assert batch[name].dtype == tensor.dtype, name
        assert torch.equal(batch[name], tensor), name


@pytest.mark.parametrize("seed", range(20))
def test_plan_points_one_position_before_each_target(seed):
    rng = random.Random(seed)
    batch_size, num_responses = rng.randint(1, 5), rng.randint(2, 4)
    features = random_features(rng, batch_size, num_responses)
    batch = PaddedCollator(pad_token_id=PAD, pad_to_multiple_of=rng.choice([None, 8]))(features)
    flat = batch["input_ids"].view(-1)
    assert torch.equal(flat[batch["score_index"] + 1], batch["score_target"])

    width = batch["input_ids"].shape[1]
    total = sum(len(r) for f in features for r in f["response_ids"])
    assert batch["score_index"].shape == batch["score_target"].shape == batch["score_seq"].shape == (total,)
    assert torch.equal(batch["score_index"] // width, batch["score_seq"])
    # the plan is row-major and strictly increasing
    assert torch.all(batch["score_index"][1:] > batch["score_index"][:-1])
    # the predicting position is always a real token, never padding
    assert torch.all(batch["attention_mask"].view(-1)[batch["score_index"]] == 1)
    for k in range(num_responses):
        for b, feature in enumerate(features):
            row = k * batch_size + b
            tokens = feature["prompt_ids"] + feature["response_ids"][k]
            assert batch["input_ids"][row, : len(tokens)].tolist() == tokens
            assert batch["attention_mask"][row].sum().item() == len(tokens)
            assert torch.all(batch["input_ids"][row, len(tokens) :] == PAD)
            assert batch["response_lengths"][b, k].item() == len(feature["response_ids"][k])
            assert batch["score_target"][batch["score_seq"] == row].tolist() == feature["response_ids"][k]


@pytest.mark.parametrize(("multiple", "width"), [(None, 5), (1, 5), (4, 8), (5, 5), (16, 16)])
def test_pad_to_multiple_of(multiple, width):
    batch = PaddedCollator(pad_token_id=PAD, pad_to_multiple_of=multiple)(DOCSTRING_FEATURES)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
    assert torch.equal(batch["input_ids"][:, 5:], torch.full((4, width - 5), PAD))
    assert torch.equal(batch["input_ids"].view(-1)[batch["score_index"] + 1], batch["score_target"])
    # the flat positions move with the width
    assert batch["score_index"].tolist() == [
        1,
        2,
        width,
        width + 1,
        2 * width + 1,
        2 * width + 2,
        2 * width + 3,
        3 * width,
    ]


def test_bad_pad_to_multiple_of():
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PaddedCollator(pad_token_id=PAD, pad_to_multiple_of=0)


def test_three_ranked_responses():
    features = [
        {"prompt_ids": [3], "response_ids": [[4, 2], [5, 2], [6, 7, 2]]},
        {"prompt_ids": [8, 9], "response_ids": [[2], [10, 2], [11, 2]]},
    ]
    batch = PaddedCollator(pad_token_id=PAD)(features)
    assert batch["input_ids"].tolist() == [
        [3, 4, 2, 0],
        [8, 9, 2, 0],
        [3, 5, 2, 0],
        [8, 9, 10, 2],
        [3, 6, 7, 2],
        [8, 9, 11, 2],
    ]
    assert batch["response_lengths"].tolist() == [[2, 2, 3], [1, 2, 2]]
    assert batch["score_seq"].tolist() == [0, 0, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5]
    assert batch["score_index"].tolist() == [0, 1, 5, 8, 9, 13, 14, 16, 17, 18, 21, 22]


def test_empty_response_contributes_nothing():
    features = [{"prompt_ids": [3, 4], "response_ids": [[5, 2], []]}]
    batch = PaddedCollator(pad_token_id=PAD)(features)
    assert batch["input_ids"].tolist() == [[3, 4, 5, 2], [3, 4, 0, 0]]
    assert batch["response_lengths"].tolist() == [[2, 0]]
    assert batch["score_seq"].tolist() == [0, 0]
    assert batch["score_index"].tolist() == [1, 2]


def test_all_responses_empty_gives_empty_plan():
    batch = PaddedCollator(pad_token_id=PAD)([{"prompt_ids": [3], "response_ids": [[], []]}])
    for name in ("score_index", "score_target", "score_seq"):
        assert batch[name].shape == (0,) and batch[name].dtype == torch.long


def test_ref_logps_passthrough():
    features = [
        {**DOCSTRING_FEATURES[0], "ref_logps": [-1.5, -2.25]},
        {**DOCSTRING_FEATURES[1], "ref_logps": [-3.0, -0.5]},
    ]
    batch = PaddedCollator(pad_token_id=PAD)(features)
    assert batch["ref_logps"].dtype == torch.float32
    assert torch.equal(batch["ref_logps"], torch.tensor([[-1.5, -2.25], [-3.0, -0.5]]))
    assert "ref_logps" not in PaddedCollator(pad_token_id=PAD)(DOCSTRING_FEATURES)


def test_ref_logps_on_some_features_only():
    features = [{**DOCSTRING_FEATURES[0], "ref_logps": [-1.0, -2.0]}, DOCSTRING_FEATURES[1]]
    with pytest.raises(ValueError, match="batch position 1 lacks ref_logps"):
        PaddedCollator(pad_token_id=PAD)(features)
    with pytest.raises(ValueError, match="batch position 0 lacks ref_logps"):
        PaddedCollator(pad_token_id=PAD)(features[::-1])


def test_ref_logps_count_must_match_responses():
    features = [{**DOCSTRING_FEATURES[0], "ref_logps": [-1.0]}]
    with pytest.raises(ValueError, match="batch position 0 has 1 ref_logps for 2 responses"):
        PaddedCollator(pad_token_id=PAD)(features)


def test_mismatched_number_of_responses():
    features = [DOCSTRING_FEATURES[0], {"prompt_ids": [1], "response_ids": [[2], [3], [4]]}]
    with pytest.raises(ValueError, match="batch position 1 has 3 responses"):
        PaddedCollator(pad_token_id=PAD)(features)


def test_empty_prompt_rejected():
    features = [DOCSTRING_FEATURES[0], {"prompt_ids": [], "response_ids": [[2], [3]]}]
    with pytest.raises(ValueError, match="batch position 1 has empty prompt_ids"):
        PaddedCollator(pad_token_id=PAD)(features)


def test_empty_batch_rejected():
    with pytest.raises(ValueError, match="empty"):
        PaddedCollator(pad_token_id=PAD)([])
