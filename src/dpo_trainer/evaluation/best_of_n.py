"""The Best-of-N baseline (Rafailov et al. 2023, arXiv 2305.18290, App. D.1).

Sample N responses per prompt from a model (the SFT model in the paper) and keep the one a scorer (the
paper's reward model, or any scoring judge) rates highest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from .sampling import sample_responses


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
) -> tuple[list[str], list[list[float]]]:
    """The highest-scoring of ``n`` sampled responses to each prompt, and all the scores.

    Returns ``(best, scores)``: ``best[i]`` is the response to ``prompts[i]`` with the highest score (the
    first sampled among equals) and ``scores[i]`` the ``n`` scores of its samples in sampling order.
    Sampling is `sample_responses` with ``num_samples=n`` and the given settings, so ``n=1`` returns the
    same response as plain sampling with the same seed. The scorer is called once, with each prompt
    repeated ``n`` times alongside its samples.
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
    # max() keeps the first of equal maxima: ties go to the earlier sample.
    best = [
        responses[max(range(n), key=row_scores.__getitem__)] for responses, row_scores in zip(samples, scores)
    ]
    return best, scores
