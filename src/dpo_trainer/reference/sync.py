"""The reference that follows the policy: TR-DPO's reference updates (Gorbatovski et al. 2024, "Learn Your
Reference Model for Real Good Alignment", arXiv 2404.09656) and the frozen reference adapter they mix (added,
mixed, loaded on resume), which also serves as π_ref of a `PeftModel` given with its trained adapter.

TR-DPO keeps DPO's loss but lets the reference follow the policy: every τ optimizer steps the reference
becomes ``α·θ + (1 − α)·θ_ref`` (soft update; ``α = 1`` is the hard update, a copy). As in TRL 1.16
(`trl.trainer.callbacks.SyncRefModelCallback`), the update mixes parameters (not buffers) after the optimizer
step whose number is a multiple of τ (`ref_model_sync_steps`), with α = `ref_model_mixup_alpha`.

With a PEFT adapter (LoRA and the like) and no separate `ref_model`, TRL 1.16 refuses `sync_ref_model`; we
support it without a second copy of the base weights. The reference is a second adapter on the same base
model, named `REFERENCE_ADAPTER` ("reference"):

  * it is added when the trainer is built (`SyncRefModelCallback.for_trainer`, before the optimizer exists) as
    a copy of the policy's active adapter at that moment, so π_ref starts equal to the policy, as the frozen
    copy of full fine-tuning does; for a freshly initialised LoRA (B = 0) that is the base model. An adapter
    already named "reference" on the model is kept as the starting reference instead;
  * it is frozen (`requires_grad=False`), so it is never given to the optimizer and only the syncs change it;
  * every τ optimizer steps its parameters become ``α·θ + (1 − α)·θ_ref``, paired by name with the policy's
    adapter parameters: `lora_A`, `lora_B`, and every other adapter parameter (DoRA magnitudes, the per-adapter
    copies of `modules_to_save`, ...);
  * `scoring.reference_logps` scores with it (switched on under `no_grad`, in eval mode, the policy's
    adapter and its `requires_grad` flags restored afterwards) instead of disabling the adapter;
  * `save_pretrained` writes the policy's adapter as before (the top-level `adapter_model.safetensors`,
    loaded by `PeftModel.from_pretrained`) and the reference into a `reference/` subfolder; resuming from a
    checkpoint (`Trainer` loads each adapter subfolder) restores it.

α = 1 (the hard update) makes the reference exactly the policy. For α < 1 the update mixes the LoRA factors,
A_ref ← α·A + (1 − α)·A_ref and B_ref ← α·B + (1 − α)·B_ref, which is *not* the mix of the weight updates:
the weight delta B·A is bilinear in the factors, and the new reference's delta is
α·B·A + (1 − α)·B_ref·A_ref − α(1 − α)·(B − B_ref)(A − A_ref). So for α < 1 the reference is not the
paper's α·θ + (1 − α)·θ_ref in weight space, only in the adapter's parameters; the two agree only while
the policy and the reference differ in one factor (e.g. when A is not trained). A `modules_to_save` copy
is a whole module, mixed exactly as in full fine-tuning; DoRA's magnitude is mixed like any other parameter.

Refused with a value error: DeepSpeed and FSDP (an engine-managed or sharded reference), the precomputed
reference log-probs of `precompute_ref_log_probs` (fixed before training), prompt-learning PEFT methods
(no adapter weights in the layers to copy) and several active adapters.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import TrainerCallback

from ..models import is_peft_model, unwrap, unwrap_to_peft

__all__ = [
    "REFERENCE_ADAPTER",
    "SyncRefModelCallback",
    "add_reference_adapter",
    "load_reference_adapter",
    "mix_into",
    "mix_reference_adapter",
]

# The name of the frozen reference adapter that TR-DPO with a PEFT policy adds beside the policy's adapter.
REFERENCE_ADAPTER = "reference"


def _pair_by_name(
    reference: dict, policy: dict, names: tuple[str, str]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference tensor, policy tensor) pairs of two name -> parameter dicts; a value error naming the first
    differences when they do not hold the same names and shapes. `names`: what the two are, for the message."""
    if reference.keys() != policy.keys():
        different = sorted(reference.keys() ^ policy.keys())[:3]
        raise ValueError(
            f"sync_ref_model: {names[0]} and {names[1]} have different parameters, e.g. {different}"
        )
    for name, target in reference.items():
        if policy[name].shape != target.shape:
            raise ValueError(
                f"sync_ref_model: parameter {name} has shape {tuple(policy[name].shape)} in {names[1]} and "
                f"{tuple(target.shape)} in {names[0]}"
            )
    return [(target, policy[name]) for name, target in reference.items()]


