"""Deprecated loss and f-divergence names: the alias maps, their lookup and the ``FutureWarning`` they raise.

``ipo_trl``, ``bco_pair_trl`` and ``alpha_divergence_trl``, the previous release's names of TRL's forms, are kept
for one release and read as the names that now compute the same numbers. A leaf: the registry, the f-divergences
and :func:`~dpo_trainer.losses.preference_loss` read it; it imports nothing of theirs.
"""

from __future__ import annotations

import os
import sys
import warnings

#: Deprecated loss names (kept for one release): old name -> the name that computes the same numbers.
DEPRECATED_LOSS_NAMES = {"ipo_trl": "ipo", "bco_pair_trl": "bco_pair"}
#: Deprecated f-divergence names (kept for one release): old name -> the name that computes the same numbers.
DEPRECATED_F_DIVERGENCES = {"alpha_divergence_trl": "alpha_divergence"}


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
    """The ``stacklevel`` of the first frame outside ``dpo_trainer`` and its dataclass's generated ``__init__``
    (file ``<string>``), so that a warning names the user's line. Counted from the function calling ``warn``."""
    # dpo_trainer's folder, not this subpackage's: `DPOConfig` (config.py) warns through here too
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # level 1: the function calling `warnings.warn`
    while frame is not None and (
        frame.f_code.co_filename.startswith(package) or frame.f_code.co_filename == "<string>"
    ):
        frame, level = frame.f_back, level + 1
    return level
