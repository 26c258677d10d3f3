"""What every judge is: `Judge` compares two responses to the same prompt, `ScoringJudge` scores each response on
its own and compares through the scores; `JudgeError` when a judge gets no verdict."""

from __future__ import annotations

import abc
from collections.abc import Sequence


class JudgeError(RuntimeError):
    """A judge could not get a verdict: the endpoint failed, refused or answered something else."""


def _check_lengths(prompts: Sequence[str], **responses: Sequence[str]) -> None:
    for name, values in responses.items():
        if len(values) != len(prompts):
            raise ValueError(f"{name} has {len(values)} entries but prompts has {len(prompts)}")


class Judge(abc.ABC):
    """Compares two responses to the same prompt."""

    @abc.abstractmethod
    def compare(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[float]:
        """Per prompt: 1.0 if ``responses_a[i]`` is better, 0.0 if ``responses_b[i]`` is, 0.5 for a tie."""


class ScoringJudge(Judge):
    """A judge that scores each response on its own (higher is better), as Best-of-N needs."""

    @abc.abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response) pair; higher is better."""

    def compare(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[float]:
        """1.0 where A scores higher, 0.0 where B does, 0.5 where the scores are equal."""
        _check_lengths(prompts, responses_a=responses_a, responses_b=responses_b)
        # One call for both sides, so a reward model batches them together.
        scores = self.score(list(prompts) * 2, list(responses_a) + list(responses_b))
        n = len(prompts)
        return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores[:n], scores[n:])]
