"""Checks that stop a diverging run loudly instead of training on (and saving) NaN weights.

`DPOTrainer` flags each micro-step's loss and reference log-probs on the device (no host sync), and reads
the flags once per optimizer step together with the gradient norm (`DPOConfig.on_nonfinite`): `raise`
stops with `NonFiniteError` naming the step before the optimizer applies anything; `skip` drops that
step's gradients (no optimizer update at all) and goes on. Checkpoints are refused from non-finite weights.

fp16 loss scaling (torch's `GradScaler`, DeepSpeed's fp16 engine) overflows on purpose: the scaler starts high
(2**16), skips each step whose scaled gradients hold an inf/NaN and lowers its scale (halves it), so the first
steps, and one after each raise of the scale, report an infinite gradient norm. Such a step is not divergence:
the guard counts it (`scaler_skipped_steps` in the logs) and training goes on, whatever `on_nonfinite` says.
Divergence is still caught: a loss non-finite before scaling is flagged per micro-step as without a scaler, and
a scale that keeps falling stops training with `NonFiniteError` once it is below `MIN_LOSS_SCALE` or the
scaler has skipped `MAX_SCALER_SKIPS_IN_A_ROW` steps in a row (the backward then overflows at any scale).

Reference log-probs are sums of log-probabilities, so they are finite and <= 0 (up to float rounding,
`REFERENCE_SLACK`), whether they come from a live model, a precomputed column or the on-disk cache.

A run can also collapse without a NaN: after too large a step (e.g. `examples/hh.py --learning_rate 10000` on
some CPUs; others give NaN) the activations saturate, the logits go flat and the model passes no gradient at
all, while the loss stays well above 0 and training would go on "successfully" for ever. A pair whose loss is
not ~0 (`MIN_LIVE_LOSS`) and whose responses differ has a non-zero gradient with respect to the policy's
log-probs, so a model that still computes something gives a non-zero gradient norm; a gradient norm of exactly
0.0 for `ZERO_GRADIENT_STEPS` optimizer steps in a row while such pairs are in every one of them stops
training with `CollapseError` (whatever `on_nonfinite` says: skipping cannot revive a dead model). Pairs whose
responses are identical (their reference log-probs tie, `REFERENCE_TIE`) are left out: their gradients cancel
exactly, and a batch made only of them is a data problem that `data.prepare` warns about, not a dead model.
No bound on the log-ratios β·log(π/π_ref) is used: flat logits give log π = -log(vocabulary size) per token, a
fall of a few nats per token from a pretrained model, which long or overtrained healthy DPO runs also reach on
their rejected responses (their log-probs keep falling); a bound loose enough for those misses the collapse.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from ._compat import deepspeed_fp16_overflow, grad_scaler_found_inf

logger = logging.getLogger(__name__)

ON_NONFINITE = ("raise", "skip")
# log p <= 0 exactly; a float32 sum over a long response may round a hair above it
REFERENCE_SLACK = 1e-3
# A loss scale has collapsed below float16's smallest positive value: every gradient under 1 then flushes to
# zero, so no scale is left to try. From torch's start of 2**16 that takes 42 skipped steps in a row; a healthy
# run stops skipping once the scale fits, far above that.
MIN_LOSS_SCALE = 2.0**-24
# ...or the scale stays put and every step is skipped: DeepSpeed's may start at 2**32 (33 overflows in a row
# bring it to 1, where by default DeepSpeed stops the run itself) or be pinned at its `min_loss_scale`.
MAX_SCALER_SKIPS_IN_A_ROW = 64
# A pair whose loss is at least this has a non-zero gradient with respect to the policy's log-probs that no
# float32 backward underflows (the sigmoid loss -log σ(z) = 1e-3 has slope ≈ 1e-3); smaller losses are left out,
# as a saturated-but-healthy run (every margin huge) may see its gradients underflow to exactly 0.
MIN_LIVE_LOSS = 1e-3
# Optimizer steps in a row with a gradient norm of exactly 0 and such pairs in each: one such step can be a
# fluke of a hook or an injected zero; three cannot. The collapse reported in issue 20 shows 0.0 at every step.
ZERO_GRADIENT_STEPS = 3
# Reference log-probs of a pair's responses that agree within this fraction of their size (at least 1 nat)
# are a tie: identical responses, computed in different rows, agree only up to float rounding (~1e-7).
REFERENCE_TIE = 1e-4


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient norm or weight (or invalid reference log-probs)."""


