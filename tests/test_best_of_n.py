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
