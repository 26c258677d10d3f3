"""Checks that stop a diverging run loudly instead of training on (and saving) NaN weights.

`DPOTrainer` flags each micro-step's loss and reference log-probs on the device (no host sync), and reads
the flags once per optimizer step together with the gradient norm (`DPOConfig.on_nonfinite`): `raise`
stops with `NonFiniteError` naming the step before the optimizer applies anything; `skip` drops that
step's gradients (no optimizer update at all) and goes on. Checkpoints are refused from non-finite weights.

Reference log-probs are sums of log-probabilities, so they are finite and <= 0 (up to float rounding,
`REFERENCE_SLACK`), whether they come from a live model, a precomputed column or the on-disk cache.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

ON_NONFINITE = ("raise", "skip")
# log p <= 0 exactly; a float32 sum over a long response may round a hair above it
REFERENCE_SLACK = 1e-3


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient norm or weight (or invalid reference log-probs)."""


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

    `flag(mode, losses, reference)` ORs a micro-step's problems into flags [loss non-finite, reference
    invalid] without a host sync. `check(model, grad_norm, step, accelerator)` reads the training flags and
    the gradient norm once (summed over processes, so every process decides alike) and raises, or drops the
    step's gradients when `on_nonfinite="skip"` (the optimizer skips parameters without a gradient).
    """

    def __init__(self, on_nonfinite: str, device):
        self.on_nonfinite, self.device = on_nonfinite, device
        self.flags: dict[str, torch.Tensor] = {}
        self.skipped_steps = 0

    def check_engine(self, deepspeed: bool) -> None:
        """Refuse `skip` under DeepSpeed, whose engine applies the gradients itself."""
        if self.on_nonfinite == "skip" and deepspeed:
            raise ValueError(
                "DPOConfig.on_nonfinite='skip' is not available under DeepSpeed, whose engine applies the "
                "gradients itself; use on_nonfinite='raise'."
            )

    def flag(self, mode: str, losses: torch.Tensor, reference: torch.Tensor) -> None:
        flags = torch.stack([~torch.isfinite(losses.detach()).all(), invalid_reference(reference)])
        current = self.flags.get(mode)
        self.flags[mode] = flags if current is None else current | flags

    def reference_was_invalid(self, mode: str) -> bool:
        """Whether any batch of `mode` since the last call had invalid reference log-probs (one host sync)."""
        flags = self.flags.pop(mode, None)
        return flags is not None and bool(flags[1])

    def check(self, model: nn.Module, grad_norm, step: int, accelerator) -> None:
        flags = self.flags.pop("train", None)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32).reshape(1)
        device = flags.device if flags is not None else self.device
        flags = torch.zeros(2, dtype=torch.bool, device=device) if flags is None else flags
        values = torch.cat([flags.float(), (~torch.isfinite(norm.to(device))).float()])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        loss_bad, reference_bad, norm_bad = (value > 0 for value in values.tolist())
        if reference_bad:
            raise NonFiniteError(
                f"Step {step}: reference log-probs that are not finite or above 0 (a log-probability is <= 0); "
                "the reference model or the precomputed values are broken."
            )
        if not (loss_bad or norm_bad):
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


def check_finite_before_save(model: nn.Module, output_dir: str, step: int) -> None:
    """Never write a checkpoint or a model from NaN / inf weights (this process's shards, if sharded)."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"Refusing to save to {output_dir} at step {step}: non-finite weights in {', '.join(bad)}."
        )
