"""The Best-of-N baseline (dpo_trainer.evaluation.best_of_n) with stand-in scorers on a tiny model."""

import pytest

from dpo_trainer.evaluation.best_of_n import best_of_n
from dpo_trainer.evaluation.sampling import sample_responses

PROMPTS = ["Tell me about the garden:", "Hi", "\n\nHuman: hello\n\nAssistant:"]


class LengthScorer:
    """Scores a response by its length in characters; records its calls."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [float(len(response)) for response in responses]


class ConstantScorer:
    def __init__(self, values=None):
        self.values = values

    def score(self, prompts, responses):
        return self.values if self.values is not None else [0.0] * len(responses)


def test_picks_the_highest_scoring_sample_and_returns_all_scores(make_model, tokenizer):
    model = make_model()
    scorer = LengthScorer()
    kwargs = dict(temperature=1.0, max_new_tokens=12, seed=3, disable_progress=True)
    best, scores = best_of_n(model, tokenizer, PROMPTS, scorer, n=4, batch_size=5, **kwargs)

    samples = sample_responses(model, tokenizer, PROMPTS, num_samples=4, batch_size=5, **kwargs)
    assert len(scorer.calls) == 1
    scored_prompts, scored_responses = scorer.calls[0]
    assert scored_prompts == [prompt for prompt in PROMPTS for _ in range(4)]
    assert scored_responses == [response for responses in samples for response in responses]
    assert scores == [[float(len(response)) for response in responses] for responses in samples]
    for response, responses, row_scores in zip(best, samples, scores):
        assert response in responses
        assert len(response) == max(row_scores)
    assert len({len(response) for response in samples[0]}) > 1  # the choice was not trivial


def test_n_equals_one_is_plain_sampling(make_model, tokenizer):
    model = make_model()
    kwargs = dict(temperature=0.8, max_new_tokens=8, seed=5, disable_progress=True)
    best, scores = best_of_n(model, tokenizer, PROMPTS, LengthScorer(), n=1, **kwargs)
    assert [[response] for response in best] == sample_responses(model, tokenizer, PROMPTS, **kwargs)
    assert [len(row) for row in scores] == [1] * len(PROMPTS)


def test_ties_go_to_the_first_sample(make_model, tokenizer):
    model = make_model()
    kwargs = dict(n=3, temperature=1.0, max_new_tokens=6, disable_progress=True)
    best, scores = best_of_n(model, tokenizer, PROMPTS, ConstantScorer(), **kwargs)
    samples = sample_responses(
        model, tokenizer, PROMPTS, num_samples=3, temperature=1.0, max_new_tokens=6, disable_progress=True
    )
    assert best == [responses[0] for responses in samples]
    assert scores == [[0.0] * 3] * len(PROMPTS)


def test_rejects_bad_n_and_bad_scores(make_model, tokenizer):
    model = make_model()
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n(model, tokenizer, PROMPTS, LengthScorer(), n=0)
    with pytest.raises(ValueError, match="returned 1 scores for 6 responses"):
        best_of_n(
            model, tokenizer, PROMPTS, ConstantScorer([1.0]), n=2, max_new_tokens=2, disable_progress=True
        )
    with pytest.raises(ValueError, match="NaN for sample 1 of prompt 0"):
        best_of_n(
            model, tokenizer, PROMPTS[:1], ConstantScorer([0.0, float("nan")]), n=2, disable_progress=True
        )
    assert best_of_n(model, tokenizer, [], LengthScorer(), disable_progress=True) == ([], [])


def test_with_a_rule_judge(make_model, tokenizer):
    from dpo_trainer.evaluation.judges import RuleJudge

    model = make_model()
    judge = RuleJudge(lambda prompt, response: -len(response), disable_progress=True)  # the shortest wins
    kwargs = dict(temperature=1.0, max_new_tokens=10, disable_progress=True)
    best, scores = best_of_n(model, tokenizer, PROMPTS, judge, n=3, **kwargs)
    samples = sample_responses(model, tokenizer, PROMPTS, num_samples=3, **kwargs)
    assert best == [min(responses, key=len) for responses in samples]
    assert scores == [[-float(len(response)) for response in responses] for responses in samples]


# ------------------------------------------------------------- preference pairs from samples


def test_preference_pairs_take_best_against_worst_and_skip_uninformative_prompts():
    from dpo_trainer.evaluation.best_of_n import preference_pairs

    prompts = ["p0", "p1", "p2", "p3"]
    samples = [
        [" mid", "best ", " worst"],  # scored 1, 3, 0: best vs worst, whitespace normalised
        [" a", " b"],  # equal scores: no preference
        [" same", "same "],  # different scores, same text once stripped: no preference
        ["x", "y", "z"],  # the first of equal maxima / minima wins
    ]
    scores = [[1.0, 3.0, 0.0], [2.0, 2.0], [1.0, 0.0], [5.0, 5.0, -1.0]]
    rows = preference_pairs(prompts, samples, scores)
    assert rows == [
        {"prompt": "p0", "chosen": " best", "rejected": " worst", "chosen_score": 3.0, "rejected_score": 0.0},
        {"prompt": "p3", "chosen": " x", "rejected": " z", "chosen_score": 5.0, "rejected_score": -1.0},
    ]
    with pytest.raises(ValueError, match="at least 2 samples"):
        preference_pairs(["p"], [["only"]], [[1.0]])


def test_sampled_preference_pairs_train_dpo(make_model, tokenizer, tmp_path):
    from dpo_trainer import DPOTrainer
    from dpo_trainer.evaluation.best_of_n import sample_and_score, sampled_preference_pairs

    from conftest import dpo_config

    model = make_model()
    kwargs = dict(temperature=1.0, max_new_tokens=10, seed=2, disable_progress=True)
    rows = sampled_preference_pairs(model, tokenizer, PROMPTS * 3, LengthScorer(), n=3, **kwargs)
    samples, scores = sample_and_score(model, tokenizer, PROMPTS * 3, LengthScorer(), n=3, **kwargs)
    assert rows  # lengths of 3 random samples rarely all agree
    for row in rows:
        index = next(i for i, s in enumerate(samples) if row["chosen"].strip() in [x.strip() for x in s])
        assert row["chosen_score"] == max(scores[index]) and row["rejected_score"] == min(scores[index])
        assert len(row["chosen"].strip()) > len(row["rejected"].strip())
    with pytest.raises(ValueError, match="n must be >= 2"):
        sampled_preference_pairs(model, tokenizer, PROMPTS, LengthScorer(), n=1, **kwargs)
    # the rows are a dataset the trainer takes as it is (the score columns ride along)
    trainer = DPOTrainer(
        model, args=dpo_config(tmp_path, max_steps=1), train_dataset=rows, processing_class=tokenizer
    )
    assert len(trainer.train_dataset) == len(rows)
    trainer.train()
