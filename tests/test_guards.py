"""The divergence guard: a non-finite loss or grad norm stops training naming the step (or skips the step
with `on_nonfinite="skip"`), no checkpoint is written from NaN weights, and reference log-probs must be
finite and <= 0."""

import logging
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from dpo_trainer import DPOConfig, DPOTrainer
from dpo_trainer.guards import (
    MAX_SCALER_SKIPS_IN_A_ROW,
    MIN_LOSS_SCALE,
    NonFiniteError,
    StepGuard,
    reference_problem,
)

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


class NaNGradients(TrainerCallback):
    """From training step `start` (1-based) on, the first parameter's gradient is NaN while the loss stays
    finite: a diverging backward pass, made deterministic (a large learning rate reaches NaN on some CPUs and
    not on others)."""

    def __init__(self, start: int):
        self.start, self.hook = start, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 >= self.start and self.hook is None:
            self.hook = next(model.parameters()).register_hook(lambda grad: torch.full_like(grad, math.nan))


def test_a_diverging_step_stops_naming_the_step_and_saves_nothing_from_nan(tmp_path, make_model, tokenizer):
    args = dpo_config(tmp_path, max_steps=12, save_strategy="steps", save_steps=1)
    trainer = DPOTrainer(
        make_model(seed=1),
        args=args,
        train_dataset=ROWS,
        processing_class=tokenizer,
        callbacks=[NaNGradients(start=4)],
    )
    with pytest.raises(NonFiniteError, match=r"diverged at step 4: non-finite gradient norm"):
        trainer.train()
    # the weights in memory are step 3's, finite; checkpoints 1-3 were written, all finite, none after
    saved = sorted(
        int(name.split("-")[1]) for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")
    )
    assert saved == [1, 2, 3]
    for number in saved:
        weights = load_file(os.path.join(args.output_dir, f"checkpoint-{number}", "model.safetensors"))
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), number
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, weights[name]), name


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


# ---------------------------------------------------------------- fp16 loss scaling


def fp16_on_cpu(trainer, init_scale: float):
    """Give `trainer` what `fp16=True` gives on a GPU: float16 autocast and a GradScaler, here starting at
    `init_scale`. On CPU accelerate turns fp16 off (no autocast, no scaler: the run is float32), but torch
    has both on CPU; set before train(), which hands the scaler to the optimizer it prepares."""
    accelerator = trainer.accelerator
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=init_scale)
    return accelerator.scaler


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_fp16_steps_the_loss_scaler_skips_are_not_divergence(tmp_path, make_model, tokenizer, on_nonfinite):
    weights = WeightsAtStepEnd()
    args = dpo_config(tmp_path, fp16=True, bf16=False, max_steps=20, on_nonfinite=on_nonfinite)
    trainer = DPOTrainer(
        make_model(seed=1), args=args, train_dataset=ROWS, processing_class=tokenizer, callbacks=[weights]
    )
    initial = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    # 2**32 times any gradient above 1.6e-5 overflows float16 (65504): the first steps overflow for sure,
    # as fp16 runs do at their start; the scaler halves its scale until the gradients fit
    scaler = fp16_on_cpu(trainer, init_scale=2.0**32)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    skipped = [entry["step"] for entry in logs if not math.isfinite(entry["grad_norm"])]
    assert skipped[0] == 1 and len(skipped) < 20  # the scaler skipped the first steps, then training went on
    assert logs[-1]["scaler_skipped_steps"] == len(skipped)
    assert not any("nonfinite_skipped_steps" in entry for entry in trainer.state.log_history)
    assert scaler.get_scale() == 2.0**32 / 2 ** len(skipped)  # the scaler, not the guard, skipped them
    before = initial
    for step in range(1, 21):  # a skipped step applies nothing, every other step moves the weights
        unchanged = all(torch.equal(weights.weights[step][name], before[name]) for name in before)
        assert unchanged == (step in skipped), step
        before = weights.weights[step]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fp16_a_nan_loss_still_stops_training(tmp_path, make_model, tokenizer):
    args = dpo_config(tmp_path, fp16=True, bf16=False, max_steps=5)
    trainer = NaNAtStep(make_model(seed=1), args=args, train_dataset=ROWS, processing_class=tokenizer)
    fp16_on_cpu(trainer, init_scale=2.0**32)  # steps 1 and 2 overflow: skipped by the scaler
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss"):
        trainer.train()
    assert trainer.guard.scaler_skipped_steps == 2


def test_fp16_a_collapsing_loss_scale_stops_training(tmp_path, make_model, tokenizer):
    # the loss is finite, the gradients NaN at every step: the scaler skips each one and halves its scale
    args = dpo_config(tmp_path, fp16=True, bf16=False, max_steps=10)
    trainer = DPOTrainer(
        make_model(seed=1),
        args=args,
        train_dataset=ROWS,
        processing_class=tokenizer,
        callbacks=[NaNGradients(start=1)],
    )
    initial = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    fp16_on_cpu(trainer, init_scale=2.0**-21)  # steps at 2**-21 ... 2**-24 go on; 2**-25 is below the floor
    assert MIN_LOSS_SCALE == 2.0**-24
    with pytest.raises(
        NonFiniteError, match=r"step 5: the fp16 loss scaler skipped 5 steps in a row"
    ) as error:
        trainer.train()
    assert "No update was applied after step 0" in str(error.value)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, initial[name]), name


