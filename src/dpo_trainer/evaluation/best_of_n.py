"""The Best-of-N baseline (Rafailov et al. 2023, arXiv 2305.18290, App. D.1), and preference pairs made
the same way.

`best_of_n`: sample N responses per prompt from a model (the SFT model in the paper) and keep the one a
scorer (the paper's reward model, or any scoring judge) rates highest.

`best_of_n_prefixes`: Best-of-N for every N up to the number drawn, from one draw (App. D.1, Fig. 4):
Best-of-n takes the first n samples of each prompt, so no N is sampled again.

`sampled_preference_pairs`: the highest- and lowest-scoring of N samples as a (chosen, rejected) row,
i.e. preferences over the model's own responses, labelled by the scorer. `all_preference_pairs`: every
pair of the N samples whose scores differ, as in the paper's controlled sentiment experiment (App. C.1:
4 samples per prefix, all 6 pairs, labelled by a sentiment classifier).
`select_pairs`: the pair rules of both, and of `on_policy_pairs`, with the counts of what each drops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from .sampling import sample_responses

RULES = ("best_worst", "margin")  # the pair rules of `select_pairs`
RULE_ALIASES = {"all": "margin"}
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")


class Scorer(Protocol):
    """Anything with a ``score`` method, e.g. a scoring judge from `dpo_trainer.evaluation.judges`."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def best_of_n(
    model,
    tokenizer,
    prompts: Sequence[str],
    scorer: Scorer,
    *,
    n: int = 16,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    disable_progress: bool = False,
    across_processes: bool = False,
) -> tuple[list[str], list[list[float]]]:
    """The highest-scoring of ``n`` sampled responses to each prompt, and all the scores.

    Returns ``(best, scores)``: ``best[i]`` is the response to ``prompts[i]`` with the highest score (the
    first sampled among equals) and ``scores[i]`` the ``n`` scores of its samples in sampling order.
    Sampling is `sample_responses` with ``num_samples=n`` and the given settings, so ``n=1`` returns the
    same response as plain sampling with the same seed. The scorer is called once, with each prompt
    repeated ``n`` times alongside its samples.
    """
    samples, scores = sample_and_score(
        model,
        tokenizer,
        prompts,
        scorer,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        disable_progress=disable_progress,
        across_processes=across_processes,
    )
    # max() keeps the first of equal maxima: ties go to the earlier sample.
    best = [
        responses[max(range(n), key=row_scores.__getitem__)] for responses, row_scores in zip(samples, scores)
    ]
    return best, scores


