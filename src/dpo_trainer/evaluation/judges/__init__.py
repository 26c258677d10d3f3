"""Judges: compare two responses to the same prompt, for win rates and Best-of-N.

Every judge has ``compare(prompts, responses_a, responses_b) -> list[float]``: per prompt 1.0 when
response A is better, 0.0 when B is, 0.5 for a tie (``win_rate`` turns these into a win rate of A over B).
Scoring judges (``ScoringJudge``) also have ``score(prompts, responses) -> list[float]`` (higher is
better) and compare through it, a tie when the scores are equal.

- ``RuleJudge``: a pure scoring function, e.g. the bundled data's ``rule_score`` (``local``).
- ``RewardModelJudge``: a local sequence-classification model with one output, the reward (``local``).
- ``LLMJudge``: an OpenAI-compatible chat-completions endpoint asked the paper's GPT-4 question (``llm``).

``Judge``, ``ScoringJudge`` and ``JudgeError`` are defined in ``base``; every name below is importable from
``dpo_trainer.evaluation.judges``.

>>> judge = RuleJudge(lambda prompt, response: len(response), disable_progress=True)
>>> judge.compare(["Hi"] * 3, ["hello", "hey", "yo"], ["hey", "hey", "hello"])
[1.0, 0.5, 0.0]
"""

from .base import Judge, JudgeError, ScoringJudge
from .llm import COMPARISON_PROMPT, SUMMARIZATION_PROMPT, TASK_PROMPTS, LLMJudge, parse_verdict
from .local import RewardModelJudge, RuleJudge

__all__ = [
    "COMPARISON_PROMPT",
    "SUMMARIZATION_PROMPT",
    "TASK_PROMPTS",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "RewardModelJudge",
    "RuleJudge",
    "ScoringJudge",
    "parse_verdict",
]
