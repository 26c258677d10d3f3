"""The registry of pairwise losses and the checks of a loss selection.

:data:`LOSSES` maps a name to its loss; :func:`register_loss` adds one (the built-ins register themselves in
:mod:`.pairwise` and :mod:`.logratios` when the package is imported); :data:`LOSS_INPUTS` lists the keywords a
loss may take. :func:`check_loss_settings` validates names, weights, label smoothing and the f-divergence for
:func:`~dpo_trainer.losses.preference_loss` and `DPOConfig` alike.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from .deprecation import DEPRECATED_LOSS_NAMES, _current_name, _warn_deprecated
from .fdivergence import _checked_f_divergence

#: The type of a registered loss (see :func:`register_loss`).
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
    """Whether a selected loss takes ``reward_shift`` (`loss_uses`), so its caller must keep BCO's delta.

    Of the built-ins only ``bco_pair_paper`` does (TRL's ``bco_pair`` has no shift). Deprecated names are
    read as their new names, without a warning (validation warns).

    >>> needs_reward_shift(["sigmoid", "bco_pair"]), needs_reward_shift(["sigmoid", "bco_pair_paper"])
    (False, True)
    """
    names = [_current_name(name, DEPRECATED_LOSS_NAMES, LOSSES) for name in _as_list(loss_type)]
    return any(name in LOSSES and loss_uses(name, "reward_shift") for name in names)


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
