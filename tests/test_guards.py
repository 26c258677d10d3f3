"""The divergence guard: a non-finite loss or grad norm stops training naming the step (or skips the step
with `on_nonfinite="skip"`), no checkpoint is written from NaN weights, and reference log-probs must be
finite and <= 0."""

import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from dpo_trainer import DPOConfig, DPOTrainer
from dpo_trainer.guards import NonFiniteError, reference_problem

from conftest import dpo_config, preference_rows

ROWS = preference_rows(24, seed=3)


class NaNAtStep(DPOTrainer):
    """Makes the loss of training step `nan_step` (1-based) NaN, as a diverged forward pass would."""

    nan_step = 3

    def dpo_loss(self, policy_logps, reference_logps, *args, **kwargs):
        losses, rewards = super().dpo_loss(policy_logps, reference_logps, *args, **kwargs)
        if self.model.training and self.state.global_step + 1 == self.nan_step:
            losses = losses * float("nan")
        return losses, rewards


class WeightsAtStepEnd(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_diverging_learning_rate_stops_naming_the_step_and_saves_nothing_from_nan(
    tmp_path, make_model, tokenizer
):
    args = dpo_config(tmp_path, learning_rate=1e2, max_steps=12, save_strategy="steps", save_steps=1)
    trainer = DPOTrainer(make_model(seed=1), args=args, train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(NonFiniteError, match=r"diverged at step \d+") as error:
        trainer.train()
    step = int(re.search(r"step (\d+)", str(error.value)).group(1))
    assert 1 < step <= 12
    # the weights in memory and every checkpoint written are finite; none is written at or after `step`
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = sorted(
        int(name.split("-")[1]) for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")
    )
    assert saved == list(range(1, step))
    for number in saved:
        weights = load_file(os.path.join(args.output_dir, f"checkpoint-{number}", "model.safetensors"))
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), number


def test_a_nan_loss_raises_before_the_optimizer_applies_it(tmp_path, make_model, tokenizer):
    weights = WeightsAtStepEnd()
    args = dpo_config(tmp_path, max_steps=5)
    trainer = NaNAtStep(
        make_model(seed=1), args=args, train_dataset=ROWS, processing_class=tokenizer, callbacks=[weights]
    )
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss"):
        trainer.train()
    assert sorted(weights.weights) == [1, 2]
    for name, value in trainer.model.state_dict().items():  # still step 2's weights
        assert torch.equal(value, weights.weights[2][name]), name


def test_skip_mode_drops_the_step_and_goes_on(tmp_path, make_model, tokenizer):
    weights = WeightsAtStepEnd()
    args = dpo_config(tmp_path, max_steps=5, on_nonfinite="skip")
    trainer = NaNAtStep(
        make_model(seed=1), args=args, train_dataset=ROWS, processing_class=tokenizer, callbacks=[weights]
    )
    trainer.train()
    assert trainer.state.global_step == 5
    for name in weights.weights[2]:  # step 3 applied nothing (not even AdamW's momentum or weight decay)
        assert torch.equal(weights.weights[3][name], weights.weights[2][name]), name
    moved = [n for n in weights.weights[4] if not torch.equal(weights.weights[4][n], weights.weights[3][n])]
    assert moved  # and step 4 trains again
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [entry for entry in trainer.state.log_history if "nonfinite_skipped_steps" in entry]
    assert logged and logged[-1]["nonfinite_skipped_steps"] == 1


def test_invalid_reference_log_probs_stop_training(tmp_path, make_model, tokenizer):
    class PositiveReference(DPOTrainer):
        def reference_logps(self, batch):
            return super().reference_logps(batch).abs()  # log-probabilities above 0: impossible

    args = dpo_config(tmp_path, max_steps=2, on_nonfinite="skip")  # skip does not cover a broken reference
    trainer = PositiveReference(make_model(seed=1), args=args, train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(NonFiniteError, match="Step 1: reference log-probs"):
        trainer.train()


def test_save_model_refuses_nan_weights(tmp_path, make_model, tokenizer):
    trainer = DPOTrainer(
        make_model(seed=1), args=dpo_config(tmp_path), train_dataset=ROWS, processing_class=tokenizer
    )
    name, parameter = next(iter(trainer.model.named_parameters()))
    with torch.no_grad():
        parameter.view(-1)[0] = float("nan")
    target = tmp_path / "saved"
    with pytest.raises(NonFiniteError, match=re.escape(name)):
        trainer.save_model(str(target))
    assert not (target / "model.safetensors").exists()


def test_reference_problem_names_the_row():
    good = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    assert reference_problem(good) is None
    assert "row 1" in reference_problem(torch.tensor([[-1.0, -2.0], [math.nan, -3.0]]))
    assert "above 0" in reference_problem(torch.tensor([[-1.0, 2.0], [-1.0, -3.0]]))
    assert "dtype" in reference_problem(torch.tensor([[-1, -2]]))


def test_on_nonfinite_is_validated(tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite"):
        DPOConfig(output_dir=str(tmp_path), on_nonfinite="ignore")


# ---------------------------------------------------------------- errors before training, model cards


def test_rows_longer_than_the_models_positions_are_refused_before_training(tmp_path, tokenizer):
    from dpo_trainer.tiny import tiny_causal_lm

    # GPT-2 learns absolute positions: a longer row would fail mid-training with an IndexError
    model = tiny_causal_lm(tokenizer, arch="gpt2", hidden_size=32, num_layers=1, n_positions=16)
    args = dpo_config(tmp_path, max_length=64)
    with pytest.raises(
        ValueError,
        match=r"train_dataset row \d+ .* max_position_embeddings=16; set DPOConfig.max_length <= 16",
    ):
        DPOTrainer(model, args=args, train_dataset=ROWS, processing_class=tokenizer)
    fits = DPOTrainer(
        model,
        args=dpo_config(tmp_path, max_length=16, max_steps=1),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    fits.train()  # truncated to the model's positions, it trains


def test_a_lora_model_gets_our_model_card_not_peft_s(tmp_path, make_model, tokenizer):
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = DPOTrainer(
        make_model(seed=1),
        args=dpo_config(tmp_path, max_steps=1),
        train_dataset=ROWS,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.save_model(str(tmp_path / "adapter"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "Direct Preference Optimization" in card and "<!-- written by dpo_trainer -->" in card
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    users = tmp_path / "users"
    users.mkdir()
    (users / "README.md").write_text("# My adapter\n\nMy own words.\n")
    trainer.save_model(str(users))
    assert (users / "README.md").read_text() == "# My adapter\n\nMy own words.\n"  # byte for byte