def sample_and_score(
    model,
    tokenizer,
    prompts: Sequence[str],
    scorer: Scorer,
    *,
    n: int = 16,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    disable_progress: bool = False,
    across_processes: bool = False,
) -> tuple[list[list[str]], list[list[float]]]:
    """``n`` sampled responses to each prompt (`sample_responses`) and their scores, in sampling order.

    The scorer is called once, with each prompt repeated ``n`` times alongside its samples; a wrong
    number of scores or a NaN score is an error naming the prompt and sample. ``across_processes=True``:
    the sampling is split across the processes of a distributed run (`sample_responses`), and each
    process scores the whole result.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    samples = sample_responses(
        model,
        tokenizer,
        prompts,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_samples=n,
        seed=seed,
        disable_progress=disable_progress,
        across_processes=across_processes,
    )
    if not samples:
        return [], []
    flat_prompts = [prompt for prompt in prompts for _ in range(n)]
    flat_samples = [response for responses in samples for response in responses]
    flat_scores = [float(score) for score in scorer.score(flat_prompts, flat_samples)]
    if len(flat_scores) != len(flat_samples):
        raise ValueError(f"the scorer returned {len(flat_scores)} scores for {len(flat_samples)} responses")
    for position, score in enumerate(flat_scores):
        if math.isnan(score):
            raise ValueError(f"the scorer returned NaN for sample {position % n} of prompt {position // n}")
    scores = [flat_scores[start : start + n] for start in range(0, len(flat_scores), n)]
    return samples, scores


def preference_pairs(
    prompts: Sequence[str], samples: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]
) -> list[dict]:
    """One `{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}` row per prompt: its
    highest- against its lowest-scoring sample (the first sampled among equals).

    A prompt is skipped when its best and worst samples score alike or are the same text (after
    stripping whitespace): such a pair says nothing. Responses are stripped and given the one leading
    space that replies after an ``"Assistant:"`` turn have, so they tokenize as the model produced them.
    """
    rows = []
    for prompt, responses, row_scores in zip(prompts, samples, scores, strict=True):
        if len(responses) < 2:
            raise ValueError("a preference pair needs at least 2 samples per prompt")
        best = max(range(len(responses)), key=row_scores.__getitem__)
        worst = min(range(len(responses)), key=row_scores.__getitem__)
        chosen, rejected = responses[best].strip(), responses[worst].strip()
        if row_scores[best] == row_scores[worst] or chosen == rejected:
            continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + chosen,
                "rejected": " " + rejected,
                "chosen_score": float(row_scores[best]),
                "rejected_score": float(row_scores[worst]),
            }
        )
    return rows


def sampled_preference_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    scorer: Scorer,
    *,
    n: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    disable_progress: bool = False,
    across_processes: bool = False,
) -> list[dict]:
    """Preference rows over ``model``'s own samples: ``n`` per prompt, best against worst by ``scorer``
    (see `preference_pairs`; prompts whose samples all score alike are skipped)."""
    if n < 2:
        raise ValueError(f"n must be >= 2 to make a pair, got {n}")
    samples, scores = sample_and_score(
        model,
        tokenizer,
        prompts,
        scorer,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        disable_progress=disable_progress,
        across_processes=across_processes,
    )
    return preference_pairs(prompts, samples, scores)


def best_of_n_prefixes(
    samples: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], ns: Sequence[int]
) -> dict[int, tuple[list[str], list[float], list[int]]]:
    """Best-of-n for each n in ``ns`` from the same samples: n uses the first n samples of each prompt.

    ``samples[i]`` and ``scores[i]`` are prompt i's samples in sampling order (`sample_and_score` with
    ``n = max(ns)``). Returns ``{n: (responses, scores, indices)}``: prompt i's highest-scoring of its
    first n samples (the first among equals), its score and its index. Best-of-1 is the first sample,
    i.e. plain sampling; a larger n never scores lower on the same samples.
    """
    ns = sorted(set(int(n) for n in ns))
    if not ns or ns[0] < 1:
        raise ValueError(f"every n must be >= 1, got {list(ns)}")
    result = {}
    for n in ns:
        picked = []
        for row, (responses, row_scores) in enumerate(zip(samples, scores, strict=True)):
            if len(row_scores) < n or len(responses) != len(row_scores):
                raise ValueError(
                    f"prompt {row} has {len(responses)} samples and {len(row_scores)} scores; Best-of-{n} needs {n}"
                )
            picked.append(max(range(n), key=row_scores.__getitem__))
        result[n] = (
            [samples[row][i] for row, i in enumerate(picked)],
            [float(scores[row][i]) for row, i in enumerate(picked)],
            picked,
        )
    return result


def all_preference_pairs(
    prompts: Sequence[str], samples: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]
) -> list[dict]:
    """Every pair of each prompt's samples as `{"prompt", "chosen", "rejected", "chosen_score",
    "rejected_score"}` rows, the higher-scoring sample chosen (paper App. C.1: N samples, N(N-1)/2 pairs).

    A pair is dropped when its scores are equal (a tie says nothing) or its texts are; responses are kept
    exactly as sampled. Pairs come in prompt order, then (i, j) with i < j in sampling order.
    """
    rows, _ = select_pairs(prompts, samples, scores, rule="margin")
    return [{key: row[key] for key in PAIR_COLUMNS} for row in rows]


def check_rule(rule: str, margin: float) -> str:
    """`rule`'s canonical name (see `select_pairs`); a bad rule or margin raises naming it."""
    rule = RULE_ALIASES.get(rule, rule)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES} (or {sorted(RULE_ALIASES)}), got {rule!r}")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    return rule


def select_pairs(
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    rule: str = "best_worst",
    margin: float = 0.0,
) -> tuple[list[dict], dict[str, int]]:
    """Preference rows from scored samples by ``rule``, and the counts of what was dropped.

    - ``"best_worst"`` (Xiong et al. 2024, arXiv 2312.11456): per prompt, its highest- against its
      lowest-scoring sample; among equal scores the first sampled. A prompt whose samples all score alike
      gives no pair (a tie), nor one whose best and worst differ by less than ``margin``.
    - ``"margin"`` (alias ``"all"``; Rafailov et al. 2023, arXiv 2305.18290, App. C.1 with ``margin=0``):
      every pair of a prompt's samples whose scores differ by at least ``margin``, the higher-scored
      chosen. Equal scores are a tie and dropped whatever the margin, so ``margin=0`` keeps every pair
      whose scores differ.

    Under either rule a pair whose two texts are equal is dropped (counted as ``identical``). Responses
    are kept exactly as sampled. Rows come in prompt order; within a prompt, under ``"margin"``, in the
    order (i, j), i < j, of the samples' numbers.

    Returns ``(rows, counts)``, counts with keys ``pairs``, ``ties``, ``below_margin``, ``identical``,
    ``prompts_without_pair``.

    >>> rows, counts = select_pairs(["Q"], [["a", "b", "c"]], [[1.0, 3.0, 2.5]], rule="margin", margin=1)
    >>> [(row["chosen"], row["rejected"]) for row in rows], counts["below_margin"]
    ([('b', 'a'), ('c', 'a')], 1)
    """
    rule = check_rule(rule, margin)
    rows: list[dict] = []
    counts = dict(pairs=0, ties=0, below_margin=0, identical=0, prompts_without_pair=0)
    for index, (prompt, responses, row_scores) in enumerate(zip(prompts, samples, scores, strict=True)):
        if len(responses) != len(row_scores):
            raise ValueError(f"prompt {index}: {len(responses)} samples but {len(row_scores)} scores")
        if rule == "best_worst":
            # max()/min() keep the first of equal values: ties go to the earlier sample
            best = max(range(len(row_scores)), key=row_scores.__getitem__)
            worst = min(range(len(row_scores)), key=row_scores.__getitem__)
            candidates = [(best, worst)] if responses else []
        else:
            candidates = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
        before = len(rows)
        for i, j in candidates:
            difference = row_scores[i] - row_scores[j]
            if difference == 0:
                counts["ties"] += 1
                continue
            if abs(difference) < margin:
                counts["below_margin"] += 1
                continue
            win, lose = (i, j) if difference > 0 else (j, i)
            if responses[win] == responses[lose]:
                counts["identical"] += 1
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": responses[win],
                    "rejected": responses[lose],
                    "chosen_score": float(row_scores[win]),
                    "rejected_score": float(row_scores[lose]),
                    "prompt_index": index,
                    "chosen_index": win,
                    "rejected_index": lose,
                }
            )
        if len(rows) == before:
            counts["prompts_without_pair"] += 1
    counts["pairs"] = len(rows)
    return rows, counts