class CollapseError(NonFiniteError):
    """Training collapsed with finite numbers: the model passes no gradient while its loss is not ~0 (module
    docstring). A subclass of `NonFiniteError`, so that one `except` catches every kind of divergence."""


def largest_live_loss(losses: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The largest |loss| of a pair that must have a gradient, or 0.0: a 0-dim float tensor, no host sync.

    `losses`: (B,); `reference`: (B, K) reference log-probs, whose responses tie (identical responses) or not.
    A pair counts if its |loss| >= `MIN_LIVE_LOSS` and its reference log-probs do not tie (`REFERENCE_TIE`);
    with shapes the trainer does not make (a subclass's `dpo_loss`), the loss alone decides.
    """
    losses, reference = losses.detach().float(), reference.detach().float().to(losses.device)
    live = torch.isfinite(losses) & (losses.abs() >= MIN_LIVE_LOSS)
    if reference.dim() == 2 and losses.shape == reference.shape[:1]:
        spread = reference.amax(-1) - reference.amin(-1)
        live = live & (spread > REFERENCE_TIE * reference.abs().amax(-1).clamp_min(1.0))
    zero = torch.zeros(1, device=losses.device)
    return torch.cat([torch.where(live, losses.abs(), 0.0).reshape(-1), zero]).amax()


def invalid_reference(values: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on `values`' device: True if any value is non-finite or above 0 (plus slack)."""
    values = values.detach()
    return ~torch.isfinite(values).all() | (values > REFERENCE_SLACK).any()


def reference_problem(values: torch.Tensor) -> str | None:
    """What is wrong with a (rows, K) table of reference log-probs, or None. Names the first bad row."""
    if not values.dtype.is_floating_point:
        return f"dtype {values.dtype} is not a floating-point type"
    values = values.detach().float()
    finite = torch.isfinite(values)
    if not finite.all():
        row = (
            int((~finite).any(dim=-1).nonzero()[0, 0]) if values.dim() > 1 else int((~finite).nonzero()[0, 0])
        )
        return f"row {row} holds a non-finite value ({values[row].tolist()})"
    above = values > REFERENCE_SLACK
    if above.any():
        row = int(above.any(dim=-1).nonzero()[0, 0]) if values.dim() > 1 else int(above.nonzero()[0, 0])
        return f"row {row} holds a log-probability above 0 ({values[row].tolist()})"
    return None


def nonfinite_parameters(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of up to `limit` parameters of `model` (local shards, if sharded) holding a NaN or inf."""
    named = []
    for name, parameter in model.named_parameters():
        local = parameter.detach()
        local = local.to_local() if hasattr(local, "to_local") else local  # an FSDP2 shard
        if local.numel() and local.dtype.is_floating_point:  # ZeRO-3 leaves empty placeholders
            named.append((name, local))
    if not named:
        return []
    flags = torch.stack([~torch.isfinite(p).all() for _, p in named]).cpu().tolist()
    return [name for (name, _), bad in zip(named, flags) if bad][:limit]


class StepGuard:
    """The trainer's divergence guard: device flags per micro-step, one decision per optimizer step.

    `flag(mode, losses, reference)` folds a micro-step into flags [loss non-finite, reference invalid, largest
    loss of a pair that must have a gradient] without a host sync. `check(model, grad_norm, step, accelerator)`
    reads the training flags, the gradient norm and the fp16 loss scaler's verdict once (gathered over
    processes, so every process decides alike) and raises, or drops the step's gradients when
    `on_nonfinite="skip"` (the optimizer skips parameters without a gradient). A step the loss scaler skips is
    counted, not judged; a gradient norm of exactly 0 under live pairs `ZERO_GRADIENT_STEPS` steps in a row
    raises `CollapseError` (module docstring).
    """

    def __init__(self, on_nonfinite: str, device):
        self.on_nonfinite, self.device = on_nonfinite, device
        self.flags: dict[str, torch.Tensor] = {}
        self.skipped_steps = 0
        self.scaler_skipped_steps = 0
        self.scaler_skips_in_a_row = 0
        self.zero_gradient_steps: list[tuple[int, float]] = []  # (step, largest live loss), in a row

    def log_fields(self) -> dict[str, int]:
        """What the guard adds to the training logs: the steps it and the loss scaler skipped, if any."""
        fields = {
            "nonfinite_skipped_steps": self.skipped_steps,
            "scaler_skipped_steps": self.scaler_skipped_steps,
        }
        return {name: count for name, count in fields.items() if count}

    def check_engine(self, deepspeed: bool) -> None:
        """Refuse `skip` under DeepSpeed, whose engine applies the gradients itself."""
        if self.on_nonfinite == "skip" and deepspeed:
            raise ValueError(
                "DPOConfig.on_nonfinite='skip' is not available under DeepSpeed, whose engine applies the "
                "gradients itself; use on_nonfinite='raise'."
            )

    def flag(self, mode: str, losses: torch.Tensor, reference: torch.Tensor) -> None:
        flags = torch.stack(
            [
                (~torch.isfinite(losses.detach()).all()).float(),
                invalid_reference(reference).float().to(losses.device),
                largest_live_loss(losses, reference),
            ]
        )
        current = self.flags.get(mode)
        self.flags[mode] = flags if current is None else torch.maximum(current, flags)

    def reference_was_invalid(self, mode: str) -> bool:
        """Whether any batch of `mode` since the last call had invalid reference log-probs (one host sync)."""
        flags = self.flags.pop(mode, None)
        return flags is not None and bool(flags[1])

    def check(self, model: nn.Module, grad_norm, step: int, accelerator) -> None:
        flags = self.flags.pop("train", None)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
            grad_norm = grad_norm.full_tensor()
        # DeepSpeed gives None where it computed no norm: unknown, so never "exactly 0"
        norm = torch.as_tensor(math.nan if grad_norm is None else grad_norm, dtype=torch.float32).reshape(1)
        device = flags.device if flags is not None else self.device
        flags = torch.zeros(3, device=device) if flags is None else flags
        scaler_skips, scale = loss_scaler_verdict(accelerator, device)
        norm = norm.to(device)
        values = torch.cat(
            [
                flags,
                (~torch.isfinite(norm)).float() * (grad_norm is not None),
                (norm == 0).float(),
                scaler_skips.reshape(1),
            ]
        )
        if accelerator.num_processes > 1:  # (processes, 6): flags are summed, the largest live loss is a max
            values = accelerator.gather(values).reshape(accelerator.num_processes, -1)
            values = torch.cat([values.sum(0)[:2], values.amax(0)[2:3], values.sum(0)[3:]])
        loss_bad, reference_bad, live_loss, norm_bad, norm_zero, scaler_skipped = values.tolist()
        if reference_bad:
            raise NonFiniteError(
                f"Step {step}: reference log-probs that are not finite or above 0 (a log-probability is <= 0); "
                "the reference model or the precomputed values are broken."
            )
        if scaler_skipped and not loss_bad:  # the scaler applies nothing and lowers its scale
            self.count_scaler_skip(step, scale())
            return
        if not (loss_bad or norm_bad):
            self.scaler_skips_in_a_row = 0
            self.count_zero_gradient(step, live_loss if norm_zero else 0.0)
            return
        what = " and ".join(
            name for name, bad in (("loss", loss_bad), (f"gradient norm ({float(norm)})", norm_bad)) if bad
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"Training diverged at step {step}: non-finite {what}. The optimizer did not apply this step, so "
                f"the weights (and every checkpoint) are those of step {step - 1}. Lower the learning rate, or "
                "set DPOConfig(on_nonfinite='skip') to skip such steps."
            )
        for parameter in model.parameters():
            parameter.grad = None
        self.skipped_steps += 1
        logger.warning("Step %d: non-finite %s; step skipped (no optimizer update).", step, what)

    def count_zero_gradient(self, step: int, live_loss: float) -> None:
        """Count a step whose gradient norm is exactly 0 while a pair's loss `live_loss` (> 0) asks for a
        gradient; raise `CollapseError` at `ZERO_GRADIENT_STEPS` in a row. `live_loss` 0.0: a healthy step."""
        if not live_loss:
            self.zero_gradient_steps.clear()
            return
        self.zero_gradient_steps.append((step, live_loss))
        if len(self.zero_gradient_steps) < ZERO_GRADIENT_STEPS:
            logger.warning(
                "Step %d: the gradient norm is exactly 0 while pairs have a loss up to %.4g; %d such steps in a "
                "row stop training (the model would be passing no gradient: collapsed).",
                step,
                live_loss,
                ZERO_GRADIENT_STEPS,
            )
            return
        first = self.zero_gradient_steps[0][0]
        losses = ", ".join(f"{loss:.4g}" for _, loss in self.zero_gradient_steps)
        raise CollapseError(
            f"Training collapsed at step {step}: the gradient norm was exactly 0.0 at steps {first}-{step} while "
            f"pairs whose responses differ had losses up to {losses} (a loss that is not ~0 always has a gradient). "
            "The model passes no gradient any more (saturated activations, flat logits, exploded weights: what a "
            "too large learning rate leaves when it does not give NaN), and training would go on without learning. "
            f"The optimizer did not apply step {step}; the weights were already broken before step {first}, so "
            "start again from an earlier checkpoint with a lower learning rate."
        )

    def count_scaler_skip(self, step: int, scale: float) -> None:
        """Count a step the fp16 loss scaler skips; raise once its scale has collapsed (`MIN_LOSS_SCALE`,
        `MAX_SCALER_SKIPS_IN_A_ROW`)."""
        self.scaler_skipped_steps += 1
        self.scaler_skips_in_a_row += 1
        in_a_row = self.scaler_skips_in_a_row
        if scale < MIN_LOSS_SCALE or in_a_row >= MAX_SCALER_SKIPS_IN_A_ROW:
            raise NonFiniteError(
                f"Training diverged at step {step}: the fp16 loss scaler skipped {in_a_row} steps in a row and its "
                f"scale fell to {scale:g}; the loss is finite but its gradients are not at any scale. No update was "
                f"applied after step {step - in_a_row}. Lower the learning rate, or train in bf16 or float32."
            )
        logger.info(
            "Step %d: the fp16 loss scaler skips the step (inf/NaN in the scaled gradients); scale %g.",
            step,
            scale,
        )


def loss_scaler_verdict(accelerator, device) -> tuple[torch.Tensor, Callable[[], float]]:
    """Whether the fp16 loss scaler skips this optimizer step (a 0-dim float tensor on `device`, 1.0 if so; no
    host sync), and a function giving its scale.

    torch's `GradScaler` (accelerate's `Accelerator.scaler`) has unscaled the gradients when the trainer took
    their norm and decides at the coming `optimizer.step()`; DeepSpeed's engine has already stepped.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        found = grad_scaler_found_inf(scaler)
        if found is not None:
            return (found > 0).float().to(device), scaler.get_scale
    deepspeed = deepspeed_fp16_overflow(accelerator)
    skipped, scale = deepspeed if deepspeed is not None else (False, 1.0)
    return torch.full((), float(skipped), device=device), lambda: scale


def check_finite_before_save(model: nn.Module, output_dir: str, step: int) -> None:
    """Never write a checkpoint or a model from NaN / inf weights (this process's shards, if sharded)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"Refusing to save to {output_dir} at step {step}: non-finite weights in {', '.join(bad)}."
        )
