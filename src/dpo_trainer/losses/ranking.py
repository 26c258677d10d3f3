"""Plackett-Luce DPO: the loss of a full ranking of K responses (Rafailov et al. 2023, arXiv 2305.18290)."""

from __future__ import annotations

import torch

from .registry import _check_beta


def plackett_luce_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1
) -> torch.Tensor:
    """Negative log-likelihood of a full ranking of K responses under Plackett-Luce, DPO-reparametrised.

    With ``r_k = beta * (policy_logps[:, k] - ref_logps[:, k])``:
    ``loss = -sum_{k=0}^{K-2} (r_k - logsumexp(r_k, ..., r_{K-1}))``. For K = 2 this is the
    sigmoid (DPO) loss.

    Args:
        policy_logps: summed log pi_theta(y_k | x), shape ``(batch, K)``, K >= 2; column 0 is the
            most preferred response, column K-1 the least.
        ref_logps: summed log pi_ref(y_k | x), shape ``(batch, K)``.
        beta: KL-penalty strength, > 0.

    Returns:
        per-example losses, shape ``(batch,)``.

    >>> import math
    >>> losses = plackett_luce_loss(
    ...     torch.tensor([[math.log(3.0), math.log(2.0), 0.0]]), torch.zeros(1, 3), beta=1.0
    ... )
    >>> losses  # P(ranking) = 3/6 * 2/3 = 1/3, so the loss is ln 3
    tensor([1.0986])
    """
    _check_beta(beta)
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape:
        raise ValueError(
            "policy_logps and ref_logps must both have shape (batch, K), got "
            f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        )
    if policy_logps.shape[1] < 2:
        raise ValueError(f"a ranking needs K >= 2 responses, got K = {policy_logps.shape[1]}")

    rewards = beta * (policy_logps - ref_logps)  # (batch, K), implicit rewards, Eq. 5
    # tail_lse[:, k] = logsumexp(r_k, ..., r_{K-1}): a reverse cumulative logsumexp, no loop over K.
    tail_lse = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)
    # Rafailov et al. 2023 (arXiv 2305.18290) App. A.3, Plackett-Luce DPO objective; term K-1 is 0.
    return -(rewards[:, :-1] - tail_lse[:, :-1]).sum(-1)
