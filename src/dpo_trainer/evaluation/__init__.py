"""Evaluation: sample responses, judge them against a baseline, and report win rates.

Judges (``judges``) compare two responses to the same prompt; ``win_rate`` (``winrate``) turns their
verdicts into a win rate with a confidence interval; ``sample_responses`` (``sampling``), ``best_of_n``
(``best_of_n``) and the plots (``plots``) are imported from their modules on first use. The reward/KL
frontier (paper Fig. 2) adds ``sequence_kl`` (``kl``: KL(π‖π_ref) from a policy's own samples) and
ground-truth scorers (``scorers``: VADER, a classifier's class probability). ``on_policy_pairs``
(``onpolicy``) turns a policy's own scored samples into preference pairs (iterative DPO).
"""

from __future__ import annotations

import importlib

from .judges import (
    COMPARISON_PROMPT,
    SUMMARIZATION_PROMPT,
    TASK_PROMPTS,
    Judge,
    JudgeError,
    LLMJudge,
    RewardModelJudge,
    RuleJudge,
    ScoringJudge,
    parse_verdict,
)
from .winrate import WinRate, win_rate

# Imported on first access, so this package imports without them (plots need matplotlib).
_LAZY = {
    "sample_responses": "sampling",
    "best_of_n": "best_of_n",
    "sample_and_score": "best_of_n",
    "preference_pairs": "best_of_n",
    "sampled_preference_pairs": "best_of_n",
    "all_preference_pairs": "best_of_n",
    "best_of_n_prefixes": "best_of_n",
    "on_policy_pairs": "onpolicy",
    "OnPolicyPairs": "onpolicy",
    "select_pairs": "best_of_n",
    "sequence_kl": "kl",
    "sequence_logprobs": "kl",
    "best_of_n_kl": "kl",
    "KLEstimate": "kl",
    "VaderScorer": "scorers",
    "ClassifierScorer": "scorers",
    "make_scorer": "scorers",
    "plot_frontier": "plots",
    "plot_win_rate_vs_n": "plots",
    "plot_win_rates": "plots",
    "plot_training_curves": "plots",
}

__all__ = [
    "COMPARISON_PROMPT",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "RewardModelJudge",
    "RuleJudge",
    "ScoringJudge",
    "SUMMARIZATION_PROMPT",
    "TASK_PROMPTS",
    "WinRate",
    "parse_verdict",
    "win_rate",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# best_of_n is imported now, not on first access: importing the submodule dpo_trainer.evaluation.best_of_n
# (from anywhere) binds the package attribute "best_of_n" to that module, which would then shadow the
# function; binding the function here, after that import, keeps it. Absent while it is being written.
try:
    from .best_of_n import best_of_n  # noqa: F401 (re-exported through __all__)
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.best_of_n":
        raise
