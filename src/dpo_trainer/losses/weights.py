"""Weights applied around the loss: WPO's per-pair weights and LD-DPO's per-token weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ld_token_weights(score_seq: torch.Tensor, response_lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights: 1 within the length all responses of an example share, ``alpha`` after it.

    LD-DPO (Liu et al. 2024, arXiv 2409.06411, Sec. 3) splits each response at the length ``l_p`` of the
    shorter response of its pair and uses ``sum_{t <= l_p} log p_t + alpha * sum_{t > l_p} log p_t`` as its
    log-likelihood, for the policy and the reference alike, desensitising DPO to verbosity. With K responses the
    shared length is the shortest of the K. ``alpha = 1`` is DPO; ``alpha = 0`` drops the tails.

    Args:
        score_seq: sequence of each scored token, shape ``(N,)``; sequences are response-major
            (``k * B + b`` is response k of example b) and each one's tokens appear in order.
        response_lengths: scored tokens per response, shape ``(B, K)``.
        alpha: weight of the tokens past the shared length, in ``[0, 1]``.

    Returns:
        float32 weights, shape ``(N,)``.

    >>> ld_token_weights(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([[3, 2]]), 0.5)
    tensor([1.0000, 1.0000, 0.5000, 1.0000, 1.0000])
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
    b, k = response_lengths.shape
    # position of each token within its sequence: a running count per sequence, in the order the tokens appear
    counts = F.one_hot(score_seq, num_classes=b * k).cumsum(0)
    position = counts.gather(1, score_seq[:, None]).squeeze(1) - 1
    shared = response_lengths.min(dim=1).values.repeat(k)  # (K*B,), response-major like score_seq
    tail = position >= shared[score_seq]
    return torch.where(tail, alpha, 1.0).to(torch.float32)


def wpo_weights(aligned_logps: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each pair: the product over its responses of ``exp(mean_t [log p_t - log sum_v p_v^2])``.

    Weighted Preference Optimization (Zhou et al. 2024, arXiv 2406.11827, Eq. 2, the aligned form TRL uses):
    pairs the current policy is likely to generate weigh more, simulating on-policy data. The weights carry no
    gradient.

    Args:
        aligned_logps: each response's mean aligned token log-prob under the policy, shape ``(batch, K)``.

    Returns:
        positive weights, shape ``(batch,)``.

    >>> wpo_weights(torch.tensor([[0.0, -1.0]]))
    tensor([0.3679])
    """
    return torch.exp(aligned_logps.detach().sum(dim=1))
