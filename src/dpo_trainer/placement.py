"""Placing a frozen model the way the training engine places the policy: DeepSpeed, FSDP2 or plain devices.

The policy is prepared by `transformers.Trainer` through accelerate when training starts. A reference
model (a separate frozen model, or a prepared view of the policy used to precompute reference log-probs)
is never given to an optimizer, so it is prepared here instead, as TRL does (`trl.models.utils`):

  * DeepSpeed: an inference engine built from a copy of the run's DeepSpeed config without optimizer,
    scheduler or optimizer offload. Under ZeRO-3 the reference is partitioned like the policy (buckets
    sized for its hidden size); under ZeRO 0-2 it is replicated on every device (stage 0).
  * FSDP2: `fully_shard` with accelerate's own recipe for the policy (`fsdp2_prepare_model`: the same
    transformer-layer wrapping, device mesh, mixed precision and CPU offload).
  * Anything else: accelerate's evaluation-mode preparation (device placement and the run's autocast).

Under FSDP1 the reference is replicated whole on every device, with a warning.

Evaluating before training (`evaluating_before_training`, `policy_prepared`) scores with the policy placed
the same way (`policy_as_reference`), since Trainer's own preparation for evaluation would break training.
"""

from __future__ import annotations

import contextlib
import copy
import logging

from torch import nn

from ._compat import accelerate_prepared, deepspeed_engine, standing_in_for_policy, unregister_prepared
from .models import hidden_size, is_fsdp2, is_fsdp_module

logger = logging.getLogger(__name__)

# DeepSpeed settings that transformers fills from the policy when training starts ("auto"); the reference
# engine is built earlier, so they are sized here (ZeRO-3) or left to DeepSpeed's defaults.
_MODEL_SIZED_ZERO_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)


def deepspeed_inference_config(ds_config: dict, model: nn.Module) -> dict:
    """The run's DeepSpeed config for a model that is only evaluated (no optimizer ever sees it)."""
    config = copy.deepcopy(ds_config)
    config.pop("optimizer", None)  # else DeepSpeed builds an optimizer (CPUAdam with offload) for it
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for key in _MODEL_SIZED_ZERO_KEYS:
        if zero.get(key) == "auto":
            del zero[key]
    if zero.get("stage", 0) == 3:
        size = hidden_size(model)
        if size is not None:  # transformers' own sizing for ZeRO-3 (integrations.deepspeed)
            zero["reduce_bucket_size"] = size * size
            zero["stage3_prefetch_bucket_size"] = int(0.9 * size * size)
            zero["stage3_param_persistence_threshold"] = 10 * size
    else:
        zero["stage"] = 0  # ZeRO 1-2 shard optimizer state and gradients, which a frozen model has not
    return config


def deepspeed_reference(model: nn.Module, accelerator) -> nn.Module:
    """`model` inside a DeepSpeed inference engine configured like the run (partitioned under ZeRO-3)."""
    import deepspeed  # imported only when DeepSpeed runs: its import initialises an accelerator backend

    config = deepspeed_inference_config(accelerator.state.deepspeed_plugin.deepspeed_config, model)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def fsdp2_reference(model: nn.Module, accelerator) -> nn.Module:
    """`model` sharded with `fully_shard` exactly as accelerate shards the policy under this FSDP2 plugin."""
    from accelerate.utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(accelerator, model)
    model.eval()
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with its weights as they are now, to be frozen as the reference.

    A model partitioned by DeepSpeed ZeRO-3 at load time (`from_pretrained` under a ZeRO-3 config runs in
    `deepspeed.zero.Init`) holds empty tensors, and `copy.deepcopy` would copy those; its partitions are
    gathered for the copy instead, which briefly holds the whole model on every device. Pass `ref_model`
    (loaded under the same config, so partitioned at load) to avoid that peak.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return copy.deepcopy(model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return copy.deepcopy(model)  # nn.Parameter's deepcopy keeps the gathered values, not the ZeRO state


def prepare_reference(model: nn.Module, accelerator) -> nn.Module:
    """Place the frozen `model` for the run's engine (see the module docstring); returns what to call."""
    model.eval()
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return deepspeed_reference(model, accelerator)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        if is_fsdp2(accelerator):
            return fsdp2_reference(model, accelerator)
        logger.warning(
            "FSDP1: the reference model is replicated whole on every device; use fsdp_version: 2 to shard it "
            "like the policy (examples/accelerate/fsdp2.yaml)."
        )
        return model.to(accelerator.device)
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    # prepare_model registers the model among those accelerate trains and checkpoints; the reference is
    # neither, and Trainer reads an empty registry as "the policy is not prepared yet" before evaluation.
    unregister_prepared(accelerator, prepared, model)
    return prepared


@contextlib.contextmanager
def policy_as_reference(policy: nn.Module, accelerator):
    """The policy prepared for scoring before training, under an engine that shards or places it later.

    Precomputing π_ref with the policy itself (full fine-tuning, or a PEFT policy with its adapter
    disabled) happens before `Trainer` prepares the policy. Under DeepSpeed the policy is wrapped in an
    inference engine (ZeRO-3 partitions it in place, as training will; the engine's hooks are removed on
    exit). Under FSDP a copy is sharded and dropped on exit, so the policy reaches training unchanged.
    Without an engine the policy is used as it is (Trainer has already placed it).
    """
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        was_training = policy.training
        engine = deepspeed_reference(policy, accelerator)
        try:
            yield engine
        finally:
            engine.destroy()  # removes ZeRO-3's module hooks; the training engine adds its own
            policy.train(was_training)
    elif getattr(accelerator.state, "fsdp_plugin", None) is not None:
        view = copy.deepcopy(policy)
        view.requires_grad_(False)
        yield prepare_reference(view, accelerator)
    else:
        yield policy


@contextlib.contextmanager
def evaluating_before_training(trainer):
    """Let `Trainer.evaluate` run before `train()` on a temporary view of the policy, then restore the trainer.

    Before train(), Trainer prepares the policy for evaluation in ways training cannot start from: with
    several processes accelerate then marks the policy prepared and train() never wraps it in DDP
    (gradients are not synchronised); ZeRO 1-2 refuse to build an inference engine; ZeRO-3 leaves one
    without optimizer that train() reuses; FSDP2 refuses a model without its optimizer. The view is the
    policy itself (with the run's autocast), a DeepSpeed inference engine whose hooks are removed after, or
    a sharded copy under FSDP (`policy_as_reference`); Trainer takes it for the prepared policy
    (`_compat.standing_in_for_policy`).
    """
    accelerator = trainer.accelerator
    with policy_as_reference(trainer.model, accelerator) as view, accelerator.autocast():
        with standing_in_for_policy(trainer, view):
            yield


def policy_prepared(trainer) -> bool:
    """Whether Trainer has prepared the policy for training (engine, DDP, device and autocast): its DeepSpeed
    engine is built, its FSDP shards made, or accelerate wrapped or marked it."""
    if trainer.is_deepspeed_enabled:
        return deepspeed_engine(trainer) is not None
    if trainer.is_fsdp_enabled:
        return is_fsdp_module(trainer.model)
    model = trainer.model
    return trainer.model_wrapped is not model or accelerate_prepared(model)


def release_reference(model: nn.Module | None) -> None:
    """Remove what `prepare_reference` hooked onto a module that may outlive it (a DeepSpeed engine's hooks)."""
    if type(model).__name__ == "DeepSpeedEngine":
        model.destroy()
