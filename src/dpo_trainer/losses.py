"""Preference losses on per-sequence log-probabilities (DPO, Rafailov et al. 2023, arXiv 2305.18290).

Every loss here is a pure function. Inputs are per-sequence *summed* log-probabilities, shape
``(batch,)``; no model, tokenizer or reduction over the batch happens in this module.

Legend:

* ``pi_w, pi_l``: log pi_theta(y_w | x), log pi_theta(y_l | x), policy log-probs of the chosen
  (w) and rejected (l) responses.
* ``ref_w, ref_l``: the same under the frozen reference model pi_ref.
* ``h = (pi_w - ref_w) - (pi_l - ref_l)``: difference of log-ratios (the IPO paper's h_pi).
* ``beta``: strength of the KL penalty toward pi_ref; ``eps``: label-smoothing / flip rate.

Pairwise variants live in the registry ``LOSSES`` (name -> ``fn(h, *, beta, label_smoothing)``)
and are selected by name in :func:`preference_loss`; add your own with :func:`register_loss`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "loss_names", "plackett_luce_loss", "preference_loss", "register_loss"]

LossFn = Callable[..., torch.Tensor]

#: Registry of pairwise losses: name -> ``fn(h: Tensor (batch,), *, beta, label_smoothing) -> Tensor (batch,)``.
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str, *, overwrite: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator adding a pairwise loss to :data:`LOSSES` under ``name``.

    The function receives ``h`` (shape ``(batch,)``, the difference of log-ratios) and the
    keywords ``beta`` and ``label_smoothing``; it returns per-example losses of shape ``(batch,)``.
    Raises ``ValueError`` if ``name`` is taken, unless ``overwrite=True``.

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
        return fn

    return decorator


def loss_names() -> tuple[str, ...]:
    """Sorted names of the registered pairwise losses.

    >>> loss_names()
    ('hinge', 'ipo', 'robust', 'sigmoid')
    """
    return tuple(sorted(LOSSES))


def _reject_label_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0:
        raise ValueError(
            f"loss_type {name!r} does not use label_smoothing (got {label_smoothing}); "
            "label_smoothing applies to sigmoid and robust"
        )


@register_loss("sigmoid")
def sigmoid_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO loss; with ``label_smoothing = eps > 0``, conservative DPO.

    Args:
        h: difference of log-ratios, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    eps = label_smoothing
    # Rafailov et al. 2023 (arXiv 2305.18290) Eq. 7; eps > 0: cDPO (Mitchell 2023, "A note on DPO with noisy preferences").
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register_loss("ipo")
def ipo_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO loss: regress ``h`` onto ``1 / (2 beta)``. ``h`` is used as given (no length normalisation).

    Args:
        h: difference of log-ratios, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    _reject_label_smoothing("ipo", label_smoothing)
    return (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023 (arXiv 2310.12036) Eq. 17, tau = beta.


@register_loss("hinge")
def hinge_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC hinge loss on the scaled difference of log-ratios.

    Args:
        h: difference of log-ratios, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    _reject_label_smoothing("hinge", label_smoothing)
    return F.relu(1 - beta * h)  # SLiC calibration loss, Zhao et al. 2023 (arXiv 2305.10425), margin 1.


@register_loss("robust")
def robust_loss(h: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO: unbiased estimate of the clean DPO loss when labels flip with rate ``eps``.

    Averaging over flips (``h -> -h`` with probability eps) gives back ``-logsigmoid(beta h)``.
    Individual values may be negative.

    Args:
        h: difference of log-ratios, shape ``(batch,)``.

    Returns:
        per-example losses, shape ``(batch,)``.
    """
    eps = label_smoothing
    # Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409), the rDPO loss.
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example pairwise preference loss and implicit rewards.

    Args:
        policy_chosen_logps: summed log pi_theta(y_w | x), shape ``(batch,)``.
        policy_rejected_logps: summed log pi_theta(y_l | x), shape ``(batch,)``.
        ref_chosen_logps: summed log pi_ref(y_w | x), shape ``(batch,)``.
        ref_rejected_logps: summed log pi_ref(y_l | x), shape ``(batch,)``.
        beta: KL-penalty strength, > 0.
        loss_type: a name in :func:`loss_names`.
        label_smoothing: assumed label-flip rate eps in ``[0, 0.5)``; used by sigmoid (cDPO) and robust.

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
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid names: {', '.join(loss_names())}")
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

    # Log-ratios are subtracted first: they are small, the raw log-probs are not.
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    losses = LOSSES[loss_type](h, beta=beta, label_smoothing=label_smoothing)
    if losses.shape != h.shape:
        raise ValueError(
            f"loss {loss_type!r} returned shape {tuple(losses.shape)}, expected {tuple(h.shape)}"
        )
    chosen_rewards = beta * chosen_logratios.detach()  # implicit reward r = beta log(pi / pi_ref), Eq. 5
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


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