class DeepSpeedFP16(SimpleNamespace):
    """An accelerator under DeepSpeed fp16 as the guard sees it (accelerate 1.16, deepspeed 0.19): no torch
    scaler; the engine's fp16 optimizer has already stepped, setting `overflow` and lowering `loss_scale`.
    DeepSpeed's fp16 needs a GPU (or a CPU with oneDNN float16), hence a stand-in."""

    def __init__(self, fp16: bool = True):
        optimizer = SimpleNamespace(overflow=False, loss_scale=2.0**16)
        engine = SimpleNamespace(optimizer=optimizer, fp16_enabled=lambda: fp16)
        super().__init__(
            scaler=None, num_processes=1, deepspeed_engine_wrapped=SimpleNamespace(engine=engine)
        )

    def step(self, guard, step: int, overflow: bool, scale: float | None = None, loss: float = 0.0) -> None:
        """One optimizer step through the guard: the engine overflowed or not (halving its scale, or setting
        `scale`); the loss of the step is `loss`."""
        optimizer = self.deepspeed_engine_wrapped.engine.optimizer
        optimizer.overflow = overflow
        if scale is not None:
            optimizer.loss_scale = scale
        elif overflow:
            optimizer.loss_scale /= 2
        guard.flag("train", torch.tensor([loss]), torch.tensor([-1.0]))
        guard.check(torch.nn.Linear(1, 1), math.inf if overflow else 1.0, step, self)


def test_deepspeed_fp16_overflow_steps_are_counted_and_a_pinned_scale_stops():
    engine, guard = DeepSpeedFP16(), StepGuard("raise", "cpu")
    for step in (1, 2, 3):
        engine.step(guard, step, overflow=True)
    engine.step(guard, 4, overflow=False)
    assert guard.log_fields() == {"scaler_skipped_steps": 3} and guard.scaler_skips_in_a_row == 0
    # min_loss_scale=1 with raise_error_at_min_scale=False: the scale stays at 1, every step is skipped
    for step in range(5, 5 + MAX_SCALER_SKIPS_IN_A_ROW - 1):
        engine.step(guard, step, overflow=True, scale=1.0)
    with pytest.raises(NonFiniteError, match=f"skipped {MAX_SCALER_SKIPS_IN_A_ROW} steps in a row"):
        engine.step(guard, 4 + MAX_SCALER_SKIPS_IN_A_ROW, overflow=True, scale=1.0)


def test_deepspeed_fp16_a_nan_loss_or_bf16_overflow_is_still_divergence():
    with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
        DeepSpeedFP16().step(StepGuard("raise", "cpu"), 1, overflow=True, loss=math.nan)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite gradient norm"):  # no loss scaling in bf16
        DeepSpeedFP16(fp16=False).step(StepGuard("raise", "cpu"), 1, overflow=True)


# ---------------------------------------------------------------- errors before training, model cards


def test_rows_longer_than_the_models_positions_are_refused_before_training(tmp_path, tokenizer):
    from dpo_trainer.testing import tiny_causal_lm

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


def test_fp16_on_the_cpu_says_it_trains_in_float32(tmp_path, make_model, tokenizer, caplog):
    # accelerate sets up no float16 autocast on the CPU: the run is float32, and the trainer says so
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.trainer"):
        trainer = DPOTrainer(
            make_model(), args=dpo_config(tmp_path, fp16=True), train_dataset=ROWS, processing_class=tokenizer
        )
    assert not trainer.accelerator.native_amp
    assert "fp16=True on the CPU" in caplog.text and "float32" in caplog.text


# ---------------------------------------------------------------- collapse without a NaN (issue 20, item 3)


class FlatLogitsFrom(TrainerCallback):
    """From training step `start` (1-based) on, the model's final norm outputs zeros: the logits are all 0
    and no gradient reaches any weight, while the loss stays finite and well above 0. What `examples/hh.py
    --learning_rate 10000` gives on some CPUs (exploded weights, saturated activations), made deterministic."""

    def __init__(self, start: int):
        self.start, self.handle = start, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 >= self.start and self.handle is None:
            norm = model.get_decoder().norm
            self.handle = norm.register_forward_hook(lambda module, inputs, output: output * 0.0)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_collapse_without_nan_stops_training_naming_the_step(tmp_path, make_model, tokenizer, accumulation):
    from dpo_trainer.guards import ZERO_GRADIENT_STEPS, CollapseError

    weights = WeightsAtStepEnd()
    args = dpo_config(
        tmp_path,
        max_steps=12,
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
        on_nonfinite="skip",  # skipping cannot revive a dead model: it raises all the same
    )
    trainer = DPOTrainer(
        make_model(seed=1),
        args=args,
        train_dataset=ROWS,
        processing_class=tokenizer,
        callbacks=[weights, FlatLogitsFrom(start=4)],
    )
    last = 4 + ZERO_GRADIENT_STEPS - 1
    with pytest.raises(
        CollapseError, match=rf"collapsed at step {last}: the gradient norm was exactly 0.0 at steps 4-{last}"
    ):
        trainer.train()
    assert isinstance(CollapseError("x"), NonFiniteError)  # one except catches every divergence
    assert sorted(weights.weights) == list(range(1, last))  # the step that raised was not applied
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights.weights[last - 1][name]), name
    logs = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    assert [entry["grad_norm"] for entry in logs[3:]] == [0.0] * (ZERO_GRADIENT_STEPS - 1)
    assert all(entry["loss"] > 0.1 for entry in logs[3:])  # finite, not ~0: the run looked like a success


