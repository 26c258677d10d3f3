"""The data of `sentiment.py`'s experiment: reviews, each cut into a prefix (the prompt) and the rest, and the
ground-truth reward the flags name."""

from __future__ import annotations

import random
import re

import pipeline


def load_reviews(dataset: str, text_column: str, max_train_rows: int | None, max_eval_rows: int | None):
    """Train and test splits with one column, `text`, from a hub id, a local folder or a local file."""
    splits, result = pipeline.load_splits(dataset), []
    for split, limit in (("train", max_train_rows), ("test", max_eval_rows)):
        rows = splits[split]
        if text_column not in rows.column_names:
            raise ValueError(
                f"{dataset} ({split}) has no column {text_column!r}; its columns: {rows.column_names}"
            )
        rows = pipeline.head(rows, limit).select_columns([text_column])
        result.append(rows.rename_column(text_column, "text") if text_column != "text" else rows)
    return result[0], result[1]


WORD_END = re.compile(r"\S+")


def split_review(text: str, index: int, low: int, high: int, seed: int) -> tuple[str, str] | None:
    """``(prefix, rest)``: the review's first k words and everything after them (whitespace kept, so
    ``prefix + rest == text``); k in [low, high] drawn from ``seed`` and the row ``index``, and at most
    the number of words less one. None for a review of fewer than 2 words."""
    ends = [match.end() for match in WORD_END.finditer(text)]
    if len(ends) < 2:
        return None
    k = random.Random(seed * 1_000_003 + index).randint(low, high)
    cut = ends[min(k, len(ends) - 1) - 1]
    return text[:cut], text[cut:]


def review_rows(reviews, script_args, seed: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows (chosen = rejected = the rest of the review) for SFT."""
    low, high = (int(k) for k in script_args.prefix_words.split(","))
    rows = []
    for index, text in enumerate(reviews["text"]):
        split = split_review(text, index, low, high, seed)
        if split is not None:
            rows.append({"prompt": split[0], "chosen": split[1], "rejected": split[1]})
    return rows


def pair_prefixes(script_args, train, seed: int) -> list[str]:
    """The training prefixes sampled for pairs: the first `--pair_prompts` distinct ones."""
    return list(dict.fromkeys(row["prompt"] for row in review_rows(train, script_args, seed)))[
        : script_args.pair_prompts
    ]


def make_scorer(script_args):
    from dpo_trainer.evaluation.scorers import make_scorer as scorer_for

    return scorer_for(
        script_args.reward_model, label=script_args.reward_label, output=script_args.reward_output
    )
