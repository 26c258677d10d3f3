"""Trainer callbacks: TR-DPO's reference updates (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
Good Alignment", arXiv 2404.09656).

TR-DPO keeps DPO's loss but lets the reference follow the policy: every τ optimizer steps the reference
becomes ``α·θ + (1 − α)·θ_ref`` (soft update; ``α = 1`` is the hard update, a copy). As in TRL 1.16
(`trl.trainer.callbacks.SyncRefModelCallback`), the update mixes parameters (not buffers) after the optimizer
step whose number is a multiple of τ (`ref_model_sync_steps`), with α = `ref_model_mixup_alpha`.

With a PEFT adapter the reference is the policy with its adapter disabled, the frozen base model; there is no
separate reference to update, and TRL 1.16 refuses `sync_ref_model` there. So do we: a value error says so.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from .logprobs import unwrap

__all__ = ["SyncRefModelCallback", "mix_into"]


def _paired_parameters(reference: nn.Module, policy: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference parameter, policy parameter) pairs by name; a value error when the models differ."""
    reference_params, policy_params = dict(reference.named_parameters()), dict(policy.named_parameters())
    if reference_params.keys() != policy_params.keys():
        missing = sorted(reference_params.keys() ^ policy_params.keys())[:3]
        raise ValueError(
            f"sync_ref_model: the reference and the policy have different parameters, e.g. {missing}"
        )
    for name, target in reference_params.items():
        if policy_params[name].shape != target.shape:
            raise ValueError(
                f"sync_ref_model: parameter {name} has shape {tuple(policy_params[name].shape)} in the policy and "
                f"{tuple(target.shape)} in the reference"
            )
    return [(target, policy_params[name]) for name, target in reference_params.items()]


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """In place: each reference parameter becomes ``alpha * policy + (1 - alpha) * reference`` (TR-DPO's soft update).

    Parameters are paired by name; the two models must have the same parameter names and shapes. The policy's
    values are cast to the reference's dtype and device.
    """
    for target, source in _paired_parameters(reference, policy):
        target.mul_(1.0 - alpha).add_(
            source.detach().to(device=target.device, dtype=target.dtype), alpha=alpha
        )


class SyncRefModelCallback(TrainerCallback):
    """Every ``sync_steps`` optimizer steps, mix the policy into ``ref_model``: θ_ref ← α·θ + (1 − α)·θ_ref.

    Args:
        ref_model: the separate reference model (a plain module, as `DPOTrainer` places it without an engine).
        alpha: TR-DPO's α in (0, 1]; 1 copies the policy.
        sync_steps: TR-DPO's τ, optimizer steps between updates (>= 1).
        accelerator: unwraps the policy (DDP) when given.
    """

    def __init__(self, ref_model: nn.Module, *, alpha: float, sync_steps: int, accelerator=None):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {alpha}")
        if not isinstance(sync_steps, int) or sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be a positive integer, got {sync_steps!r}")
        self.ref_model, self.alpha, self.sync_steps, self.accelerator = (
            ref_model,
            alpha,
            sync_steps,
            accelerator,
        )

    @classmethod
    def for_trainer(cls, trainer) -> SyncRefModelCallback:
        """The callback for a `DPOTrainer` built with `sync_ref_model=True`; a clear error where it cannot apply."""
        args = trainer.args
        if trainer.ref_model is None:
            raise ValueError(
                "sync_ref_model=True needs a separate reference model to update. With a PEFT adapter the reference "
                "is the base model with the adapter disabled (as in TRL, which refuses this combination too); "
                "with precompute_ref_log_probs the reference log-probs are fixed. Train without sync_ref_model, "
                "or fully fine-tune."
            )
        state = trainer.accelerator.state
        if (
            getattr(state, "deepspeed_plugin", None) is not None
            or getattr(state, "fsdp_plugin", None) is not None
        ):
            raise ValueError(
                "sync_ref_model=True is supported without DeepSpeed and FSDP only (the reference there is an "
                "engine-managed or sharded copy); run it under DDP or on one device."
            )
        _paired_parameters(unwrap(trainer.ref_model), unwrap(trainer.model))  # same architecture, checked now
        return cls(
            trainer.ref_model,
            alpha=args.ref_model_mixup_alpha,
            sync_steps=args.ref_model_sync_steps,
            accelerator=trainer.accelerator,
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.sync_steps != 0:
            return
        policy = self.accelerator.unwrap_model(model) if self.accelerator is not None else model
        mix_into(unwrap(self.ref_model), unwrap(policy), self.alpha)