def test_the_zero_gradient_rule_counts_steps_in_a_row_of_pairs_that_need_a_gradient():
    from dpo_trainer.guards import MIN_LIVE_LOSS, ZERO_GRADIENT_STEPS, CollapseError

    accelerator = SimpleNamespace(scaler=None, num_processes=1)
    distinct = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])

    def step(guard, number, norm, losses=(0.7, 0.9), reference=distinct):
        guard.flag("train", torch.tensor(losses), reference)
        guard.check(torch.nn.Linear(1, 1), norm, number, accelerator)

    guard = StepGuard("raise", "cpu")
    for number in range(1, 3 * ZERO_GRADIENT_STEPS):  # a non-zero norm between zeros starts the count again
        step(guard, number, 0.0 if number % ZERO_GRADIENT_STEPS else 0.5)
    for number in range(1, 10):
        step(guard, number, None)  # DeepSpeed without a computed norm: unknown, never "exactly 0"
        step(guard, number, 0.0, losses=(MIN_LIVE_LOSS / 2, 0.0))  # ~0 losses may underflow to no gradient
        # identical responses (tied reference log-probs, up to rounding): their gradients cancel exactly
        step(guard, number, 0.0, reference=torch.tensor([[-3.0, -3.0000002], [-4.0, -4.0]]))
    assert not guard.zero_gradient_steps
    # a tied pair beside a live one: the live one decides
    mixed = torch.tensor([[-3.0, -3.0], [-4.0, -2.0]])
    for number in range(1, ZERO_GRADIENT_STEPS):
        step(guard, number, 0.0, reference=mixed)
    with pytest.raises(CollapseError, match=rf"step {ZERO_GRADIENT_STEPS}: .* losses up to 0.9, 0.9, 0.9"):
        step(guard, ZERO_GRADIENT_STEPS, torch.tensor(0.0), reference=mixed)


class ZeroGradientSteps(TrainerCallback):
    """Records the optimizer steps whose gradient norm is exactly 0 and the guard's warnings of them."""

    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and logs.get("grad_norm") == 0.0:
            self.steps.append(state.global_step)


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_steps=30, learning_rate=1e-3),  # the tests' run, trained to low losses
        dict(
            max_steps=8, beta=0.1, learning_rate=1e-6, optim="rmsprop", warmup_steps=150
        ),  # the paper's (App. B)
        dict(
            max_steps=6, gradient_checkpointing=True, lora=True
        ),  # LoRA: B = 0 at step 1, A gets no gradient
        dict(max_steps=6, loss_type="hinge", learning_rate=1e-2),  # a loss that reaches exactly 0
    ],
    ids=["tests", "paper", "lora-checkpointing", "hinge"],
)
def test_healthy_runs_never_see_the_collapse_rule(tmp_path, make_model, tokenizer, caplog, settings):
    from peft import LoraConfig

    settings = dict(settings)
    peft_config = (
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if settings.pop("lora", False) else None
    )
    recorder = ZeroGradientSteps()
    trainer = DPOTrainer(
        make_model(seed=1),
        args=dpo_config(tmp_path, **settings),
        train_dataset=ROWS,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[recorder],
    )
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.guards"):
        trainer.train()
    assert trainer.state.global_step == settings["max_steps"]
    assert "gradient norm is exactly 0" not in caplog.text
    if settings.get("loss_type") != "hinge":
        assert not recorder.steps


def test_pairs_with_identical_responses_do_not_trip_the_collapse_rule(tmp_path, make_model, tokenizer):
    # Their loss is ln 2 and their gradients cancel: here up to rounding (norms ~1e-7), with other kernels
    # exactly; the flat logits make it exact. A data problem, warned about at preparation, not a dead model.
    same = [{**row, "rejected": row["chosen"]} for row in ROWS[:12]]
    trainer = DPOTrainer(
        make_model(seed=1),
        args=dpo_config(tmp_path, max_steps=6, per_device_train_batch_size=2),
        train_dataset=same,
        processing_class=tokenizer,
        callbacks=[FlatLogitsFrom(start=1)],
    )
    trainer.train()
    assert trainer.state.global_step == 6
    assert [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry] == [0.0] * 6
