"""PNG plots of win rates and training logs (dpo_trainer.evaluation.plots)."""

import sys

import pytest

pytest.importorskip("matplotlib")

from dpo_trainer.evaluation.plots import plot_training_curves, plot_win_rates  # noqa: E402
from dpo_trainer.evaluation.winrate import WinRate  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes  # a drawn figure, not an empty canvas


def win_rates():
    def at(rate):
        return WinRate(
            rate=rate, low=max(0.0, rate - 0.07), high=min(1.0, rate + 0.07), n=200, wins=200 * rate, ties=0
        )

    return {
        "DPO": {0.0: at(0.62), 0.25: at(0.6), 0.5: at(0.57), 1.0: at(0.45)},
        "SFT": {1.0: at(0.3), 0.0: at(0.42)},  # any key order
        "Best of 16": {1.0: at(0.55)},
    }


def train_log(steps=20, eval_every=5):
    history = []
    for step in range(1, steps + 1):
        history.append(
            {
                "loss": 0.69 - 0.01 * step,
                "rewards/margins": 0.05 * step,
                "rewards/accuracies": 0.5 + 0.02 * step,
            }
            | {"learning_rate": 1e-6, "epoch": step / steps, "step": step}
        )
        if step % eval_every == 0:
            history.append(
                {"eval_loss": 0.7 - 0.005 * step, "eval_rewards/margins": 0.03 * step, "step": step}
            )
    history.append(
        {"train_runtime": 1.0, "train_loss": 0.6, "epoch": 1.0, "step": steps}
    )  # Trainer's summary
    return history


def test_win_rate_plot_is_a_png_in_a_new_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "win_rates.png"
    assert plot_win_rates(win_rates(), path, title="HH", baseline_label="chosen") == path
    assert_png(path)


def test_training_curves_with_train_and_eval_entries(tmp_path):
    path = plot_training_curves(train_log(), str(tmp_path / "plots" / "curves.png"))
    assert path == tmp_path / "plots" / "curves.png"
    assert_png(path)


def test_training_curves_with_train_entries_only_or_missing_keys(tmp_path):
    train_only = [entry for entry in train_log() if "loss" in entry]
    assert_png(plot_training_curves(train_only, tmp_path / "train_only.png"))
    loss_only = [{"loss": 0.7, "step": 1}, {"loss": 0.6, "step": 2}, {"epoch": 1.0}]
    assert_png(plot_training_curves(loss_only, tmp_path / "loss_only.png"))


def test_training_curves_from_a_real_trainer(tmp_path, make_model, tokenizer, pairs):
    from dpo_trainer import DPOTrainer

    from conftest import dpo_config

    args = dpo_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = DPOTrainer(
        make_model(), args=args, train_dataset=pairs[:8], eval_dataset=pairs[8:12], processing_class=tokenizer
    )
    trainer.train()
    history = trainer.state.log_history
    assert any("rewards/margins" in entry for entry in history)
    assert any("eval_rewards/accuracies" in entry for entry in history)
    assert_png(plot_training_curves(history, tmp_path / "curves.png"))


def test_empty_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one method"):
        plot_win_rates({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="method 'SFT' has no win rates"):
        plot_win_rates({"DPO": win_rates()["DPO"], "SFT": {}}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="non-empty log_history"):
        plot_training_curves([], tmp_path / "b.png")
    with pytest.raises(ValueError, match="no entries with a step and any of"):
        plot_training_curves([{"train_runtime": 1.0, "step": 3}, {"loss": 0.5}], tmp_path / "b.png")
    assert not list(tmp_path.iterdir())


def test_no_global_matplotlib_state_at_import_or_when_plotting(tmp_path):
    import matplotlib

    import dpo_trainer.evaluation.plots as plots

    assert not any(getattr(value, "__name__", "").startswith("matplotlib") for value in vars(plots).values())
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # rcParams["backend"] would load pyplot
    plot_win_rates(win_rates(), tmp_path / "w.png")
    plot_training_curves(train_log(), tmp_path / "c.png")
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert pyplot_loaded or "matplotlib.pyplot" not in sys.modules
