"""The model card (README.md) written beside every saved model and checkpoint.

A README.md the user wrote is never replaced: saving leaves it exactly as it was and warns. A card this
library wrote (it carries `MODEL_CARD_MARKER`) is rewritten with the run's current settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ._version import __version__
from .models import is_peft_model, unwrap, unwrap_to_peft
from .reference.sync import REFERENCE_ADAPTER

logger = logging.getLogger(__name__)

MODEL_CARD_MARKER = "<!-- written by dpo_trainer -->"


def _read_text(path: str) -> str | None:
    """The text of the file at `path`, or None when there is none."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def save_keeping_user_readme(
    output_dir: str, save: Callable[[], None], write_card: Callable[[str], object]
) -> None:
    """Run `save()` (which may write README.md itself, as a PEFT model's `save_pretrained` does), then write
    our card with `write_card(output_dir)`; a README.md the user wrote is put back exactly as it was."""
    path = os.path.join(output_dir, "README.md")
    before = _read_text(path)
    save()
    if before is not None and MODEL_CARD_MARKER not in before:
        if _read_text(path) != before:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(before)
        logger.warning("Not writing a model card: %s exists and was not written by dpo_trainer.", path)
        return
    if before is None and os.path.exists(path):
        os.remove(path)  # the card save_pretrained wrote (PEFT's), replaced by ours
    write_card(output_dir)


def describe_reference(model, ref_model, args) -> str:
    """What π_ref is for a trainer built from `model` (the policy, after LoRA is applied) and the `ref_model`
    argument as the user gave it, in the words of the model card."""
    peft = is_peft_model(unwrap_to_peft(model))
    if ref_model is not None:
        config = None if isinstance(ref_model, str) else getattr(unwrap(ref_model), "config", None)
        name = ref_model if isinstance(ref_model, str) else getattr(config, "_name_or_path", "")
        reference = f"the model given as `ref_model` (`{name}`)" if name else "the model given as `ref_model`"
    elif peft and REFERENCE_ADAPTER in unwrap_to_peft(model).peft_config:
        reference = "a frozen copy of the given adapter (adapter `reference`)"
    elif peft:
        reference = "the base model (adapter disabled)"
    else:
        reference = "a frozen copy of the policy as given"
    if peft and ref_model is None and args.sync_ref_model:
        reference = (
            f"a frozen `reference` adapter, TR-DPO-synced (alpha {args.ref_model_mixup_alpha}, every "
            f"{args.ref_model_sync_steps} steps)"
        )
    elif args.sync_ref_model:
        reference += (
            f", TR-DPO-synced (alpha {args.ref_model_mixup_alpha}, every {args.ref_model_sync_steps} steps)"
        )
    if args.precompute_ref_log_probs:
        reference = f"log-probs precomputed before training from {reference}"
    return reference


def write_model_card(
    output_dir: str, *, model, args, tags: list[str], global_step: int, reference: str | None = None
) -> str | None:
    """Write README.md describing the run, unless a README.md not written by this library is there."""
    path = os.path.join(output_dir, "README.md")
    existing = _read_text(path)
    if existing is not None and MODEL_CARD_MARKER not in existing:
        logger.warning("Not writing a model card: %s exists and was not written by dpo_trainer.", path)
        return None
    base = unwrap(model)
    name = getattr(base.config, "_name_or_path", "") or base.config.model_type
    tags = list(dict.fromkeys(list(tags) + list(getattr(base, "model_tags", None) or [])))
    if reference is None:
        reference = describe_reference(model, None, args)
    names = [args.loss_type] if isinstance(args.loss_type, str) else args.loss_type
    weights = args.loss_weights or [None] * len(names)
    loss_label = " + ".join(f"`{n}`" if w is None else f"{w} x `{n}`" for n, w in zip(names, weights))
    card = f"""---
library_name: transformers
tags: [{", ".join(tags)}]
---
{MODEL_CARD_MARKER}
# {os.path.basename(os.path.abspath(output_dir))}

Trained from `{name}` with Direct Preference Optimization (DPO; Rafailov et al., 2023,
[arXiv:2305.18290](https://arxiv.org/abs/2305.18290)) using dpo_trainer {__version__}.

| setting | value |
|---|---|
| method | DPO |
| loss | {loss_label} |
| beta | {args.beta} |
| label_smoothing | {args.label_smoothing} |
| learning_rate | {args.learning_rate} |
| max_length / max_prompt_length | {args.max_length} / {args.max_prompt_length} |
| reference | {reference} |
| global step | {global_step} |
"""
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(card)
    return path
