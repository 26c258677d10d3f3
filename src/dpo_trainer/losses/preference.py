"""The entry point :func:`preference_loss`: the selected registered losses, weighted and summed, and the rewards."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .deprecation import DEPRECATED_F_DIVERGENCES, _current_name
from .fdivergence import F_DIVERGENCES, f_divergence_scores
from .registry import LOSSES, _check_beta, check_loss_settings


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
