"""PNG plots of evaluation results and training logs (needs matplotlib: ``pip install dpo_trainer[examples]``).

Figures are built as bare `matplotlib.figure.Figure` objects and saved by the Agg renderer, without
``pyplot``: nothing global changes (no backend switch, no open-figure registry), at import or when
plotting, and no display is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

# (panel title, train key in Trainer.state.log_history; the eval key is "eval_" + it)
TRAINING_PANELS = (
    ("Loss", "loss"),
    ("Reward margin (chosen - rejected)", "rewards/margins"),
    ("Reward accuracy", "rewards/accuracies"),
)
EVAL_PREFIX = "eval_"


class WinRateLike(Protocol):
    """`dpo_trainer.evaluation.winrate.WinRate` or anything with a rate and its interval."""

    rate: float
    low: float
    high: float


def plot_win_rates(
    results: Mapping[str, Mapping[float, WinRateLike]],
    path: str | os.PathLike,
    *,
    title: str = "Win rate against sampling temperature",
    baseline_label: str = "the chosen responses",
) -> Path:
    """Plot each method's win rate against sampling temperature, as in the paper's Figs. 2 and 3; save a PNG.

    ``results[method][temperature]`` is a `WinRate` (``.rate`` with the interval ``.low``-``.high``,
    drawn as an error bar). One line per method, in the order given; a dashed line marks 0.5, a tie
    with the baseline. The y axis reads "Win rate vs {baseline_label}". Creates the parent folder and
    returns ``path`` as a `Path`.
    """
    if not results:
        raise ValueError("plot_win_rates needs at least one method in results, got none")
    for method, by_temperature in results.items():
        if not by_temperature:
            raise ValueError(f"method {method!r} has no win rates; give at least one temperature")

    figure = _figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    for method, by_temperature in results.items():
        temperatures = sorted(by_temperature)
        rates = [by_temperature[t].rate for t in temperatures]
        below = [max(0.0, by_temperature[t].rate - by_temperature[t].low) for t in temperatures]
        above = [max(0.0, by_temperature[t].high - by_temperature[t].rate) for t in temperatures]
        axes.errorbar(
            temperatures, rates, yerr=[below, above], marker="o", markersize=4, capsize=3, label=method
        )
    axes.axhline(0.5, color="0.4", linestyle="--", linewidth=1, label="tie (0.5)")
    axes.set_xlabel("Sampling temperature")
    axes.set_ylabel(f"Win rate vs {baseline_label}")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "tie (0.5)")  # methods first, then the tie
    axes.legend([handles[i] for i in order], [labels[i] for i in order], fontsize="small")
    return _save(figure, path)


def plot_training_curves(
    log_history: Sequence[Mapping], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Plot loss, reward margin and reward accuracy against step from `Trainer.state.log_history`; save a PNG.

    Training entries (``loss``, ``rewards/margins``, ``rewards/accuracies``) and evaluation entries
    (the same keys prefixed ``eval_``) are drawn as separate lines; a key never logged leaves its line
    out, and a panel with nothing logged says so. Entries without a ``step`` are ignored. Creates the
    parent folder and returns ``path`` as a `Path`.
    """
    if not log_history:
        raise ValueError("plot_training_curves needs a non-empty log_history (Trainer.state.log_history)")
    series = {
        key: _series(log_history, key)
        for _, train_key in TRAINING_PANELS
        for key in (train_key, EVAL_PREFIX + train_key)
    }
    if not any(steps for steps, _ in series.values()):
        keys = ", ".join(sorted(series))
        raise ValueError(f"log_history has no entries with a step and any of: {keys}")

    figure = _figure(figsize=(13.5, 4.0))
    from matplotlib.ticker import MaxNLocator  # after _figure() has checked that matplotlib is there

    panels = figure.subplots(1, len(TRAINING_PANELS))
    for axes, (panel_title, train_key) in zip(panels, TRAINING_PANELS):
        axes.set_title(panel_title)
        axes.set_xlabel("Step")
        train_steps, train_values = series[train_key]
        eval_steps, eval_values = series[EVAL_PREFIX + train_key]
        if not (train_steps or eval_steps):
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes, color="0.5")
            axes.set_xticks([])
            axes.set_yticks([])
            continue
        if train_steps:
            marker = "." if len(train_steps) <= 50 else None
            axes.plot(train_steps, train_values, linewidth=1.2, marker=marker, color="C0", label="train")
        if eval_steps:
            axes.plot(
                eval_steps, eval_values, linewidth=1.2, marker="o", markersize=4, color="C1", label="eval"
            )
        if train_key == "rewards/margins":
            axes.axhline(0.0, color="0.4", linestyle="--", linewidth=1)
        elif train_key == "rewards/accuracies":
            axes.axhline(0.5, color="0.4", linestyle="--", linewidth=1)
            axes.set_ylim(-0.02, 1.02)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _series(log_history: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """The ``(steps, values)`` of the entries that logged ``key``."""
    points = [(entry["step"], float(entry[key])) for entry in log_history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def _figure(figsize: tuple[float, float]):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or dpo_trainer[examples])"
        ) from error
    return Figure(figsize=figsize, layout="constrained")


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=150)  # a bare Figure renders PNG with Agg
    return path
