"""The pairwise losses on the score difference ``h = s_w - s_l``, which accept any f-divergence.

The sigmoid family (``sigmoid``: DPO; ``cdpo``; ``sigmoid_norm``), IPO (``ipo``, ``ipo_paper``), ``hinge``
(SLiC), ``robust``, ``exo_pair``, ``discopop`` and ``sft``, each registered with ``f_divergence=True``. The
symbols are the package's legend (:mod:`dpo_trainer.losses`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import register_loss


def _logistic(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """The logistic loss of ``beta h`` against labels smoothed to ``(1 - eps, eps)``.

    ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``: cDPO's form (``cdpo``), and the comparison of
    ``aot`` / ``aot_unpaired`` (as TRL 1.16 writes them). At eps = 0 it is ``-logsigmoid(beta h)``.
    """
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register_loss("sigmoid", f_divergence=True)
def sigmoid_loss(h: torch.Tensor, *, beta: float) -> torch.Tensor:
    """DPO loss, TRL 1.16's ``sigmoid``: ``-logsigmoid(beta h)``.

    It takes no label smoothing (TRL's ``sigmoid`` ignores ``label_smoothing``; :func:`check_loss_settings`
    refuses eps > 0 when no other selected loss uses it). Conservative DPO is ``cdpo``.

    Args:
        h: difference of scores, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    return -F.logsigmoid(beta * h)  # Rafailov et al. 2023 (arXiv 2305.18290) Eq. 7.


@register_loss("cdpo", f_divergence=True)
def cdpo_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Conservative DPO (cDPO): DPO's logistic loss against labels smoothed to ``(1 - eps, eps)``.

    ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``, with ``eps = label_smoothing`` the assumed
    rate of flipped preference labels, in ``[0, 0.5)``. Unlike DPO's, its minimum sits at a finite margin,
    ``beta h = log((1 - eps) / eps)``. ``eps = 0`` is allowed and computes ``sigmoid``'s numbers, so that a
    sweep over eps may include 0. Earlier releases of this library computed it as ``sigmoid`` with
    ``label_smoothing``.

    Args:
        h: difference of scores, shape ``(batch,)``.
        label_smoothing: eps.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    # Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO": DPO Eq. 7 with smoothed labels.
    return _logistic(h, beta, label_smoothing)


@register_loss("ipo", f_divergence=True)
def ipo_loss(
    h: torch.Tensor,
    *,
    beta: float,
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """IPO as TRL 1.16 computes it, on per-token mean scores: ``(s_w/n_w - s_l/n_l - 1/(2 beta))^2``.

    The IPO paper's Eq. 17 uses sequence log-probs (``ipo_paper``); TRL normalises each score by its
    response's token count (clamped to >= 1), stating that the IPO authors confirmed this form for their
    results. Needs ``chosen_lengths`` and ``rejected_lengths``.

    Args:
        h: unused (the normalised difference is formed here), shape ``(batch,)``.
        chosen_scores, rejected_scores: s_w, s_l, shape ``(batch,)``.
        chosen_lengths, rejected_lengths: response token counts n_w, n_l, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    delta = _per_token(chosen_scores, chosen_lengths) - _per_token(rejected_scores, rejected_lengths)
    # Azar et al. 2023 (arXiv 2310.12036) Eq. 17, tau = beta, on per-token means (TRL 1.16).
    return (delta - 1 / (2 * beta)) ** 2


@register_loss("ipo_paper", f_divergence=True)
def ipo_paper_loss(h: torch.Tensor, *, beta: float) -> torch.Tensor:
    """IPO as its paper writes it: regress ``h = s_w - s_l``, from *summed* log-probs, onto ``1 / (2 beta)``.

    ``(h - 1/(2 beta))^2``; TRL's ``ipo`` divides each score by its token count first.

    Args:
        h: difference of scores, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    return (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023 (arXiv 2310.12036) Eq. 17, tau = beta.


@register_loss("hinge", f_divergence=True)
def hinge_loss(h: torch.Tensor, *, beta: float) -> torch.Tensor:
    """SLiC hinge loss on the scaled difference of scores.

    Args:
        h: difference of scores, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    return F.relu(1 - beta * h)  # SLiC calibration loss, Zhao et al. 2023 (arXiv 2305.10425), margin 1.


@register_loss("robust", f_divergence=True)
def robust_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO: unbiased estimate of the clean DPO loss when labels flip with rate ``eps``.

    Averaging over flips (``h -> -h`` with probability eps) gives back ``-logsigmoid(beta h)``.
    Individual values may be negative.

    Args:
        h: difference of scores, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    eps = label_smoothing
    # Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409), the rDPO loss.
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


@register_loss("exo_pair", f_divergence=True)
def exo_pair_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO-pref for a pair: ``KL(p_theta || p_eps)`` over {chosen, rejected}.

    ``p_theta = (sigmoid(beta h), sigmoid(-beta h))`` and the smoothed labels ``p_eps = (1 - eps, eps)``;
    eps must be > 0 (the paper uses 1e-3).

    Args:
        h: difference of scores, shape ``(batch,)``.

    Returns:
        per-example losses (>= 0), shape ``(batch,)``.
    """
    eps = label_smoothing
    if not 0 < eps < 1:
        raise ValueError(
            f"loss_type 'exo_pair' needs label_smoothing in (0, 1), got {eps}; the EXO paper uses 1e-3"
        )
    log_qw, log_ql = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    # Ji et al. 2024 (arXiv 2402.00856) Eq. 16, EXO-pref with K = 2 and beta_r labels smoothed to (1-eps, eps).
    return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))


