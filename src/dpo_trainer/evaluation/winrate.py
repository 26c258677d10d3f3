"""Win rates with a Wilson score confidence interval.

>>> result = win_rate([1.0, 1.0, 0.0, 0.5])
>>> result.rate, result.wins, result.ties
(0.625, 2.5, 1)
>>> print(win_rate([1.0] * 7 + [0.0] * 3))
0.70 [0.40, 0.89] (n=10)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

OUTCOMES = (0.0, 0.5, 1.0)  # B wins, tie, A wins


@dataclass(frozen=True)
class WinRate:
    """How often A beat B: ``rate`` = ``wins / n`` with ties counted half, in ``[low, high]``.

    ``wins`` is the tie-adjusted number of wins (a float), ``ties`` the number of ties.
    """

    rate: float
    low: float
    high: float
    n: int
    wins: float
    ties: int
    unparsed: int = 0  # outcomes without a verdict (NaN), left out of n

    def __str__(self) -> str:
        extra = f", {self.unparsed} unparsed" if self.unparsed else ""
        return f"{self.rate:.2f} [{self.low:.2f}, {self.high:.2f}] (n={self.n}{extra})"


def wilson_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``rate`` observed over ``n`` trials.

    With z the two-sided normal quantile of ``confidence`` (1.96 for 0.95) and p = ``rate``:

        centre = (p + z²/(2n)) / (1 + z²/n)
        half   = z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/(4n²))

    Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a point when
    p is 0 or 1: all n wins give [n / (n + z²), 1].
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2_n = z * z / n
    centre = (rate + z2_n / 2) / (1 + z2_n)
    half = z / (1 + z2_n) * math.sqrt(rate * (1 - rate) / n + z2_n / (4 * n))
    # Exact at the ends (rounding would leave e.g. 3e-17 for no wins); clipped to [0, 1] otherwise.
    low = 0.0 if rate == 0.0 else max(0.0, centre - half)
    high = 1.0 if rate == 1.0 else min(1.0, centre + half)
    return low, high


def win_rate(outcomes: Sequence[float], confidence: float = 0.95) -> WinRate:
    """The win rate of A over B from per-prompt judge outcomes, with a Wilson score interval.

    Each outcome is 1.0 (A wins), 0.0 (B wins) or 0.5 (tie), as returned by ``Judge.compare``. A tie
    counts as half a win, as in the paper's win rates (Rafailov et al. 2023, Sec. 6). The interval is the
    Wilson score interval (``wilson_interval``) on that tie-adjusted proportion, treating it as a
    binomial proportion over ``n`` outcomes; since a tie (0.5) varies less than a win or loss, this is
    slightly conservative when there are ties.

    A NaN outcome is a comparison without a verdict (an LLM judge's unparsed reply): it is left out of
    ``n`` and counted in ``unparsed``.

    Raises ``ValueError`` for no outcomes or a value other than 0, 0.5 or 1 (naming its index), and
    ``TypeError`` for something that is not a real number.
    """
    outcomes = list(outcomes)
    if not outcomes:
        raise ValueError("win_rate needs at least one outcome, got none")
    unparsed = sum(isinstance(o, float) and math.isnan(o) for o in outcomes)
    if unparsed == len(outcomes):
        raise ValueError(
            f"win_rate needs at least one outcome with a verdict; all {unparsed} are unparsed (NaN)"
        )
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, float) and math.isnan(outcome):
            continue
        if isinstance(outcome, bool) or not isinstance(outcome, numbers.Real):
            raise TypeError(
                f"outcome {index} is {outcome!r} ({type(outcome).__name__}); expected 1.0 (A wins), "
                "0.0 (B wins) or 0.5 (tie)"
            )
        if float(outcome) not in OUTCOMES:
            raise ValueError(
                f"outcome {index} is {outcome!r}; expected 1.0 (A wins), 0.0 (B wins) or 0.5 (tie)"
            )
    outcomes = [outcome for outcome in outcomes if not (isinstance(outcome, float) and math.isnan(outcome))]
    n = len(outcomes)
    wins = float(sum(float(outcome) for outcome in outcomes))
    ties = sum(float(outcome) == 0.5 for outcome in outcomes)
    rate = wins / n
    low, high = wilson_interval(rate, n, confidence)
    return WinRate(rate=rate, low=low, high=high, n=n, wins=wins, ties=ties, unparsed=unparsed)
