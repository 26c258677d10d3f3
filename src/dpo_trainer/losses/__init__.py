"""Preference losses on per-sequence log-probabilities (DPO, Rafailov et al. 2023, arXiv 2305.18290).

Every loss here is a pure function. Inputs are per-sequence *summed* log-probabilities, shape
``(batch,)``; no model, tokenizer or reduction over the batch happens in this module (``aot``,
``aot_unpaired`` and ``sft`` couple the examples of one batch, as their definitions do).

Legend:

* ``pi_w, pi_l``: log pi_theta(y_w | x), log pi_theta(y_l | x), policy log-probs of the chosen
  (w) and rejected (l) responses; ``ref_w, ref_l``: the same under the frozen reference pi_ref.
* ``lr_w = pi_w - ref_w``, ``lr_l = pi_l - ref_l``: log-ratios; ``n_w, n_l``: response token counts.
* ``s_w, s_l``: scores f'(pi / pi_ref) of the f-divergence regulariser (f-DPO, Wang et al. 2023,
  arXiv 2309.16240); under the default reverse KL ``s = lr``.
* ``h = s_w - s_l``: difference of scores (with reverse KL the IPO paper's h_pi).
* ``beta``: strength of the KL penalty toward pi_ref; ``eps``: label-smoothing / flip rate.

Pairwise variants live in the registry ``LOSSES`` and are selected by name (or a weighted list of
names) in :func:`preference_loss`; add your own with :func:`register_loss`. A loss is called as
``fn(h, *, beta, ...)`` and receives, by keyword, those of :data:`LOSS_INPUTS` that its signature names.

A name TRL 1.16 defines computes TRL's numbers. Where the paper that defines a method writes another
form, the paper's form has a name of its own: ``cdpo`` beside ``sigmoid``, otherwise ``<name>_paper``:

======================== ======================================== ========================================
TRL's name               TRL 1.16's form (under TRL's name)       the paper's form, under its own name
======================== ======================================== ========================================
``sigmoid`` (loss_type)  ``-logsigmoid(beta h)``: DPO Eq. 7       ``cdpo``: ``-(1 - eps) logsigmoid(beta h)
                         (Rafailov et al. 2023); TRL ignores      - eps logsigmoid(-beta h)``, conservative
                         ``label_smoothing`` here                 DPO (Mitchell 2023, "A note on DPO with
                                                                  noisy preferences"); eps = 0 is sigmoid
``ipo`` (loss_type)      ``(s_w/n_w - s_l/n_l - 1/(2 beta))^2``:  ``(s_w - s_l - 1/(2 beta))^2`` on summed
                         IPO Eq. 17 on per-token means, n         log-probs: IPO Eq. 17 (Azar et al. 2023,
                         clamped to >= 1                          arXiv 2310.12036), tau = beta
``bco_pair`` (loss_type) ``-logsigmoid(r_w) - logsigmoid(-r_l)``  ``-logsigmoid(r_w - delta)
                         with ``r = beta lr``: no reward shift    - logsigmoid(-(r_l - delta))``, delta the
                                                                  running mean reward: BCO (Jung et al.
                                                                  2024, arXiv 2404.04656, Sec. 3)
``alpha_divergence``     ``f'(u) = (u^(alpha-1) - 1)/(alpha-1)``  ``f'(u) = (1 - u^-alpha)/alpha``: f-DPO
(f_divergence_type)      (TRL's code; its docs say u^-alpha)      (Wang et al. 2023, arXiv 2309.16240,
                                                                  Table 1)
======================== ======================================== ========================================

``sigmoid`` takes no ``label_smoothing``: with eps > 0 and no other selected loss that uses it,
:func:`check_loss_settings` raises and names ``cdpo`` (TRL 1.16 would train ignoring eps; this library's
``sigmoid`` computed cDPO before). ``aot`` and ``aot_unpaired`` use the cDPO-smoothed logistic loss, as TRL
does.

The two alpha forms are one family: TRL's at ``alpha`` is the paper's at ``1 - alpha`` (equal at the default
0.5). ``ipo_trl``, ``bco_pair_trl`` and ``alpha_divergence_trl``, the previous release's names of TRL's forms,
are deprecated aliases (:data:`DEPRECATED_LOSS_NAMES`, :data:`DEPRECATED_F_DIVERGENCES`): they warn
(``FutureWarning``) and are read as TRL's names.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DEPRECATED_F_DIVERGENCES",
    "DEPRECATED_LOSS_NAMES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSSES",
    "LOSSES",
    "LOSS_INPUTS",
    "RunningMean",
    "check_loss_settings",
    "f_divergence_scores",
    "ld_token_weights",
    "loss_names",
    "loss_uses",
    "needs_reward_shift",
    "plackett_luce_loss",
    "wpo_weights",
    "preference_loss",
    "register_loss",
]

LossFn = Callable[..., torch.Tensor]

#: Registry of pairwise losses: name -> ``fn(h: Tensor (batch,), *, beta, ...) -> Tensor (batch,)``.
LOSSES: dict[str, LossFn] = {}
#: Losses built on the score difference ``h`` alone, which accept a non-default ``f_divergence_type``.
F_DIVERGENCE_LOSSES: set[str] = set()
#: Keyword inputs a loss may name in its signature, each a tensor of shape ``(batch,)`` unless noted.
LOSS_INPUTS = (
    "beta",  # float
    "label_smoothing",  # float eps
    "chosen_logratios",  # lr_w
    "rejected_logratios",  # lr_l
    "chosen_scores",  # s_w
    "rejected_scores",  # s_l
    "policy_chosen_logps",
    "policy_rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_lengths",  # n_w, response token counts (None when the caller has none)
    "rejected_lengths",  # n_l
    "discopop_tau",  # float
    "reward_shift",  # float or 0-dim tensor, BCO's delta (a loss that names it has the trainer keep delta)
)
#: f-divergence regularisers (f-DPO): see :func:`f_divergence_scores`.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence", "alpha_divergence_paper")
#: Deprecated loss names (kept for one release): old name -> the name that computes the same numbers.
DEPRECATED_LOSS_NAMES = {"ipo_trl": "ipo", "bco_pair_trl": "bco_pair"}
#: Deprecated f-divergence names (kept for one release): old name -> the name that computes the same numbers.
DEPRECATED_F_DIVERGENCES = {"alpha_divergence_trl": "alpha_divergence"}


def register_loss(
    name: str, *, overwrite: bool = False, f_divergence: bool = False
) -> Callable[[LossFn], LossFn]:
    """Decorator adding a pairwise loss to :data:`LOSSES` under ``name``.

    The function receives ``h`` (shape ``(batch,)``, the difference of scores) and, by keyword, the
    inputs of :data:`LOSS_INPUTS` that its signature names (e.g. ``beta``, ``label_smoothing``,
    ``chosen_lengths``); it returns per-example losses of shape ``(batch,)``. ``f_divergence=True``
    declares that the loss depends on the scores only, so that it may be used with a non-default
    ``f_divergence_type``. A loss whose signature names ``reward_shift`` is given BCO's running delta by the
    trainer (:func:`needs_reward_shift`). Raises ``ValueError`` if ``name`` is taken, unless ``overwrite=True``.

    >>> @register_loss("doc_squared")
    ... def doc_squared(h, *, beta, label_smoothing):
    ...     return (beta * h) ** 2
    >>> "doc_squared" in loss_names()
    True
    >>> _ = LOSSES.pop("doc_squared")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"loss name must be a non-empty string, got {name!r}")
    if name in LOSSES and not overwrite:
        raise ValueError(f"loss {name!r} is already registered; pass overwrite=True to replace it")

    def decorator(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        if f_divergence:
            F_DIVERGENCE_LOSSES.add(name)
        else:
            F_DIVERGENCE_LOSSES.discard(name)
        return fn

    return decorator


def loss_names() -> tuple[str, ...]:
    """Sorted names of the registered pairwise losses.

    >>> loss_names()  # doctest: +NORMALIZE_WHITESPACE
    ('aot', 'aot_unpaired', 'apo_down', 'apo_zero', 'bco_pair', 'bco_pair_paper', 'cdpo', 'discopop',
     'exo_pair', 'hinge', 'ipo', 'ipo_paper', 'nca_pair', 'robust', 'sft', 'sigmoid', 'sigmoid_norm',
     'sppo_hard')
    """
    return tuple(sorted(LOSSES))


def loss_uses(name: str, input_name: str) -> bool:
    """Whether the registered loss ``name`` takes the keyword ``input_name`` (see :data:`LOSS_INPUTS`)."""
    parameters = inspect.signature(LOSSES[name]).parameters
    return input_name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def needs_reward_shift(loss_type: str | Sequence[str]) -> bool:
    """Whether a selected loss names ``reward_shift`` in its signature, so its caller must keep BCO's delta.

    Of the built-ins only ``bco_pair_paper`` does (TRL's ``bco_pair`` has no shift). Deprecated names are
    read as their new names, without a warning (validation warns).

    >>> needs_reward_shift(["sigmoid", "bco_pair"]), needs_reward_shift(["sigmoid", "bco_pair_paper"])
    (False, True)
    """
    names = [_current_name(name, DEPRECATED_LOSS_NAMES, LOSSES) for name in _as_list(loss_type)]
    return any(
        name in LOSSES and "reward_shift" in inspect.signature(LOSSES[name]).parameters for name in names
    )


def _current_name(name: str, deprecated: dict[str, str], registered) -> str:
    """``name``, or its replacement when it is a deprecated alias (and nothing registered took it)."""
    return deprecated[name] if name in deprecated and name not in registered else name


def _warn_deprecated(kind: str, old: str, new: str) -> None:
    warnings.warn(
        f"{kind}={old!r} is deprecated and will be removed in the next release: use {kind}={new!r}, which "
        f"now computes the same numbers (TRL 1.16's form); the paper's form is {new + '_paper'!r}.",
        FutureWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package and its dataclass's generated ``__init__``
    (file ``<string>``), so that a warning names the user's line. Counted from the function calling ``warn``."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # level 1: the function calling `warnings.warn`
    while frame is not None and (
        frame.f_code.co_filename.startswith(package) or frame.f_code.co_filename == "<string>"
    ):
        frame, level = frame.f_back, level + 1
    return level


# ---------------------------------------------------------------- losses on h (any f-divergence)


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


# ---------------------------------------------------------------- losses on the log-ratios (reverse KL only)


@register_loss("nca_pair")
def nca_pair_loss(
    h: torch.Tensor, *, beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> torch.Tensor:
    """Noise Contrastive Alignment for a pair: ``-logsigmoid(r_w) - (logsigmoid(-r_w) + logsigmoid(-r_l)) / 2``.

    With the implicit rewards ``r = beta * lr``. Unlike DPO it pushes r_w up in absolute terms.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    # Chen et al. 2024 (arXiv 2402.05369), the NCA loss for K = 2 responses with binary preference.
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_loss("bco_pair")
def bco_pair_loss(
    h: torch.Tensor, *, beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> torch.Tensor:
    """BCO as TRL 1.16 computes it: chosen classified as 1, rejected as 0, with no reward shift.

    ``-logsigmoid(r_w) - logsigmoid(-r_l)`` with ``r = beta * lr``: the BCO loss with delta fixed at 0.
    The paper's running reward shift is ``bco_pair_paper``.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    # Jung et al. 2024 (arXiv 2404.04656), Sec. 3: the BCO loss, reward shift delta = 0.
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


@register_loss("bco_pair_paper")
def bco_pair_paper_loss(
    h: torch.Tensor,
    *,
    beta: float,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    reward_shift: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """BCO as its paper writes it: chosen classified as 1, rejected as 0, around a reward shift delta.

    ``-logsigmoid(r_w - delta) - logsigmoid(-(r_l - delta))`` with ``r = beta * lr``. In the paper delta is
    a running mean of the rewards; it is state, so the caller keeps it and passes it as ``reward_shift``
    (the trainer keeps a :class:`RunningMean` of each training batch's mean reward, over chosen and rejected
    and across processes, because this loss names ``reward_shift``: :func:`needs_reward_shift`). At
    ``delta = 0`` this is TRL's ``bco_pair``.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.
        reward_shift: delta, a float or 0-dim tensor (no gradient flows through it).

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    delta = reward_shift.detach() if isinstance(reward_shift, torch.Tensor) else reward_shift
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    # Jung et al. 2024 (arXiv 2404.04656), Sec. 3: the BCO loss with reward shift delta.
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


@register_loss("sppo_hard")
def sppo_hard_loss(
    h: torch.Tensor, *, beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> torch.Tensor:
    """SPPO with hard preference probabilities: ``(lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2``.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    # Wu et al. 2024 (arXiv 2405.00675) Eq. 4.7 (Algorithm 1) with eta = 1/beta, P = 1 for y_w and 0 for y_l.
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


@register_loss("apo_zero")
def apo_zero_loss(
    h: torch.Tensor, *, beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> torch.Tensor:
    """APO-zero: raise the chosen likelihood and lower the rejected, each against the reference.

    ``(1 - sigmoid(beta lr_w)) + sigmoid(beta lr_l)``; for chosen responses better than the model's own.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.

    Returns:
        per-example losses in ``[0, 2]``, shape ``(batch,)``.
    """
    # D'Oosterlinck et al. 2024 (arXiv 2408.06266) Eq. 7.
    return torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


@register_loss("apo_down")
def apo_down_loss(
    h: torch.Tensor, *, beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> torch.Tensor:
    """APO-down: lower the chosen likelihood, and the rejected one more.

    ``sigmoid(beta lr_w) + (1 - sigmoid(beta (lr_w - lr_l)))``; for chosen responses worse than the model's.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.

    Returns:
        per-example losses in ``[0, 2]``, shape ``(batch,)``.
    """
    # D'Oosterlinck et al. 2024 (arXiv 2408.06266) Eq. 8.
    return torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(
        -beta * (chosen_logratios - rejected_logratios)
    )


@register_loss("aot")
def aot_loss(
    h: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """AOT (paired): the policy's margins ``pi_w - pi_l`` should dominate the reference's, quantile by quantile.

    Both margin vectors are sorted over the batch and compared in order with the (cDPO-smoothed) logistic
    loss: a one-dimensional optimal-transport surrogate of first-order stochastic dominance. The i-th
    output belongs to the i-th quantile, not to example i; only the batch mean is meaningful.

    Args:
        h: unused, shape ``(batch,)``.
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape ``(batch,)``.

    Returns:
        per-quantile losses, shape ``(batch,)``.
    """
    margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)
    ref_margins, _ = torch.sort(ref_chosen_logps - ref_rejected_logps)
    # Melnyk et al. 2024 (arXiv 2406.05882), AOT paired: sorted (quantile) matching, logistic loss.
    return _logistic(margins - ref_margins, beta, label_smoothing)


@register_loss("aot_unpaired")
def aot_unpaired_loss(
    h: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
) -> torch.Tensor:
    """AOT (unpaired): the chosen log-ratios should dominate the rejected ones, quantile by quantile.

    ``lr_w`` and ``lr_l`` are sorted over the batch separately and compared in order with the
    (cDPO-smoothed) logistic loss. Output i belongs to quantile i, not example i.

    Args:
        h: unused, shape ``(batch,)``.
        chosen_logratios, rejected_logratios: lr_w, lr_l, shape ``(batch,)``.

    Returns:
        per-quantile losses, shape ``(batch,)``.
    """
    chosen_sorted, _ = torch.sort(chosen_logratios)
    rejected_sorted, _ = torch.sort(rejected_logratios)
    # Melnyk et al. 2024 (arXiv 2406.05882), AOT unpaired: sorted (quantile) matching, logistic loss.
    return _logistic(chosen_sorted - rejected_sorted, beta, label_smoothing)


def _per_token(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return scores / lengths.clamp_min(1).to(scores.dtype)


# ---------------------------------------------------------------- f-divergences


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


# ---------------------------------------------------------------- the entry point


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")


def _as_list(loss_type: str | Sequence[str]) -> list[str]:
    if isinstance(loss_type, str):
        return [loss_type]
    if not isinstance(loss_type, Sequence) or not loss_type or not all(isinstance(n, str) for n in loss_type):
        raise ValueError(f"loss_type must be a name or a non-empty list of names, got {loss_type!r}")
    return list(loss_type)


def check_loss_settings(
    loss_type: str | Sequence[str],
    *,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    owner: str = "",
) -> list[str]:
    """Validate a loss selection (names, weights, label smoothing, f-divergence); returns the list of names.

    Shared by :func:`preference_loss` and `DPOConfig` (``owner="DPOConfig."`` prefixes the field names in
    the messages), so that a bad setting fails when the config is built. Deprecated names
    (:data:`DEPRECATED_LOSS_NAMES`, :data:`DEPRECATED_F_DIVERGENCES`) warn with a ``FutureWarning``; the
    returned list holds the current names.
    """
    names = []
    for name in _as_list(loss_type):
        current = _current_name(name, DEPRECATED_LOSS_NAMES, LOSSES)
        if current != name:
            _warn_deprecated(f"{owner}loss_type", name, current)
        names.append(current)
    unknown = [name for name in names if name not in LOSSES]
    if unknown:
        raise ValueError(f"unknown {owner}loss_type {unknown[0]!r}; valid names: {', '.join(loss_names())}")
    if loss_weights is not None:
        if len(loss_weights) != len(names):
            raise ValueError(
                f"{owner}loss_weights must have one weight per loss type: {len(loss_weights)} weights for "
                f"{len(names)} loss types {names}"
            )
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in loss_weights):
            raise ValueError(f"{owner}loss_weights must be finite numbers, got {list(loss_weights)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{owner}label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0 and not any(loss_uses(name, "label_smoothing") for name in names):
        users = [name for name in loss_names() if loss_uses(name, "label_smoothing")]
        message = (
            f"{owner}label_smoothing={label_smoothing} is not used by loss_type {names}; the losses that use "
            f"it: {', '.join(users)}"
        )
        if "sigmoid" in names:  # a deliberate difference: TRL trains on, ignoring eps
            message += (
                ". TRL 1.16's sigmoid ignores label_smoothing too (it would train as if it were 0); conservative "
                "DPO (cDPO, Mitchell 2023), which sigmoid with label_smoothing computed in earlier releases of "
                f"dpo_trainer, is {owner}loss_type='cdpo'"
            )
        raise ValueError(message)
    if "exo_pair" in names and label_smoothing == 0:
        raise ValueError(f"loss_type 'exo_pair' needs {owner}label_smoothing > 0; the EXO paper uses 1e-3")
    f_divergence_type = _checked_f_divergence(f_divergence_type, owner)
    if f_divergence_type != "reverse_kl":
        unsupported = [name for name in names if name not in F_DIVERGENCE_LOSSES]
        if unsupported:
            raise ValueError(
                f"{owner}f_divergence_type={f_divergence_type!r} applies to the losses built on the "
                f"chosen-rejected score difference ({', '.join(sorted(F_DIVERGENCE_LOSSES))}), not "
                f"{unsupported}; use f_divergence_type='reverse_kl' with these"
            )
    return names


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reward_shift: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example pairwise preference loss and implicit rewards.

    Args:
        policy_chosen_logps: summed log pi_theta(y_w | x), shape ``(batch,)``.
        policy_rejected_logps: summed log pi_theta(y_l | x), shape ``(batch,)``.
        ref_chosen_logps: summed log pi_ref(y_w | x), shape ``(batch,)``.
        ref_rejected_logps: summed log pi_ref(y_l | x), shape ``(batch,)``.
        beta: KL-penalty strength, > 0.
        loss_type: a name in :func:`loss_names`, or a list of names whose losses are summed with
            ``loss_weights`` (MPO, Wang et al. 2024, arXiv 2411.10442: e.g. sigmoid, bco_pair, sft).
        label_smoothing: assumed label-flip rate eps in ``[0, 0.5)``; used by cdpo (conservative DPO),
            robust, exo_pair, aot and aot_unpaired, not by sigmoid (as in TRL). An error if no selected loss
            uses it.
        loss_weights: one weight per loss type (None: all 1).
        chosen_lengths, rejected_lengths: response token counts, shape ``(batch,)``; needed by the
            per-token losses (sigmoid_norm, ipo, sft).
        f_divergence_type, f_alpha_divergence_coef: the f-DPO regulariser (:func:`f_divergence_scores`).
        discopop_tau: DiscoPOP's temperature.
        reward_shift: BCO's delta for ``bco_pair_paper`` (state kept by the caller, e.g. :class:`RunningMean`;
            :func:`needs_reward_shift` says whether a selection reads it).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each shape ``(batch,)``. The rewards
        ``beta * (policy - ref)`` are detached (Rafailov et al. 2023, Sec. 5, implicit reward).

    >>> losses, chosen, rejected = preference_loss(
    ...     torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-2.0])
    ... )
    >>> losses  # h = 0 gives ln 2
    tensor([0.6931])
    >>> preference_loss(
    ...     torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.5
    ... )
    (tensor([0.3133]), tensor([1.]), tensor([0.]))
    """
    _check_beta(beta)
    names = check_loss_settings(
        loss_type,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
    )
    f_divergence_type = _current_name(
        f_divergence_type, DEPRECATED_F_DIVERGENCES, F_DIVERGENCES
    )  # warned above
    logps = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    shapes = {name: tuple(t.shape) for name, t in logps.items()}
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"all four log-prob tensors must have the same shape (batch,), got {shapes}")
    for name, t in logps.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is not None and tuple(lengths.shape) != shapes["policy_chosen_logps"]:
            raise ValueError(
                f"{name} must have the log-probs' shape {shapes['policy_chosen_logps']}, got {tuple(lengths.shape)}"
            )

    # Log-ratios are subtracted first: they are small, the raw log-probs are not.
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    h = chosen_scores - rejected_scores
    inputs = {
        **logps,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "chosen_logratios": chosen_logratios,
        "rejected_logratios": rejected_logratios,
        "chosen_scores": chosen_scores,
        "rejected_scores": rejected_scores,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "discopop_tau": discopop_tau,
        "reward_shift": reward_shift,
    }
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    losses = None
    for name, weight in zip(names, weights):
        part = _call_loss(name, h, inputs)
        losses = weight * part if losses is None else losses + weight * part
    chosen_rewards = beta * chosen_logratios.detach()  # implicit reward r = beta log(pi / pi_ref), Eq. 5
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def _call_loss(name: str, h: torch.Tensor, inputs: dict) -> torch.Tensor:
    fn = LOSSES[name]
    parameters = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    kwargs = {}
    for key, value in inputs.items():
        if key in parameters or takes_all:
            if value is None:
                if key in parameters and parameters[key].default is inspect.Parameter.empty:
                    raise ValueError(
                        f"loss_type {name!r} needs {key} (per-response token counts); pass chosen_lengths and "
                        "rejected_lengths"
                    )
                continue
            kwargs[key] = value
    losses = fn(h, **kwargs)
    if losses.shape != h.shape:
        raise ValueError(f"loss {name!r} returned shape {tuple(losses.shape)}, expected {tuple(h.shape)}")
    return losses


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


class RunningMean:
    """Running mean of scalars, the caller-held state behind BCO's reward shift delta (``bco_pair_paper``).

    ``update(x)`` adds one value (e.g. a training batch's mean reward over chosen and rejected responses,
    already averaged over processes) and returns the new mean, which includes it. The state is not part
    of a checkpoint: a resumed run starts the mean afresh.

    >>> shift = RunningMean()
    >>> shift.update(1.0), shift.update(3.0), shift.mean
    (1.0, 2.0, 2.0)
    """

    def __init__(self) -> None:
        self.mean, self.count = 0.0, 0

    def update(self, value: float) -> float:
        self.count += 1
        self.mean += (float(value) - self.mean) / self.count
        return self.mean


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
