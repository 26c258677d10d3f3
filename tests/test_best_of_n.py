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


# ------------------------------------------------------------- Best-of-N for every N from one draw (Fig. 4)


def test_best_of_n_prefixes_reuse_one_draw(make_model, tokenizer):
    from dpo_trainer.evaluation.best_of_n import best_of_n_prefixes, sample_and_score

    model = make_model()
    kwargs = dict(temperature=1.0, max_new_tokens=12, seed=4, batch_size=6, disable_progress=True)
    prompts = PROMPTS * 2
    samples, scores = sample_and_score(model, tokenizer, prompts, LengthScorer(), n=8, **kwargs)
    picked = best_of_n_prefixes(samples, scores, [8, 1, 2, 4])
    assert sorted(picked) == [1, 2, 4, 8]
    # N=1 is plain sampling: the first sample of each prompt, and with a draw of one, sample_responses itself
    assert picked[1][0] == [rows[0] for rows in samples] and picked[1][2] == [0] * len(prompts)
    single, _ = sample_and_score(model, tokenizer, prompts, LengthScorer(), n=1, **kwargs)
    assert best_of_n_prefixes(single, [[0.0]] * len(prompts), [1])[1][0] == [
        rows[0] for rows in sample_responses(model, tokenizer, prompts, **kwargs)
    ]
    for n, (responses, best_scores, indices) in picked.items():
        for row in range(len(prompts)):
            assert indices[row] < n  # only the first n samples are looked at
            assert best_scores[row] == max(scores[row][:n]) == len(responses[row])
            assert responses[row] == samples[row][indices[row]]
    for small, large in [(1, 2), (2, 4), (4, 8)]:  # never lower on the same samples
        assert all(a <= b for a, b in zip(picked[small][1], picked[large][1]))
    assert sum(picked[8][1]) > sum(picked[1][1])  # and higher somewhere, so the test has teeth
    with pytest.raises(ValueError, match="Best-of-16 needs 16"):
        best_of_n_prefixes(samples, scores, [16])
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_prefixes(samples, scores, [0, 2])


def test_all_preference_pairs_are_every_pair_with_ties_dropped():
    from dpo_trainer.evaluation.best_of_n import all_preference_pairs

    samples = [[" a", " b", " c", " d"], [" x", " x", " y"]]
    scores = [[0.5, -1.0, 0.5, 2.0], [1.0, 3.0, 1.0]]
    rows = all_preference_pairs(["p", "q"], samples, scores)
    got = [(r["prompt"], r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in rows]
    # p: 6 pairs less the tie (a, c); q: (x, x) is the same text, (x, y) ties, (x@3, y) stays
    assert got == [
        ("p", " a", " b", 0.5, -1.0),
        ("p", " d", " a", 2.0, 0.5),
        ("p", " c", " b", 0.5, -1.0),
        ("p", " d", " b", 2.0, -1.0),
        ("p", " d", " c", 2.0, 0.5),
        ("q", " x", " y", 3.0, 1.0),
    ]
    # an independent count: N distinct, untied scores give N(N-1)/2 pairs, the chosen always higher
    rng = __import__("random").Random(0)
    many = [[f" s{i}" for i in range(5)]]
    values = [[rng.random() for _ in range(5)]]
    pairs = all_preference_pairs(["p"], many, values)
    assert len(pairs) == 10 and all(r["chosen_score"] > r["rejected_score"] for r in pairs)
    with pytest.raises(ValueError, match="2 samples but 3 scores"):
        all_preference_pairs(["p"], [[" a", " b"]], [[1.0, 2.0, 3.0]])


def test_plot_win_rate_vs_n(tmp_path):
    from dpo_trainer.evaluation.plots import plot_win_rate_vs_n
    from dpo_trainer.evaluation.winrate import win_rate

    results = {"T=1.0": {1: win_rate([1.0, 0.0]), 4: win_rate([1.0, 1.0, 0.5]), 16: win_rate([1.0])}}
    path = plot_win_rate_vs_n(results, tmp_path / "plots" / "bon.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one series"):
        plot_win_rate_vs_n({"T=1.0": {}}, tmp_path / "x.png")


# ------------------------------------------------------------- examples/hh.py: every N, TL;DR-format data


def _hh_example():
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hh.py")
    spec = importlib.util.spec_from_file_location("hh_example_bon", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_hh_scores_every_n_from_one_draw_on_tldr_format_rows(tmp_path):
    import json
    import os

    hh = _hh_example()
    source = os.path.join(os.path.dirname(hh.__file__), "data", "hh_tiny")
    data = tmp_path / "tldr"
    data.mkdir()
    for split, count in (("train", 48), ("test", 8)):  # explicit prompt / chosen / rejected columns
        with open(os.path.join(source, f"{split}.jsonl")) as handle:
            rows = [json.loads(line) for line in handle][:count]
        with open(data / f"{split}.jsonl", "w") as handle:
            for i, row in enumerate(rows):
                prompt, chosen = hh.split_hh_transcript(row["chosen"], row=i, field="chosen")
                rejected = hh.split_hh_transcript(row["rejected"], row=i, field="rejected")[1]
                handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    out = str(tmp_path / "run")
    argv = ["--dataset", str(data), "--output_dir", out, "--bon_n", "1,2,4", "--temperatures", "1.0",
            "--sft_max_steps", "2", "--max_steps", "2", "--eval_prompts", "6", "--max_new_tokens", "8",
            "--per_device_train_batch_size", "4", "--save_steps", "2"]  # fmt: skip
    summary = hh.main(argv)
    rates = summary["eval"]["win_rate_vs_chosen"]
    assert {"SFT", "DPO", "Best of 1", "Best of 2", "Best of 4"} <= set(rates)
    assert os.path.exists(os.path.join(out, "plots", "best_of_n.png"))
    # one draw of 4 per prompt, read back; Best of n is the best of its first n samples under the rule
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(out, "eval")) for f in names]
    (draw_file,) = [f for f in files if os.path.basename(f).startswith("samples-best-of-4-draw")]
    drawn, scores = json.load(open(draw_file))
    assert [len(row) for row in drawn] == [4] * 6
    assert not any(os.path.basename(f).startswith("samples-best-of-2") for f in files)  # nothing resampled
    rule = hh.rule_score
    with open(data / "test.jsonl") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle][:6]
    for row, (prompt, samples_row) in enumerate(zip(prompts, drawn)):
        assert scores[row] == [rule(prompt, s) for s in samples_row]
    wins = [rates[f"Best of {n}"]["1.0"]["rate"] for n in (1, 2, 4)]
    assert wins[0] <= wins[1] <= wins[2]  # same draw, same judge: a larger N never wins less


