"""The reference model π_ref and its log-probs: one helper for training, evaluation and precomputation.

Strategies, chosen by `DPOTrainer` through `build_reference` (see the trainer's docstring):
  * a separate frozen model (`ref_model` given, or a frozen copy of the policy for full fine-tuning);
  * the policy itself with its PEFT adapter disabled (one copy of the base weights), or with its frozen
    reference adapter active (`sync.REFERENCE_ADAPTER`: a `PeftModel` given with its adapter, TR-DPO);
  * log-probs precomputed once before training and read from the batch (`ref_logps`, `precompute`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..logprobs import sequence_logps
from ..models import disable_dropout, freeze, is_peft_model, load_model, unwrap_to_peft
from ..placement import frozen_copy
from .sync import REFERENCE_ADAPTER, add_reference_adapter

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _adapter_disabled_eval(policy: nn.Module):
    """The policy's base weights in eval mode: adapters off and dropout off, restored on exit."""
    peft_model = unwrap_to_peft(policy)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


@contextlib.contextmanager
def _reference_adapter_eval(policy: nn.Module, reference_adapter: str):
    """The policy's frozen reference adapter active, in eval mode (TR-DPO with PEFT, `sync.REFERENCE_ADAPTER`).

    On exit the adapter that was active is active again, every parameter has its `requires_grad` back (peft's
    `set_adapter` makes the adapter it activates trainable and the others frozen) and the training mode is
    restored.
    """
    peft_model = unwrap_to_peft(policy)
    active, was_training = peft_model.active_adapter, peft_model.training
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]
    peft_model.eval()
    try:
        peft_model.set_adapter(reference_adapter)
        yield
    finally:
        peft_model.set_adapter(active)
        for param, flag in flags:
            param.requires_grad_(flag)
        peft_model.train(was_training)


def reference_logps(
    policy: nn.Module,
    ref_model: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reference log-probs of every response in `batch`: (B, K) float32, no gradient.

    Uses `batch["ref_logps"]` when the batch carries precomputed values, else `ref_model`, else (a PEFT
    policy) the policy's reference adapter `sync.REFERENCE_ADAPTER` when it has one (TR-DPO's
    `sync_ref_model`), else the policy with its adapter disabled.
    """
    if "ref_logps" in batch:
        return batch["ref_logps"].float()
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, batch, chunk_size=chunk_size)
        peft_model = unwrap_to_peft(policy)
        if not is_peft_model(peft_model):
            raise ValueError(
                "No reference: pass ref_model, train a PEFT adapter, or precompute reference log-probs."
            )
        if REFERENCE_ADAPTER in peft_model.peft_config:
            with _reference_adapter_eval(policy, REFERENCE_ADAPTER):
                return sequence_logps(policy, batch, chunk_size=chunk_size)
        with _adapter_disabled_eval(policy):
            return sequence_logps(policy, batch, chunk_size=chunk_size)


def build_reference(
    model: nn.Module, ref_model, args, quantization_config=None, adapter_given: bool = False
) -> nn.Module | None:
    """The frozen reference for `model`: `ref_model` loaded (a name or path) and frozen, else the cheapest
    exact one: None for a PEFT policy or when the values are precomputed from the policy, else a frozen copy
    of the policy's weights as they are now (not a reload from disk).

    A PEFT policy is its own reference: with the adapter disabled when the adapter is new (`peft_config`), or
    when `adapter_given` (a `PeftModel` passed in with its adapter) through a frozen copy of that adapter,
    added here as the adapter `REFERENCE_ADAPTER` (TRL's "ref" adapter), unless `args.peft_reference` is
    "base". Only then is π_ref the policy as given, e.g. the SFT adapter that DPO starts from.
    """
    if isinstance(ref_model, str):
        ref_model = load_model(ref_model, args, quantization_config)
    if ref_model is not None and ref_model is model:
        raise ValueError("ref_model must not be the policy itself; pass ref_model=None to get a frozen copy.")
    if ref_model is None and adapter_given and args.peft_reference == "copy":
        policy_adapter = add_reference_adapter(model, "a PeftModel given with its adapter")
        logger.info(
            "The reference is a frozen copy of the given adapter %r (DPOConfig.peft_reference='copy'); "
            "peft_reference='base' uses the base model instead.",
            policy_adapter,
        )
    if ref_model is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
        ref_model = frozen_copy(model)
    if ref_model is not None:
        freeze(ref_model)
        disable_dropout(ref_model)
    return ref_model
