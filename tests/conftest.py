"""Shared fixtures: an offline tokenizer, tiny models built from configs, and small preference datasets."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import random  # noqa: E402

import pytest  # noqa: E402

from dpo_trainer import DPOConfig  # noqa: E402
from dpo_trainer.tiny import tiny_causal_lm, train_tokenizer  # noqa: E402

TOPICS = ["garden", "river", "music", "bread", "winter", "train", "forest", "paper", "lamp", "coffee"]
GOOD = ["thanks", "happy", "glad", "sure", "here", "helpful", "kindly", "welcome", "great", "answer"]
BAD = ["no", "go", "away", "stupid", "never", "whatever", "boring", "ugh", "leave", "annoying"]


def dpo_config(tmp_path, **overrides) -> DPOConfig:
    """A small CPU training configuration writing under tmp_path; keyword arguments override it."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ref_logps_cache_dir=str(tmp_path / "cache"),
    )
    settings.update(overrides)
    return DPOConfig(**settings)


def preference_rows(n: int, seed: int, k: int = 2) -> list[dict]:
    """A learnable task: the preferred reply uses polite words, the other rude ones (ranked: more rude)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "Tell me about the " + " and the ".join(rng.sample(TOPICS, rng.randint(1, 3))) + ":"
        responses = []
        for rank in range(k):
            words = [
                rng.choice(GOOD if rng.random() >= rank / (k - 1) else BAD) for _ in range(rng.randint(2, 7))
            ]
            responses.append(" " + " ".join(words) + ".")
        if k == 2:
            rows.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
        else:
            rows.append({"prompt": prompt, "responses": responses})
    return rows


@pytest.fixture(scope="session")
def tokenizer():
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in preference_rows(300, seed=123)]
    texts += ["\n\nHuman: hello\n\nAssistant: hi there"] * 3
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def make_model(tokenizer):
    """Factory: a tiny randomly initialised causal LM (same weights for the same seed)."""

    def make(**kwargs):
        kwargs.setdefault("hidden_size", 32)
        kwargs.setdefault("num_layers", 2)
        kwargs.setdefault("num_heads", 4)
        return tiny_causal_lm(tokenizer, **kwargs)

    return make


@pytest.fixture
def pairs():
    return preference_rows(16, seed=0)
