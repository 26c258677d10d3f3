"""The controlled-sentiment experiment: its scorers, the Unlikelihood baseline, the bundled reviews and
examples/sentiment.py end to end (shortened)."""

import filecmp
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import frontier  # examples/, on the path through conftest
import pipeline
from dpo_trainer.evaluation.scorers import ClassifierScorer, VaderScorer, class_index, make_scorer
from dpo_trainer.unlikelihood import UnlikelihoodCollator, unlikelihood_loss, unlikelihood_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "sentiment.py")
REVIEWS = os.path.join(ROOT, "examples", "data", "reviews_tiny")
SHORT = [
    "--sft_max_steps", "3", "--max_steps", "3", "--max_train_rows", "64", "--max_eval_rows", "16",
    "--pair_prompts", "8", "--samples_per_prompt", "3", "--betas", "0.1,1", "--eval_prompts", "6",
    "--bon_n", "1,2,4", "--max_new_tokens", "8", "--logging_steps", "1", "--save_steps", "2",
    "--per_device_train_batch_size", "4", "--tiny_hidden_size", "32",
]  # fmt: skip
TEXTS = ["The film was", "I watched it", "The cast"]
ENDINGS = [" wonderful and moving.", " on Sunday.", " is awful, a waste of time."]


@pytest.fixture(scope="module")
def sentiment():
    spec = importlib.util.spec_from_file_location("sentiment_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- scorers


def test_vader_scorer_is_vaders_compound_score():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scores = VaderScorer(disable_progress=True).score(TEXTS, ENDINGS)
    assert scores == [analyzer.polarity_scores(p + r)["compound"] for p, r in zip(TEXTS, ENDINGS)]
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5
    alone = VaderScorer(on="response", disable_progress=True).score(["I hated it but"], [" it was great"])
    assert alone == [analyzer.polarity_scores(" it was great")["compound"]]
    assert VaderScorer(disable_progress=True).compare(TEXTS, ENDINGS, ENDINGS[::-1]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="on must be"):
        VaderScorer(on="prompt")


@pytest.fixture(scope="module")
def classifier(tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config).eval()


def own_logits(model, tokenizer, text):
    """The classifier's logits for one text, alone in its batch (no padding)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits[0].double()


@pytest.mark.parametrize("output", ["probability", "logit"])
def test_classifier_scorer_reads_the_named_class(classifier, tokenizer, output):
    scorer = ClassifierScorer(classifier, tokenizer, output=output, batch_size=2, disable_progress=True)
    assert scorer.label_index == 1 and classifier.config.pad_token_id == tokenizer.pad_token_id
    got = scorer.score(TEXTS, ENDINGS)  # batches of 2 of different lengths: padding exercised
    for text, value in zip((p + r for p, r in zip(TEXTS, ENDINGS)), got):
        logits = own_logits(classifier, tokenizer, text)
        want = logits.softmax(-1)[1] if output == "probability" else logits[1]
        assert value == pytest.approx(float(want), abs=1e-5)
    negative = ClassifierScorer(classifier, tokenizer, label=0, output=output, disable_progress=True)
    if output == "probability":  # two classes: the probabilities sum to one
        assert [a + b for a, b in zip(got, negative.score(TEXTS, ENDINGS))] == pytest.approx([1.0] * 3)


def test_classifier_labels_and_loading(classifier, tokenizer, tmp_path):
    assert class_index(classifier.config, "positive") == 1 and class_index(classifier.config, 0) == 0
    with pytest.raises(ValueError, match="no class named 'joy'.*NEGATIVE"):
        class_index(classifier.config, "joy")
    with pytest.raises(ValueError, match="out of range"):
        class_index(classifier.config, 2)
    with pytest.raises(ValueError, match="output must be"):
        ClassifierScorer(classifier, tokenizer, output="odds")
    folder = tmp_path / "clf"
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = make_scorer(str(folder), disable_progress=True)
    assert isinstance(loaded, ClassifierScorer)
    direct = ClassifierScorer(classifier, tokenizer, disable_progress=True)
    assert loaded.score(TEXTS, ENDINGS) == pytest.approx(direct.score(TEXTS, ENDINGS), abs=1e-6)
    assert isinstance(make_scorer("vader"), VaderScorer)


# ---------------------------------------------------------------- Unlikelihood


def naive_unlikelihood(model, rows, alpha):
    """float64, one row at a time from the model's own log-softmax: mean chosen NLL + alpha x mean
    -log(1 - p) over the rejected tokens."""
    chosen, unlikely = [], []
    with torch.no_grad():
        for prompt, good, bad in rows:
            for response, sink in ((good, chosen), (bad, unlikely)):
                ids = prompt + response
                logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                for t, token in enumerate(response):
                    lp = float(logps[len(prompt) + t - 1, token])
                    sink.append(-lp if sink is chosen else -math.log(1 - math.exp(lp)))
    return sum(chosen) / len(chosen) + alpha * sum(unlikely) / len(unlikely)


def test_unlikelihood_loss_matches_the_naive_formula(make_model, tokenizer):
    from dpo_trainer.unlikelihood import UnlikelihoodTrainer

    model = make_model().eval()
    rows = [([5, 6, 7], [8, 9, 1], [10, 1]), ([11], [12, 1], [13, 14, 15, 1])]
    features = [{"prompt_ids": p, "response_ids": [c, r]} for p, c, r in rows]
    batch = UnlikelihoodCollator(pad_token_id=0)(features)
    assert batch["input_ids"][:, 0].tolist() == [5, 11, 5, 11]  # chosen rows first, then rejected
    trainer = UnlikelihoodTrainer.__new__(UnlikelihoodTrainer)  # compute_loss needs only alpha
    for alpha in (0.0, 0.5):
        trainer.alpha = alpha
        got = UnlikelihoodTrainer.compute_loss(trainer, model, batch)
        assert float(got.detach()) == pytest.approx(naive_unlikelihood(model, rows, alpha), rel=1e-5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        unlikelihood_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1),
                          torch.ones(1, 1, dtype=torch.bool), alpha=-1)  # fmt: skip


def test_unlikelihood_training_raises_chosen_and_lowers_rejected(make_model, tokenizer, pairs, tmp_path):
    from dpo_trainer.evaluation.kl import sequence_logprobs

    model = make_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, learning_rate=3e-3, per_device_train_batch_size=8,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )  # fmt: skip

    def scores():
        prompts = [tokenizer(row["prompt"])["input_ids"] for row in pairs]
        eos = [tokenizer.eos_token_id]
        chosen = [tokenizer(row["chosen"])["input_ids"] + eos for row in pairs]
        rejected = [tokenizer(row["rejected"])["input_ids"] + eos for row in pairs]
        return sequence_logprobs(model, prompts, chosen).mean(), sequence_logprobs(
            model, prompts, rejected
        ).mean()

    chosen_before, rejected_before = scores()
    unlikelihood_trainer(model, tokenizer, args, pairs, alpha=1.0).train()
    chosen_after, rejected_after = scores()
    assert chosen_after > chosen_before + 1.0 and rejected_after < chosen_after - 1.0
    assert rejected_after - rejected_before < chosen_after - chosen_before


# ---------------------------------------------------------------- the example's pieces


def test_split_review_keeps_every_character(sentiment):
    text = "A  quiet film.\nIt is  wonderful and moving."
    for index in range(20):
        prefix, rest = sentiment.split_review(text, index, 2, 8, seed=0)
        assert prefix + rest == text and 2 <= len(prefix.split()) <= 7 and rest[0].isspace()
    assert sentiment.split_review(text, 3, 2, 8, seed=0) == sentiment.split_review(text, 3, 2, 8, seed=0)
    assert sentiment.split_review("Great.", 0, 2, 8, seed=0) is None
    assert sentiment.split_review("one two three", 0, 5, 5, seed=0) == ("one two", " three")


def test_reward_at_kl_and_the_matched_kl_verdict():
    dpo = [{"kl": 2.0, "reward": 0.8}, {"kl": 0.0, "reward": 0.2}, {"kl": 1.0, "reward": 0.6}]
    assert frontier.reward_at_kl(dpo, 0.5) == pytest.approx(0.4)
    assert frontier.reward_at_kl(dpo, 1.5) == pytest.approx(0.7)
    assert frontier.reward_at_kl(dpo, 3.0) is None
    verdict = frontier.compare_at_matched_kl
    assert verdict(dpo, {"kl": 0.5, "reward": 0.35})["dpo_at_least_baseline"] == "yes"
    assert verdict(dpo, {"kl": 0.5, "reward": 0.45})["dpo_at_least_baseline"] == "no"
    assert (
        verdict(dpo, {"kl": 5.0, "reward": 0.7})["dpo_at_least_baseline"] == "yes"
    )  # DPO: less KL, more reward
    assert verdict(dpo, {"kl": 5.0, "reward": 0.9})["dpo_at_least_baseline"] == "inconclusive"
    assert verdict(dpo[:1], {"kl": 1.0, "reward": 0.9})["dpo_at_least_baseline"] == "no"  # baseline dominates


def test_plot_frontier(tmp_path):
    from dpo_trainer.evaluation.plots import plot_frontier

    points = {
        "DPO": [{"kl": 1.0, "reward": 0.5, "kl_stderr": 0.1, "reward_stderr": 0.02, "label": "β=0.1"},
                {"kl": 0.2, "reward": 0.3, "label": "β=5"}],
        "Preferred-FT": [{"kl": 0.8, "reward": 0.4}],
    }  # fmt: skip
    path = plot_frontier(points, tmp_path / "plots" / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    far = dict(points, Unlikelihood=[{"kl": 40.0, "reward": 0.2}])
    assert plot_frontier(far, tmp_path / "symlog.png", kl_scale="symlog").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="kl_scale must be"):
        plot_frontier(points, tmp_path / "x.png", kl_scale="log")
    with pytest.raises(ValueError, match="point 0 of method 'SFT' has no 'kl'"):
        plot_frontier({"SFT": [{"reward": 0.1}]}, tmp_path / "x.png")


def test_load_reviews_from_a_local_file_and_a_folder(sentiment, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text(
        "".join(json.dumps({"review": f"Film {i} was fine.", "label": i % 2}) + "\n" for i in range(40))
    )
    train, test = sentiment.load_reviews(str(data), "review", None, None)
    assert train.column_names == ["text"] and len(train) == 38 and len(test) == 2
    with pytest.raises(ValueError, match="no column 'text'.*'review'"):
        sentiment.load_reviews(str(data), "text", None, None)
    train, test = sentiment.load_reviews(REVIEWS, "text", 10, 3)
    assert (len(train), len(test)) == (10, 3) and train[0]["text"].startswith(("I ", "My ", "This ", "We "))


def test_a_tokenizer_without_pad_token_is_left_so_and_samples_and_scores(make_model, tokenizer, tmp_path):
    """The examples leave the caller's tokenizer as it is: one without a pad token (GPT-2) keeps none, and the
    evaluation samples and scores with it (the library's samplers and KL pad with its EOS)."""
    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "tok").pad_token is None
    loaded = pipeline.load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token is None and loaded.eos_token == "<eos>"
    policy, reference = make_model(), make_model()
    prompts = ["The film was", "I watched it on a long and rainy Sunday", "The cast"]  # of unequal lengths
    settings = dict(samples_per_prompt=2, max_new_tokens=6, batch_size=4, seed=0)
    result = frontier.evaluate_policy(str(tmp_path / "p.json"), policy, reference, loaded, prompts,
                                      VaderScorer(disable_progress=True), **settings)  # fmt: skip
    assert result["n"] == 6 and math.isfinite(result["kl"]) and math.isfinite(result["reward"])
    assert loaded.pad_token is None


def test_the_bundled_reviews_regenerate_byte_for_byte(tmp_path):
    command = [sys.executable, os.path.join(REVIEWS, "make_reviews_data.py"), "--out", str(tmp_path)]
    subprocess.run(command + ["--train", "2000", "--test", "200", "--seed", "0"], check=True)
    for name in ("train.jsonl", "test.jsonl"):
        assert filecmp.cmp(tmp_path / name, os.path.join(REVIEWS, name), shallow=False), name


def test_arguments_are_checked(sentiment, tmp_path):
    out = ["--output_dir", str(tmp_path / "x")]
    for bad, message in [
        (["--methods", "dpo,ppo"], "unknown: ppo"),
        (["--samples_per_prompt", "1"], "at least 2"),
        (["--betas", "0.1,zero"], "comma-separated"),
        (["--betas", "0"], "β must be > 0"),
        (["--prefix_words", "5,2"], "1 <= low <= high"),
    ]:
        with pytest.raises(SystemExit, match=message):
            sentiment.parse_args(out + bad)


# ---------------------------------------------------------------- end to end, shortened


@pytest.mark.slow
def test_every_stage_runs_resumes_and_reports(sentiment, tmp_path, capsys):
    out = str(tmp_path / "run")
    summary = sentiment.main(["--output_dir", out] + SHORT)
    for path in ("sft/final/model.safetensors", "pairs/train.jsonl", "pairs/samples.jsonl",
                 "dpo-beta0.1/final/model.safetensors", "dpo-beta1/final/model.safetensors",
                 "preferred-ft/final/model.safetensors", "unlikelihood/final/model.safetensors",
                 "plots/frontier.png", "summary.json"):  # fmt: skip
        assert os.path.exists(os.path.join(out, path)), path
    results = summary["eval"]["results"]
    assert set(results) == {"SFT", "DPO β=0.1", "DPO β=1", "Preferred-FT", "Unlikelihood",
                            "Best of 1", "Best of 2", "Best of 4"}  # fmt: skip
    assert results["SFT"]["kl"] == 0.0 and all(r["n"] == 6 for r in results.values())
    assert [results[f"Best of {n}"]["kl"] for n in (1, 2, 4)] == pytest.approx(
        [0, math.log(2) - 0.5, math.log(4) - 0.75]
    )
    assert results["Best of 1"]["reward"] <= results["Best of 2"]["reward"] <= results["Best of 4"]["reward"]
    for name in ("DPO β=0.1", "Preferred-FT"):  # a trained policy moved away from π_ref
        assert results[name]["kl"] != 0.0 and results[name]["kl_stderr"] > 0
    assert set(summary["eval"]["dpo_vs_baselines_at_matched_kl"]) == {"Preferred-FT", "Unlikelihood"}
    # the pairs: every pair of each prefix's 3 samples whose rewards differ, scored by VADER
    samples = [json.loads(line) for line in open(os.path.join(out, "pairs", "samples.jsonl"))]
    pairs = [json.loads(line) for line in open(os.path.join(out, "pairs", "train.jsonl"))]
    expected = sum(
        1 for s in samples for i in range(3) for j in range(i + 1, 3)
        if s["rewards"][i] != s["rewards"][j] and s["samples"][i] != s["samples"][j]
    )  # fmt: skip
    assert len(pairs) == expected > 0
    vader = VaderScorer(disable_progress=True)
    assert [p["chosen_score"] for p in pairs] == pytest.approx(
        vader.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    )
    capsys.readouterr()
    sentiment.main(["--output_dir", out] + SHORT)  # a rerun resumes: nothing is trained or sampled again
    printed = capsys.readouterr().out
    for stage in ("sft", "pairs", "dpo-beta0.1", "dpo-beta1", "preferred-ft", "unlikelihood"):
        assert f"[{stage}] already done" in printed, stage


@pytest.mark.slow
def test_runs_under_accelerate_launch(tmp_path):
    out = str(tmp_path / "accel")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", SCRIPT,
               "--output_dir", out] + SHORT + ["--methods", "dpo", "--betas", "0.5"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DPO β=0.5" in result.stdout and "Best of 4" in result.stdout
    with open(os.path.join(out, "summary.json")) as handle:
        assert set(json.load(handle)["eval"]["results"]) >= {"SFT", "DPO β=0.5", "Best of 4"}


# ---------------------------------------------------------------- on-policy rounds (issue 23)


def manifest_of(sentiment, out, *flags):
    script_args, config = sentiment.parse_args(["--output_dir", str(out), *flags])
    return pipeline.run_manifest(sentiment.stage_settings(script_args), script_args, config)


@pytest.mark.parametrize(
    "flags, stale",
    [
        (
            ["--rounds", "3"],
            {"round1_pairs", "round1", "round2_pairs", "round2"},
        ),  # another split of the prefixes
        (
            ["--reward_model", "some/classifier"],
            {
                "pairs",
                "dpo-beta0.1",
                "preferred-ft",
                "unlikelihood",
                "round1_pairs",
                "round1",
                "round2_pairs",
                "round2",
                "eval",
            },
        ),  # fmt: skip
        (["--round_reference", "previous"], {"round2"}),  # round 1's reference is the SFT model either way
    ],
)
def test_a_changed_rounds_or_scorer_setting_makes_the_rounds_stale(sentiment, tmp_path, flags, stale):
    out = tmp_path / "run"
    old = manifest_of(sentiment, out, "--rounds", "2", "--betas", "0.1")
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stages": old}))
    for stage in old:
        (out / stage).mkdir()
    pipeline.check_run_manifest(
        str(out), manifest_of(sentiment, out, "--rounds", "2", "--betas", "0.1"), False
    )
    new = manifest_of(sentiment, out, "--rounds", "2", "--betas", "0.1", *flags)
    assert set(pipeline.manifest_changes(old, new)) == stale
    with pytest.raises(SystemExit, match="--restart_stale"):
        pipeline.check_run_manifest(str(out), new, restart_stale=False)


def test_rounds_run_resume_and_report(sentiment, tmp_path, capsys):
    out = str(tmp_path / "rounds")
    flags = (
        ["--output_dir", out]
        + SHORT
        + ["--methods", "dpo", "--betas", "0.1,1", "--rounds", "2", "--bon_n", ""]
    )
    summary = sentiment.main(flags)
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert {"round", "reward", "reward_se", "kl", "kl_se", "pairs", "seconds"} <= set(entry)
        assert entry["pairs"] > 0 and entry["kl_se"] >= 0 and entry["seconds"] > 0
    with open(os.path.join(out, "summary.json")) as handle:
        assert [r["reward"] for r in json.load(handle)["rounds"]] == [r["reward"] for r in rounds]
    assert os.path.exists(os.path.join(out, "plots", "rounds.png"))
    first = [json.loads(line)["prompt"] for line in open(os.path.join(out, "round1_pairs", "train.jsonl"))]
    second = [json.loads(line)["prompt"] for line in open(os.path.join(out, "round2_pairs", "train.jsonl"))]
    assert first and second and not set(first) & set(second)  # each round on prefixes of its own
    assert (
        pipeline.stage_done(os.path.join(out, "round2"))["last_logged"]["step"] == 2
    )  # max_steps 3 / 2 rounds
    capsys.readouterr()
    again = sentiment.main(flags)  # a rerun: nothing trained or sampled again
    printed = capsys.readouterr().out
    for stage in ("round1_pairs", "round1", "round2_pairs", "round2"):
        assert f"[{stage}] already done" in printed, stage
    assert "On-policy pairs" not in printed and " steps in " not in printed
    assert [r["reward"] for r in again["rounds"]] == [r["reward"] for r in rounds]
    # a round killed after sampling, before its pairs were written: its samples are read back, not drawn again
    first_record = pipeline.stage_done(os.path.join(out, "round2_pairs"))
    assert first_record["sampled_prompts"] == first_record["prompts"] > 0
    for name in ("done.json", "train.jsonl"):
        os.remove(os.path.join(out, "round2_pairs", name))
    shutil.rmtree(os.path.join(out, "round2"))
    sentiment.main(flags)
    record = pipeline.stage_done(os.path.join(out, "round2_pairs"))
    assert record["sampled_prompts"] == 0 and record["cached_prompts"] == first_record["prompts"]
    assert record["pairs"] == first_record["pairs"]
