"""Sequence-level KL(π‖π_ref) from a policy's own samples, as on the x axis of the paper's reward/KL
frontier (Rafailov et al. 2023, arXiv 2305.18290, Fig. 2 and App. C.1).

For responses y sampled from π (temperature 1, no top-k / top-p cut) the per-sample log-ratio
``log π(y|x) - log π_ref(y|x)`` is an unbiased estimate of ``KL(π(·|x) ‖ π_ref(·|x))``; averaged over
held-out prompts it estimates the expected KL, and its standard error is ``std / sqrt(n)``.
``log π(y|x)`` is the sum of the response tokens' log-probabilities given the prompt, EOS included when
it was generated (paper Eq. 7); a response cut at ``max_new_tokens`` is scored as cut, so the estimate
is the KL between the two distributions over responses truncated at that length.

Best-of-N has no policy to score; its KL from the sampling model is ``log N - (N - 1) / N``
(`best_of_n_kl`), exact when the N rewards never tie and an upper bound otherwise.

>>> round(best_of_n_kl(16), 4)
1.8351
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class KLEstimate:
    """Mean of the per-sample log-ratios, its standard error, the sample count and the log-ratios."""

    mean: float
    stderr: float
    n: int
    log_ratios: tuple[float, ...] = ()

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.stderr:.3f} (n={self.n})"


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, std / sqrt(n))`` with the sample standard deviation (n - 1); stderr 0 for one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("need at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


@torch.no_grad()
def sequence_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    disable_progress: bool = True,
) -> torch.Tensor:
    """``log p(response_i | prompt_i)`` under ``model`` for each i: shape (n,), float64.

    Plain forwards of ``prompt + response`` rows, right-padded ``batch_size`` at a time; the response
    tokens' log-softmax values (float32) are gathered and summed in float64. An empty response scores 0.
    The model's train/eval mode is restored afterwards.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {index} has no tokens: the first response token has nothing to follow")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(prompt_ids), dtype=torch.float64)
    try:
        starts = range(0, len(prompt_ids), batch_size)
        for start in tqdm(starts, desc="log-probs", disable=disable_progress):
            rows = range(start, min(start + batch_size, len(prompt_ids)))
            sequences = [list(prompt_ids[i]) + list(response_ids[i]) for i in rows]
            width = max(map(len, sequences))
            input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
            for row, ids in enumerate(sequences):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (rows, T-1, V): predicts token t+1
            targets = input_ids[:, 1:].to(device)
            token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
            for row, i in enumerate(rows):
                first = len(prompt_ids[i]) - 1  # position whose output predicts the first response token
                totals[i] = token_logps[row, first : first + len(response_ids[i])].sum()
    finally:
        model.train(was_training)
    return totals


def sequence_kl(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    disable_progress: bool = True,
) -> KLEstimate:
    """KL(π‖π_ref) estimated from responses sampled from ``policy``: the mean of
    ``log π(y|x) - log π_ref(y|x)`` over the samples, with its standard error.

    ``response_ids[i]`` must be a sample from ``policy`` given ``prompt_ids[i]`` at temperature 1, as
    generated (`sample_responses(..., return_token_ids=True)`), for the mean to estimate the KL.
    """
    if not response_ids:
        raise ValueError("need at least one sampled response")
    kwargs = dict(batch_size=batch_size, pad_token_id=pad_token_id, disable_progress=disable_progress)
    ratios = sequence_logprobs(policy, prompt_ids, response_ids, **kwargs) - sequence_logprobs(
        reference, prompt_ids, response_ids, **kwargs
    )
    mean, stderr = mean_and_stderr(ratios.tolist())
    return KLEstimate(mean=mean, stderr=stderr, n=len(response_ids), log_ratios=tuple(ratios.tolist()))


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN‖π) = log N - (N - 1) / N for Best-of-N over π's samples (Stiennon et al. 2020, arXiv 2009.01325;
    an upper bound when rewards can tie, Beirami et al. 2024, arXiv 2401.01879)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
