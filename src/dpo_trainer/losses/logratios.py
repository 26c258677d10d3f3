"""The pairwise losses on the two log-ratios ``lr_w, lr_l`` (reverse KL only), and BCO's reward-shift state.

``nca_pair``, ``bco_pair``, ``bco_pair_paper``, ``sppo_hard``, ``apo_zero``, ``apo_down``, ``aot`` and
``aot_unpaired``: each reads the log-ratios (or, ``aot``, the log-probs) rather than ``h``, so it is registered
without ``f_divergence`` and refuses any f-divergence but reverse KL. :class:`RunningMean` is the caller-held
delta of ``bco_pair_paper``. The symbols are the package's legend (:mod:`dpo_trainer.losses`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pairwise import _logistic
from .registry import register_loss


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
