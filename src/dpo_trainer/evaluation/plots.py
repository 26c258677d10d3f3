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


def plot_frontier(
    points: Mapping[str, Sequence[Mapping]],
    path: str | os.PathLike,
    *,
    title: str = "Reward against KL from the reference",
    reward_label: str = "Mean reward",
    kl_scale: str = "linear",
) -> Path:
    """The reward/KL frontier of the paper's Fig. 2 (left): mean reward against KL(π‖π_ref); save a PNG.

    ``points[method]`` is a list of ``{"kl", "reward"}`` dicts, optionally with ``"kl_stderr"``,
    ``"reward_stderr"`` (error bars) and ``"label"`` (written beside the point, e.g. "β=0.1"). One colour
    per method, in the order given; a method's points are joined in order of KL. ``kl_scale="symlog"``
    makes the KL axis linear up to 1 nat and logarithmic beyond (for a method far out, e.g. Unlikelihood).
    Creates the parent folder and returns ``path`` as a `Path`.
    """
    if kl_scale not in ("linear", "symlog"):
        raise ValueError(f"kl_scale must be 'linear' or 'symlog', got {kl_scale!r}")
    if not points:
        raise ValueError("plot_frontier needs at least one method in points, got none")
    for method, method_points in points.items():
        if not method_points:
            raise ValueError(f"method {method!r} has no points")
        for index, point in enumerate(method_points):
            for key in ("kl", "reward"):
                if key not in point:
                    raise ValueError(f"point {index} of method {method!r} has no {key!r}")
    figure = _figure(figsize=(6.8, 4.6))
    axes = figure.add_subplot()
    for method, method_points in points.items():
        ordered = sorted(method_points, key=lambda point: point["kl"])
        kls = [point["kl"] for point in ordered]
        rewards = [point["reward"] for point in ordered]
        xerr = [point.get("kl_stderr", 0.0) for point in ordered]
        yerr = [point.get("reward_stderr", 0.0) for point in ordered]
        line = axes.errorbar(
            kls, rewards, xerr=xerr, yerr=yerr, marker="o", markersize=5, capsize=2, linewidth=1, label=method
        )
        for point in ordered:
            if point.get("label"):
                axes.annotate(
                    point["label"], (point["kl"], point["reward"]), textcoords="offset points",
                    xytext=(4, 4), fontsize="x-small", color=line[0].get_color(),
                )  # fmt: skip
    if kl_scale == "symlog":
        axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlabel("KL(π ‖ π_ref) (nats per sequence)")
    axes.set_ylabel(reward_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_win_rate_vs_n(
    results: Mapping[str, Mapping[int, WinRateLike]],
    path: str | os.PathLike,
    *,
    title: str = "Best-of-N: win rate against N",
    baseline_label: str = "the chosen responses",
) -> Path:
    """Win rate against N for Best-of-N, as in the paper's Fig. 4 (App. D.1); save a PNG.

    ``results[series][n]`` is a `WinRate` (error bar from its interval); one line per series (e.g. a
    sampling temperature), N on a log-2 axis, a dashed line at 0.5. Returns ``path`` as a `Path`.
    """
    if not results or not all(results.values()):
        raise ValueError("plot_win_rate_vs_n needs at least one series with at least one N")
    figure = _figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    for series, by_n in results.items():
        ns = sorted(by_n)
        rates = [by_n[n].rate for n in ns]
        below = [max(0.0, by_n[n].rate - by_n[n].low) for n in ns]
        above = [max(0.0, by_n[n].high - by_n[n].rate) for n in ns]
        axes.errorbar(ns, rates, yerr=[below, above], marker="o", markersize=4, capsize=3, label=series)
    axes.set_xscale("log", base=2)
    all_ns = sorted({n for by_n in results.values() for n in by_n})
    axes.set_xticks(all_ns, [str(n) for n in all_ns])
    axes.axhline(0.5, color="0.4", linestyle="--", linewidth=1)
    axes.set_xlabel("N (samples per prompt)")
    axes.set_ylabel(f"Win rate vs {baseline_label}")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)
