"""Checks that stop a diverging run loudly instead of training on (and saving) NaN weights.

`DPOTrainer` flags each micro-step's loss and reference log-probs on the device (no host sync), and reads
the flags once per optimizer step together with the gradient norm (`DPOConfig.on_nonfinite`): `raise`
stops with `NonFiniteError` naming the step before the optimizer applies anything; `skip` drops that
step's gradients (no optimizer update at all) and goes on. Checkpoints are refused from non-finite weights.

Reference log-probs are sums of log-probabilities, so they are finite and <= 0 (up to float rounding,
`REFERENCE_SLACK`), whether they come from a live model, a precomputed column or the on-disk cache.
"""

from __future__ import annotations

import torch
from torch import nn

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
