"""On-policy preference pairs (dpo_trainer.evaluation.onpolicy): the pair rules on hand-made scores, end to end
on a tiny model into DPOTrainer, resuming from the cache, and two processes against one."""

import itertools
import json
import math
import os
import random
import subprocess

import pytest
import torch

import dpo_trainer.evaluation.onpolicy as onpolicy_module
from dpo_trainer import DPOTrainer
from dpo_trainer.evaluation import RuleJudge, on_policy_pairs, select_pairs
from dpo_trainer.evaluation.best_of_n import all_preference_pairs, sample_and_score
from dpo_trainer.evaluation.sample_cache import policy_fingerprint, scorer_fingerprint
from dpo_trainer.evaluation.sampling import sample_responses

from conftest import DIST_TIMEOUT_S, TESTS, TORCHRUN_TWO_PROCESSES, dist_env, dpo_config, preference_rows

PROMPTS = [row["prompt"] for row in preference_rows(7, seed=3)]
SMALL = dict(max_new_tokens=6, batch_size=5, disable_progress=True)
PAIR_KEYS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")


def word_count(prompt: str, response: str) -> float:
    """Words in the response: many ties among short samples, so the tie handling is exercised."""
    return float(len(response.split()))


def char_count(prompt: str, response: str) -> float:
    return float(len(response))


def texts(n_prompts: int, n: int) -> list[list[str]]:
    return [[f"p{i}s{j}" for j in range(n)] for i in range(n_prompts)]


# ---------------------------------------------------------------------------------- the rules, by hand


def test_best_worst_pairs_the_first_maximum_with_the_first_minimum():
    scores = [[1.0, 3.0, 3.0, 0.0, 0.0], [2.0, -1.0, 5.0, 4.0, -1.0]]
    rows, counts = select_pairs(["A", "B"], texts(2, 5), scores, rule="best_worst")
    assert [(r["prompt"], r["chosen_index"], r["rejected_index"]) for r in rows] == [("A", 1, 3), ("B", 2, 1)]
    assert [(r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in rows] == [
        ("p0s1", "p0s3", 3.0, 0.0),
        ("p1s2", "p1s1", 5.0, -1.0),
    ]
    assert [r["prompt_index"] for r in rows] == [0, 1]
    assert counts == dict(pairs=2, ties=0, below_margin=0, identical=0, prompts_without_pair=0)


def test_best_worst_drops_a_prompt_whose_samples_all_tie_or_are_within_the_margin():
    scores = [[2.0, 2.0, 2.0], [1.0, 1.5, 1.2], [0.0, 1.0, 0.5]]
    rows, counts = select_pairs(["A", "B", "C"], texts(3, 3), scores, rule="best_worst", margin=1.0)
    assert [(r["prompt"], r["chosen_index"], r["rejected_index"]) for r in rows] == [
        ("C", 1, 0)
    ]  # 1.0 - 0.0 >= 1
    assert counts == dict(pairs=1, ties=1, below_margin=1, identical=0, prompts_without_pair=2)


def test_margin_rule_keeps_exactly_the_pairs_that_differ_by_at_least_the_margin():
    rng = random.Random(0)
    prompts = [f"q{i}" for i in range(30)]
    scores = [[float(rng.randint(0, 4)) / 2 for _ in range(5)] for _ in prompts]
    samples = texts(30, 5)
    for margin in (0, 0.5, 1.0, 1.5, 2.0, 10.0):
        rows, counts = select_pairs(prompts, samples, scores, rule="margin", margin=margin)
        expected = []  # brute force over every (i, j), i < j
        ties = below = 0
        for p, row in enumerate(scores):
            for i, j in itertools.combinations(range(5), 2):
                if row[i] == row[j]:
                    ties += 1
                elif abs(row[i] - row[j]) < margin:
                    below += 1
                else:
                    win, lose = (i, j) if row[i] > row[j] else (j, i)
                    expected.append((p, win, lose))
        assert [(r["prompt_index"], r["chosen_index"], r["rejected_index"]) for r in rows] == expected
        assert (counts["pairs"], counts["ties"], counts["below_margin"]) == (len(expected), ties, below)
        assert all(r["chosen_score"] - r["rejected_score"] >= max(margin, 1e-12) for r in rows)
        assert counts["pairs"] + counts["ties"] + counts["below_margin"] == 30 * 10
    # margin 0 is the paper's all-pairs rule (App. C.1), as best_of_n already builds it
    rows, _ = select_pairs(prompts, samples, scores, rule="all")
    assert [{k: r[k] for k in PAIR_KEYS} for r in rows] == all_preference_pairs(prompts, samples, scores)


def test_pairs_of_equal_texts_are_dropped_and_counted():
    samples = [["same", "same", "other"]]
    rows, counts = select_pairs(["A"], samples, [[1.0, 2.0, 0.0]], rule="margin")
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == [(0, 2), (1, 2)]
    assert counts["identical"] == 1
    rows, counts = select_pairs(["A"], [["x", "y", "x"]], [[3.0, 2.0, 0.0]], rule="best_worst")
    assert rows == [] and counts["identical"] == 1 and counts["prompts_without_pair"] == 1


def test_rows_come_in_a_fixed_order_whatever_the_scores():
    samples = texts(3, 4)
    scores = [[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [1.0, 0.0, 3.0, 2.0]]
    rows, _ = select_pairs(["A", "B", "C"], samples, scores, rule="margin")
    order = [(r["prompt_index"], min(r["chosen_index"], r["rejected_index"]), max(r["chosen_index"], r["rejected_index"])) for r in rows]  # fmt: skip
    assert order == sorted(order) and len(order) == 18
    assert select_pairs(["A", "B", "C"], samples, scores, rule="margin")[0] == rows


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rule="best"), "rule must be one of"),
        (dict(margin=-0.5), "margin must be a finite number >= 0"),
        (dict(margin=float("nan")), "margin must be a finite number >= 0"),
    ],
)
def test_select_pairs_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_pairs(["A"], [["a", "b"]], [[0.0, 1.0]], **kwargs)