def test_summarization_prompt_is_the_papers_and_its_verdict_is_read():
    from dpo_trainer.evaluation.judges import SUMMARIZATION_PROMPT, LLMJudge, parse_verdict

    assert SUMMARIZATION_PROMPT.splitlines() == [
        "Which of the following summaries does a better job of summarizing the most important points in the "
        "given forum post, without including unimportant or irrelevant details? A good summary is both "
        "precise and concise.",
        "Post:",
        "{query}",
        "Summary A:",
        "{response_a}",
        "Summary B:",
        "{response_b}",
        "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. "
        'SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the '
        "format:",
        "Comparison: <one-sentence comparison and explanation>",
        'Preferred: <"A" or "B">',
    ]
    assert parse_verdict("Comparison: B keeps the key facts.\nPreferred: B") == "B"
    assert parse_verdict('Comparison: A is concise.\n**Preferred:** "Summary A".') == "A"
    assert parse_verdict("Comparison: both fine.\nPreferred: a short one") is None

    judge = LLMJudge("http://127.0.0.1:9/v1", "m", task="summarization", seed=1, disable_progress=True)
    assert judge.prompt_template == SUMMARIZATION_PROMPT
    sent = []

    def reply(content):  # stands in for the endpoint: prefers the summary that mentions "rent"
        sent.append(content)
        a = content.split("Summary A:\n")[1].split("\nSummary B:")[0]
        return "Comparison: one mentions rent.\nPreferred: " + ("A" if "rent" in a else "B")

    judge._complete = reply
    outcomes = judge.compare(["POST: my landlord raised the rent"] * 4, [" rent went up", " a post"] * 2,
                             [" a post", " rent went up"] * 2)  # fmt: skip
    assert outcomes == [1.0, 0.0, 1.0, 0.0]
    assert all(
        c.startswith("Which of the following summaries") and "Post:\nPOST: my landlord" in c for c in sent
    )
    assert LLMJudge("http://x", "m").prompt_template.startswith("For the following query to a chatbot")
    with pytest.raises(ValueError, match="task must be one of"):
        LLMJudge("http://x", "m", task="translation")