def _paired_parameters(reference: nn.Module, policy: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference parameter, policy parameter) pairs by name; a value error when the models differ."""
    pairs = (dict(reference.named_parameters()), dict(policy.named_parameters()))
    return _pair_by_name(*pairs, ("the reference", "the policy"))


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """In place: each reference parameter becomes ``alpha * policy + (1 - alpha) * reference`` (TR-DPO's soft update).

    Parameters are paired by name; the two models must have the same parameter names and shapes. The policy's
    values are cast to the reference's dtype and device.
    """
    _mix(_paired_parameters(reference, policy), alpha)


@torch.no_grad()
def _mix(pairs: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    for target, source in pairs:
        target.mul_(1.0 - alpha).add_(
            source.detach().to(device=target.device, dtype=target.dtype), alpha=alpha
        )


def _policy_adapter(peft_model: nn.Module, reason: str = "sync_ref_model=True") -> str:
    """The name of the PEFT model's single active adapter; a value error for several."""
    active = getattr(peft_model, "active_adapters", None)
    active = [active] if isinstance(active, str) else list(active or [peft_model.active_adapter])
    if len(active) != 1:
        raise ValueError(
            f"{reason} with a PEFT policy needs exactly one active adapter to train, got {active}."
        )
    return active[0]


def _adapter_pairs(peft_model: nn.Module, policy_adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference adapter parameter, policy adapter parameter) pairs, by name with the adapter name replaced.

    A parameter belongs to an adapter when one component of its dotted name is the adapter's name (peft keys
    each adapter's weights by its name: `...q_proj.lora_A.default.weight`, `...lm_head.modules_to_save.default
    .weight`). A value error when the two adapters do not have the same parameters and shapes.
    """

    def by_adapter(adapter: str) -> dict[str, torch.Tensor]:
        found = {}
        for name, param in peft_model.named_parameters():
            parts = name.split(".")
            if adapter in parts:
                found[".".join("<adapter>" if part == adapter else part for part in parts)] = param
        return found

    reference, policy = by_adapter(REFERENCE_ADAPTER), by_adapter(policy_adapter)
    if not policy:
        raise ValueError(
            f"sync_ref_model: the policy's adapter {policy_adapter!r} has no parameters to copy."
        )
    return _pair_by_name(reference, policy, (f"adapter {REFERENCE_ADAPTER!r}", f"adapter {policy_adapter!r}"))


def add_reference_adapter(peft_model: nn.Module, reason: str = "sync_ref_model=True") -> str:
    """Add the frozen adapter `REFERENCE_ADAPTER`, a copy of the policy's active adapter; its name is returned.

    The copy has the policy adapter's config (`inference_mode=True`), values, dtypes and devices. An adapter
    already named `REFERENCE_ADAPTER` is kept as it is (after checking it pairs with the policy's). Every
    other parameter keeps its `requires_grad`; the reference's parameters are frozen. `reason` names what
    asks for the copy in error messages (TR-DPO's sync, or a `PeftModel` given with its trained adapter).
    """
    policy_adapter = _policy_adapter(peft_model, reason)
    if policy_adapter == REFERENCE_ADAPTER:
        raise ValueError(
            f"{reason}: the reference is a frozen adapter named {REFERENCE_ADAPTER!r}, which is the name of the "
            "policy's adapter; give the policy's adapter another name."
        )
    config = peft_model.peft_config[policy_adapter]
    if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        hint = (
            ""
            if reason.startswith("sync_ref_model")
            else " Pass DPOConfig(peft_reference='base') or a ref_model."
        )
        raise ValueError(
            f"{reason}: the reference is a frozen copy of the adapter, which needs an adapter with weights in "
            f"the model's layers (LoRA and the like); {type(config).__name__} is not supported.{hint}"
        )
    flags = {name: param.requires_grad for name, param in peft_model.named_parameters()}
    created = REFERENCE_ADAPTER not in peft_model.peft_config
    if created:
        reference_config = copy.deepcopy(config)
        reference_config.inference_mode = True
        peft_model.add_adapter(REFERENCE_ADAPTER, reference_config)
    pairs = _adapter_pairs(peft_model, policy_adapter)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():  # add_adapter may change them
            if name in flags:
                param.requires_grad_(flags[name])
        for target, source in pairs:
            if created:
                target.data = source.detach().clone()
            target.requires_grad_(False)
    return policy_adapter


@torch.no_grad()
def mix_reference_adapter(peft_model: nn.Module, alpha: float, policy_adapter: str | None = None) -> None:
    """In place: each parameter of the `REFERENCE_ADAPTER` adapter becomes ``alpha * policy + (1 - alpha) * it``.

    The policy's parameters are those of `policy_adapter` (default: the active adapter), paired by name. This
    mixes LoRA's factors A and B separately, which for alpha < 1 is not the mix of the weight updates B·A.
    """
    _mix(_adapter_pairs(peft_model, policy_adapter or _policy_adapter(peft_model)), alpha)


def load_reference_adapter(peft_model: nn.Module, checkpoint: str) -> bool:
    """Load the reference adapter's weights saved in `checkpoint` (`<checkpoint>/reference/`) into `peft_model`,
    if both have it; True when loaded. Resuming needs this: Trainer reloads only the active adapter in some
    transformers versions (5.3-5.20 at least), which would leave the reference as it was built."""
    path = os.path.join(checkpoint, REFERENCE_ADAPTER, "adapter_model.safetensors")
    if REFERENCE_ADAPTER not in getattr(peft_model, "peft_config", {}) or not os.path.exists(path):
        return False
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(path), adapter_name=REFERENCE_ADAPTER)
    for name, parameter in peft_model.named_parameters():
        if REFERENCE_ADAPTER in name.split("."):
            parameter.requires_grad_(False)
    return True


class SyncRefModelCallback(TrainerCallback):
    """Every ``sync_steps`` optimizer steps, mix the policy into the reference: θ_ref ← α·θ + (1 − α)·θ_ref.

    Args:
        ref_model: the separate reference model (a plain module, as `DPOTrainer` places it without an engine),
            or None with a PEFT policy: its `REFERENCE_ADAPTER` adapter is then the reference
            (`add_reference_adapter`), mixed with the adapter `policy_adapter`.
        alpha: TR-DPO's α in (0, 1]; 1 copies the policy.
        sync_steps: TR-DPO's τ, optimizer steps between updates (>= 1).
        accelerator: unwraps the policy (DDP) when given.
        policy_adapter: with `ref_model=None`, the policy's adapter (default: the active one at each sync).
    """

    def __init__(
        self,
        ref_model: nn.Module | None,
        *,
        alpha: float,
        sync_steps: int,
        accelerator=None,
        policy_adapter: str | None = None,
    ):
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
        self.policy_adapter = policy_adapter

    @classmethod
    def for_trainer(cls, trainer) -> SyncRefModelCallback:
        """The callback for a `DPOTrainer` built with `sync_ref_model=True`; a clear error where it cannot apply."""
        args = trainer.args
        if args.precompute_ref_log_probs:
            raise ValueError(
                "sync_ref_model=True updates the reference during training, but with precompute_ref_log_probs=True "
                "the reference log-probs are computed once before training; set one of them off."
            )
        peft_model = unwrap_to_peft(trainer.model)
        if trainer.ref_model is None and not is_peft_model(peft_model):
            raise ValueError(
                "sync_ref_model=True needs a reference to update: a separate reference model (full fine-tuning "
                "makes a frozen copy of the policy) or a PEFT policy (the reference is then a second adapter)."
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
        if trainer.ref_model is None:  # a PEFT policy: the reference is a frozen copy of its adapter
            return cls(
                None,
                alpha=args.ref_model_mixup_alpha,
                sync_steps=args.ref_model_sync_steps,
                accelerator=trainer.accelerator,
                policy_adapter=add_reference_adapter(peft_model),
            )
        _paired_parameters(unwrap(trainer.ref_model), unwrap(trainer.model))  # same architecture, checked now
        return cls(
            trainer.ref_model,
            alpha=args.ref_model_mixup_alpha,
            sync_steps=args.ref_model_sync_steps,
            accelerator=trainer.accelerator,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # The reference adapter stays frozen whatever loaded it (a resumed checkpoint's adapters included).
        if self.ref_model is None and model is not None:
            peft_model = unwrap_to_peft(self._unwrap(model))
            for target, _ in _adapter_pairs(peft_model, self.policy_adapter or _policy_adapter(peft_model)):
                target.requires_grad_(False)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.sync_steps != 0:
            return
        policy = self._unwrap(model)
        if self.ref_model is None:
            mix_reference_adapter(unwrap_to_peft(policy), self.alpha, self.policy_adapter)
        else:
            mix_into(unwrap(self.ref_model), unwrap(policy), self.alpha)

    def _unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model