# ------------------------------------------------------------- on_policy_pairs with an injected sampler


class FakeSampler:
    """Stands in for sample_responses: the response says which prompt, seed and sample made it."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple[list[str], int]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, model, tokenizer, prompts, *, num_samples, seed, **kwargs):
        self.calls.append((list(prompts), seed))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("stopped by the test")
        return [
            [f"{prompt}|{seed}|{'x' * ((len(prompt) + j) % 4)}" for j in range(num_samples)]
            for prompt in prompts
        ]


class CountingScorer:
    def __init__(self, values=None):
        self.values = values
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        if self.values is not None:
            return self.values(prompts, responses)
        return [float(response.count("x")) for response in responses]


@pytest.fixture
def fake_sampler(monkeypatch):
    sampler = FakeSampler()
    monkeypatch.setattr(onpolicy_module, "sample_responses", sampler)
    return sampler


def test_chunks_are_sampled_with_their_own_seeds_and_the_rule_applied_to_all(fake_sampler):
    prompts = [f"prompt {'y' * i}" for i in range(7)]
    made = on_policy_pairs(
        None, None, prompts, CountingScorer(), n=3, seed=11, chunk_size=3, disable_progress=True
    )
    assert [chunk for chunk, _ in fake_sampler.calls] == [prompts[0:3], prompts[3:6], prompts[6:7]]
    seeds = [seed for _, seed in fake_sampler.calls]
    assert seeds[0] == 11 and len(set(seeds)) == 3  # the first chunk at the seed itself, the others hashed
    scores = [[float(r.count("x")) for r in responses] for responses in made.samples]
    assert made.scores == scores
    assert made.rows == select_pairs(prompts, made.samples, scores, rule="best_worst")[0]
    assert made.counts == dict(
        prompts=7, samples=21, pairs=made.pairs, ties=made.ties, below_margin=0, identical=0,
        prompts_without_pair=made.prompts_without_pair, sampled_prompts=7, cached_prompts=0,
    )  # fmt: skip
    assert made.pairs == 7 and made.cached_prompts == 0 and made.key is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n=1), ValueError, "n must be >= 2"),
        (dict(rule="pairs"), ValueError, "rule must be one of"),
        (dict(margin=-1), ValueError, "margin must be a finite number >= 0"),
        (dict(prompts=[]), ValueError, "prompts is empty"),
        (dict(prompts="a prompt"), TypeError, "not a single string"),
        (dict(prompts=["ok", 3]), TypeError, r"prompts\[1\] must be a string"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(scorer=object()), TypeError, "scorer must have a score"),
    ],
)
def test_bad_input_is_refused_naming_the_field(fake_sampler, kwargs, error, message):
    arguments = dict(prompts=["a", "b"], scorer=CountingScorer(), n=2) | kwargs
    with pytest.raises(error, match=message):
        on_policy_pairs(None, None, arguments.pop("prompts"), arguments.pop("scorer"), **arguments)
    assert fake_sampler.calls == []


@pytest.mark.parametrize(
    "values, message",
    [
        (lambda prompts, responses: [0.0] * (len(responses) - 1), "returned 5 scores for 6 responses"),
        (lambda prompts, responses: [0.0] * 4 + [float("nan"), 0.0], r"nan for sample 0 of prompt 2 \('c'\)"),
        (
            lambda prompts, responses: [0.0] * 3 + [float("inf"), 0.0, 0.0],
            r"inf for sample 1 of prompt 1 \('b'\)",
        ),
        (lambda prompts, responses: [0.0] * 5 + ["high"], "'high', not a number, for sample 1 of prompt 2"),
    ],
)
def test_a_bad_scorer_is_named_with_the_prompt_and_sample(fake_sampler, values, message):
    with pytest.raises(ValueError, match=message):
        on_policy_pairs(None, None, ["a", "b", "c"], CountingScorer(values), n=2, disable_progress=True)


# ------------------------------------------------------------------------------ a tiny model, end to end


def test_end_to_end_pairs_train_dpo_and_match_sample_and_score(make_model, tokenizer, tmp_path):
    model = make_model(seed=4)
    scorer = RuleJudge(char_count, disable_progress=True)
    made = on_policy_pairs(model, tokenizer, PROMPTS, scorer, n=4, rule="margin", margin=2, seed=3, **SMALL)
    # one chunk: the samples and scores best_of_n's sample_and_score gives at the same seed
    samples, scores = sample_and_score(model, tokenizer, PROMPTS, scorer, n=4, seed=3, **SMALL)
    assert (made.samples, made.scores) == (samples, scores)
    assert made.rows == select_pairs(PROMPTS, samples, scores, rule="margin", margin=2)[0]
    assert made.pairs >= 4, made.counts
    assert made.counts["samples"] == 4 * len(PROMPTS) and made.sampled_prompts == len(PROMPTS)
    for row in made.rows:
        assert row["chosen_score"] - row["rejected_score"] >= 2
        assert (
            row["chosen"] in made.samples[row["prompt_index"]]
            and row["prompt"] == PROMPTS[row["prompt_index"]]
        )
    dataset = made.dataset()
    assert len(dataset) == made.pairs and set(dataset.column_names) >= {"prompt", "chosen", "rejected"}

    policy = make_model(seed=4)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainer = DPOTrainer(
        policy, args=dpo_config(tmp_path, max_steps=1), train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert any(not torch.equal(before[name], p) for name, p in policy.named_parameters())


def test_no_pair_gives_an_empty_dataset_with_the_columns(fake_sampler):
    made = on_policy_pairs(
        None, None, ["a"], CountingScorer(lambda p, r: [1.0] * len(r)), n=3, disable_progress=True
    )
    assert made.rows == [] and made.ties == 1 and made.prompts_without_pair == 1
    dataset = made.dataset()
    assert len(dataset) == 0 and "chosen_score" in dataset.column_names


# ----------------------------------------------------------------------------------------------- resume


class CountingSampler:
    """The real sample_responses, counting the prompts it is asked for; optionally interrupted."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, *args, **kwargs):
        self.calls.append(list(args[2]))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("stopped by the test")
        return sample_responses(*args, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    """install(fail_on_call=None): a fresh CountingSampler in place of on_policy_pairs' sample_responses."""

    def install(fail_on_call=None):
        sampler = CountingSampler(fail_on_call)
        monkeypatch.setattr(onpolicy_module, "sample_responses", sampler)
        return sampler

    return install


def cached_run(model, tokenizer, cache, **overrides):
    settings = dict(n=3, rule="margin", seed=2, chunk_size=3, cache_dir=cache, **SMALL)
    scorer = overrides.pop("scorer", RuleJudge(char_count, disable_progress=True))
    return on_policy_pairs(model, tokenizer, PROMPTS, scorer, **(settings | overrides))


def test_a_rerun_with_the_same_cache_samples_nothing_and_gives_the_same_pairs(
    make_model, tokenizer, tmp_path, counting
):
    model = make_model(seed=5)
    first_sampler = counting()
    first = cached_run(model, tokenizer, tmp_path / "cache")
    assert first_sampler.calls == [PROMPTS[0:3], PROMPTS[3:6], PROMPTS[6:7]]
    assert (first.sampled_prompts, first.cached_prompts) == (7, 0)
    files = sorted(os.listdir(tmp_path / "cache" / first.key))
    assert len([f for f in files if f.startswith("chunk-")]) == 3 and not [
        f for f in files if f.startswith(".tmp")
    ]

    again_sampler = counting()
    again = cached_run(model, tokenizer, tmp_path / "cache")
    assert again_sampler.calls == []
    assert (again.sampled_prompts, again.cached_prompts) == (0, 7)
    assert (again.rows, again.samples, again.scores, again.key) == (
        first.rows,
        first.samples,
        first.scores,
        first.key,
    )
    # the pair rule is applied to the cached scores: another rule or margin samples nothing either
    other = cached_run(model, tokenizer, tmp_path / "cache", rule="best_worst")
    assert again_sampler.calls == [] and other.key == first.key
    assert other.rows == select_pairs(PROMPTS, first.samples, first.scores, rule="best_worst")[0]
    # and what was cached is what an uncached run gives
    uncached = on_policy_pairs(model, tokenizer, PROMPTS, RuleJudge(char_count, disable_progress=True),
                               n=3, rule="margin", seed=2, chunk_size=3, **SMALL)  # fmt: skip
    assert uncached.rows == first.rows


def test_an_interrupted_run_resumes_with_the_chunks_it_had_not_finished(
    make_model, tokenizer, tmp_path, counting
):
    model = make_model(seed=5)
    counting(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        cached_run(model, tokenizer, tmp_path / "cache")
    resumed_sampler = counting()
    resumed = cached_run(model, tokenizer, tmp_path / "cache")
    assert resumed_sampler.calls == [
        PROMPTS[3:6],
        PROMPTS[6:7],
    ]  # the first chunk was written before the stop
    assert (resumed.sampled_prompts, resumed.cached_prompts) == (4, 3)
    whole = cached_run(model, tokenizer, tmp_path / "fresh")
    assert (resumed.rows, resumed.samples, resumed.scores) == (whole.rows, whole.samples, whole.scores)


@pytest.mark.parametrize(
    "change",
    ["n", "seed", "temperature", "max_new_tokens", "top_p", "scorer", "scorer_key", "model", "prompts"],
)
def test_changed_settings_do_not_reuse_the_cache(make_model, tokenizer, tmp_path, counting, change):
    model = make_model(seed=5)
    counting()
    first = cached_run(model, tokenizer, tmp_path / "cache")
    overrides = {
        "n": dict(n=4),
        "seed": dict(seed=3),
        "temperature": dict(temperature=0.5),
        "max_new_tokens": dict(max_new_tokens=5),
        "top_p": dict(top_p=0.9),
        "scorer": dict(scorer=RuleJudge(word_count, disable_progress=True)),
        "scorer_key": dict(scorer_key="my scorer, version 2"),
        "model": dict(model=make_model(seed=6)),
        "prompts": {},
    }[change]
    sampler = counting()
    if change == "prompts":  # the first chunk's prompts change: that chunk, and only it, is sampled again
        prompts = ["Tell me about the sea:", *PROMPTS[1:]]
        settings = dict(n=3, rule="margin", seed=2, chunk_size=3, cache_dir=tmp_path / "cache", **SMALL)
        changed = on_policy_pairs(
            model, tokenizer, prompts, RuleJudge(char_count, disable_progress=True), **settings
        )
        assert sampler.calls == [prompts[0:3]] and changed.key == first.key
        return
    changed = cached_run(overrides.pop("model", model), tokenizer, tmp_path / "cache", **overrides)
    assert sampler.calls == [PROMPTS[0:3], PROMPTS[3:6], PROMPTS[6:7]]
    assert changed.key != first.key and changed.cached_prompts == 0


def test_a_damaged_cache_file_is_sampled_again(make_model, tokenizer, tmp_path, counting):
    model = make_model(seed=5)
    counting()
    first = cached_run(model, tokenizer, tmp_path / "cache")
    folder = tmp_path / "cache" / first.key
    damaged = sorted(f for f in os.listdir(folder) if f.startswith("chunk-"))[1]
    (folder / damaged).write_text('{"key": "cut sho')
    sampler = counting()
    again = cached_run(model, tokenizer, tmp_path / "cache")
    assert sampler.calls == [PROMPTS[3:6]] and again.rows == first.rows
    assert json.loads((folder / damaged).read_text())["prompts"] == PROMPTS[3:6]  # written whole again


def test_the_policy_fingerprint_counts_a_trained_adapter(make_model, tokenizer):
    peft = pytest.importorskip("peft")
    policy = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = policy_fingerprint(policy, tokenizer)
    assert policy_fingerprint(policy, tokenizer) == before
    with torch.no_grad():
        next(p for name, p in policy.named_parameters() if "lora_B" in name).add_(0.01)
    assert policy_fingerprint(policy, tokenizer) != before


def test_the_scorer_fingerprint_follows_its_settings_not_its_progress_bar(tokenizer):
    assert scorer_fingerprint(RuleJudge(char_count)) == scorer_fingerprint(
        RuleJudge(char_count, disable_progress=True)
    )
    assert scorer_fingerprint(RuleJudge(char_count)) != scorer_fingerprint(RuleJudge(word_count))
    from dpo_trainer.evaluation import RewardModelJudge

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_labels=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    first = transformers.LlamaForSequenceClassification(config)
    torch.manual_seed(1)
    second = transformers.LlamaForSequenceClassification(config)
    key = scorer_fingerprint(RewardModelJudge(first, tokenizer, batch_size=4, device="cpu"))
    assert key == scorer_fingerprint(RewardModelJudge(first, tokenizer, batch_size=4, disable_progress=True))
    assert key != scorer_fingerprint(RewardModelJudge(second, tokenizer, batch_size=4))
    assert key != scorer_fingerprint(RewardModelJudge(first, tokenizer, batch_size=4, max_length=64))


# -------------------------------------------------------------------------------- two processes, one result


@pytest.mark.slow
def test_two_processes_make_the_pairs_one_process_makes(tmp_path, make_model, tokenizer, monkeypatch):
    model_dir = tmp_path / "model"
    make_model(seed=7).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = dict(
        n=3, rule="margin", temperature=0.9, max_new_tokens=6, batch_size=2, seed=9, chunk_size=4,
        cache_dir=str(tmp_path / "cache"), scorer_key="word count",
    )  # fmt: skip
    (tmp_path / "settings.json").write_text(json.dumps({"prompts": PROMPTS, **settings}))
    command = [*TORCHRUN_TWO_PROCESSES, str(TESTS / "dist_scripts" / "onpolicy_pairs.py"), str(model_dir),
               str(tmp_path), str(tmp_path / "settings.json")]  # fmt: skip
    result = subprocess.run(command, env=dist_env(), capture_output=True, text=True, timeout=DIST_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["first"] == ranks[1]["first"]  # every process has every pair
    assert ranks[0]["first"]["counts"]["sampled_prompts"] == len(PROMPTS)
    # the second call read every chunk the first wrote, on both processes
    assert ranks[0]["again"]["counts"]["cached_prompts"] == ranks[1]["again"]["counts"]["cached_prompts"] == 7
    assert ranks[0]["again"]["rows"] == ranks[1]["again"]["rows"] == ranks[0]["first"]["rows"]
    # the sampling was split (each process ran some of the batches) and only the main process scored
    generated = [r["calls"]["generate"] for r in ranks]
    assert min(generated) > 0 and [r["calls"]["score"] for r in ranks] == [2, 0]  # 2 chunks, scored once
    # a scorer failing on the main process stops every process
    assert ranks[0]["failure"] == "ValueError: the judge is down"
    assert (
        ranks[1]["failure"]
        == "RuntimeError: the scorer failed on the main process: ValueError: the judge is down"
    )

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generate, generate_calls = model.generate, {"n": 0}

    def counted_generate(*args, **kwargs):
        generate_calls["n"] += 1
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted_generate)
    scorer = RuleJudge(word_count, disable_progress=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: the same kernels, the same rounding
    try:
        one = on_policy_pairs(model, tokenizer, PROMPTS, scorer, disable_progress=True,
                              **(settings | dict(cache_dir=None)))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["first"]["samples"] == one.samples and ranks[0]["first"]["scores"] == one.scores
    assert ranks[0]["first"]["rows"] == one.rows and one.ties > 0 and one.pairs > 0
    assert sum(generated) == generate_calls["n"]  # the same batches, dealt out
    assert ranks[0]["first"]["counts"] == one.counts
    # the cache two processes wrote serves one process (the number of processes is not in the key)
    monkeypatch.setattr(onpolicy_module, "sample_responses", FakeSampler(fail_on_call=1))
    read = on_policy_pairs(model, tokenizer, PROMPTS, scorer, disable_progress=True, **settings)
    assert read.rows == one.rows and read.cached_prompts == len(PROMPTS)