@register_loss("discopop", f_divergence=True)
def discopop_loss(h: torch.Tensor, *, beta: float, discopop_tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP's log-ratio modulated loss (LRML): logistic and exponential losses blended by sigmoid(x/tau).

    With ``x = beta h``: ``(1 - sigmoid(x/tau)) * -logsigmoid(x) + sigmoid(x/tau) * exp(-x)``. The
    second product is evaluated as ``exp(logsigmoid(x/tau) - x)``, finite where ``exp(-x)`` overflows.

    Args:
        h: difference of scores, shape ``(batch,)``.
        discopop_tau: temperature tau > 0 (paper: 0.05).

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    x = beta * h
    # Chris Lu et al. 2024 (arXiv 2406.08414) Eq. 5, LRML.
    return torch.sigmoid(-x / discopop_tau) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / discopop_tau) - x)


@register_loss("sigmoid_norm", f_divergence=True)
def sigmoid_norm_loss(
    h: torch.Tensor,
    *,
    beta: float,
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """Length-normalised DPO: ``-logsigmoid(beta (s_w/n_w - s_l/n_l))``, token counts clamped to >= 1.

    Args:
        h: unused (the normalised difference is formed here), shape ``(batch,)``.
        chosen_scores, rejected_scores: s_w, s_l, shape ``(batch,)``.
        chosen_lengths, rejected_lengths: response token counts n_w, n_l, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    delta = _per_token(chosen_scores, chosen_lengths) - _per_token(rejected_scores, rejected_lengths)
    # Length-normalised DPO of Tulu 3 (Lambert et al. 2024, arXiv 2411.15124): DPO Eq. 7 on per-token means.
    return -F.logsigmoid(beta * delta)


@register_loss("sft", f_divergence=True)
def sft_loss(
    h: torch.Tensor, *, policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of the chosen responses, averaged over all their tokens in the batch.

    Each example gets ``-pi_w * batch / sum(n_w)``, so that the batch mean is the token mean
    ``-sum(pi_w) / sum(n_w)``, the language-modelling loss TRL's ``sft`` uses (MPO's generation
    loss, Wang et al. 2024, arXiv 2411.10442). Not a function of h: f-divergence-neutral.

    Args:
        h: unused, shape ``(batch,)``.
        policy_chosen_logps: summed pi_w, shape ``(batch,)``.
        chosen_lengths: response token counts n_w, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    tokens = chosen_lengths.sum().clamp_min(1).to(policy_chosen_logps.dtype)
    return -policy_chosen_logps * (policy_chosen_logps.shape[0] / tokens)


def _per_token(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return scores / lengths.clamp_min(1).to(scores.dtype)
