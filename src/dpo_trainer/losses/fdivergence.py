"""f-DPO's divergence regularisers: the names in :data:`F_DIVERGENCES` and their scores f'(u).

:func:`f_divergence_scores` turns log-ratios into the scores ``s_w, s_l`` whose difference ``h`` the pairwise
losses take (Wang et al. 2023, arXiv 2309.16240); under the default ``reverse_kl`` a score is the log-ratio.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .deprecation import DEPRECATED_F_DIVERGENCES, _current_name, _warn_deprecated

#: f-divergence regularisers (f-DPO): see :func:`f_divergence_scores`.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence", "alpha_divergence_paper")


def _expm1_capped(x: torch.Tensor) -> torch.Tensor:
    """``exp(x) - 1`` with x capped where the result would overflow its dtype (TRL's caps: 11 / 80)."""
    cap = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(x.dtype)
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if cap is not None:
        work = work.clamp(max=cap)
    return torch.expm1(work).to(x.dtype)


def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> torch.Tensor:
    """Scores ``f'(u)`` at ``u = pi / pi_ref``, the terms whose difference f-DPO feeds to its losses.

    f-DPO (Wang et al. 2023, arXiv 2309.16240, Table 1 and Thm. 1) replaces ``log u`` in DPO's
    ``beta (log u_w - log u_l)`` by ``f'(u)`` of the divergence regulariser. Each ``f'`` here is shifted by
    a constant so that ``f'(1) = 0`` (as in TRL; a constant cancels in ``h`` but not in the per-token
    means of ``sigmoid_norm`` / ``ipo``):

    * ``reverse_kl``: ``log u`` (DPO);
    * ``forward_kl``: ``1 - 1/u``;
    * ``js_divergence``: ``log(2u / (1 + u)) = log 2 + logsigmoid(log u)``;
    * ``alpha_divergence``: TRL 1.16's code, ``(u^(alpha-1) - 1) / (alpha - 1)`` (reverse KL at alpha = 1),
      which is the paper's form at ``1 - alpha`` (equal at TRL's default 0.5; TRL's docs say ``u^-alpha``);
    * ``alpha_divergence_paper``: the paper's ``(1 - u^-alpha) / alpha`` (Table 1, alpha in (0, 1); alpha -> 0
      gives reverse KL, alpha = 1 forward KL).

    Exponents are capped at 80 (11 in float16) before ``exp``, as TRL does. The deprecated
    ``alpha_divergence_trl`` warns and is read as ``alpha_divergence``.

    Args:
        logratios: ``log u = log pi - log pi_ref``, any shape.
        f_divergence_type: one of :data:`F_DIVERGENCES`.
        alpha: the alpha-divergence coefficient.

    Returns:
        scores, the shape of ``logratios``.

    >>> f_divergence_scores(torch.tensor([math.log(4.0)]), "alpha_divergence", 0.5)  # (4^-0.5 - 1)/(-0.5)
    tensor([1.])
    >>> f_divergence_scores(torch.tensor([math.log(4.0)]), "alpha_divergence_paper", 0.5)  # (1 - 4^-0.5)/0.5
    tensor([1.])
    """
    f_divergence_type = _checked_f_divergence(f_divergence_type)
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    # alpha_divergence and alpha_divergence_paper: (u^a - 1)/a with the exponent a of u
    if not math.isfinite(alpha):
        raise ValueError(f"f_alpha_divergence_coef must be finite, got {alpha}")
    # TRL 1.16's code: a = alpha - 1; f-DPO (Wang et al. 2023, arXiv 2309.16240) Table 1: a = -alpha
    a = alpha - 1.0 if f_divergence_type == "alpha_divergence" else -alpha
    if abs(a) < 1e-6:  # the limit a -> 0 is log u (TRL falls back to reverse KL at alpha = 1 likewise)
        return logratios
    return _expm1_capped(a * logratios) / a


def _checked_f_divergence(f_divergence_type: str, owner: str = "") -> str:
    """The f-divergence name, a deprecated one replaced (with a ``FutureWarning``); unknown names raise."""
    current = _current_name(f_divergence_type, DEPRECATED_F_DIVERGENCES, F_DIVERGENCES)
    if current != f_divergence_type:
        _warn_deprecated(f"{owner}f_divergence_type", f_divergence_type, current)
    if current not in F_DIVERGENCES:
        raise ValueError(
            f"unknown {owner}f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}"
        )
    return current
