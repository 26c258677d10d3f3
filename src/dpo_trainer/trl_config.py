"""TRL's `DPOConfig` given to `DPOTrainer`: recognised (`is_trl_config`), converted field by field
(`from_trl_config`), and `trainer_args`, the trainer's arguments checked, or TRL's default when none are given."""

from __future__ import annotations

import logging

import torch

from .config import DPOConfig

logger = logging.getLogger(__name__)


def is_trl_config(args) -> bool:
    """Whether `args` is TRL's `DPOConfig` or an instance of a subclass of it (e.g. a script's own config)."""
    return any(
        cls.__name__ == "DPOConfig" and cls.__module__.split(".")[0] == "trl" for cls in type(args).__mro__
    )


def from_trl_config(args) -> DPOConfig:
    """A `DPOConfig` of this library holding the values of TRL's `DPOConfig` `args`, field by field.

    Scripts built on TRL (`TrlParser`, alignment-handbook's recipes) hand the trainer TRL's config or a subclass
    of it; every field TRL defines exists here with TRL's meaning, so the run is the same. Values are read as
    TRL's `__post_init__` left them (`bf16` resolved, `loss_type` a list). Fields of a subclass that this
    trainer does not read are named in a warning when they differ from their default.
    """
    import dataclasses

    ours = {f.name for f in dataclasses.fields(DPOConfig) if f.init}
    values, unused = {}, []
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        value = getattr(args, f.name)
        if f.name in ours:
            values[f.name] = value
            continue
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if value != default:
            unused.append(f"{f.name}={value!r}")
    kind = type(args)
    if unused:
        logger.warning(
            "%s.%s sets fields that dpo_trainer's DPOTrainer does not read: %s.",
            kind.__module__,
            kind.__qualname__,
            ", ".join(unused),
        )
    logger.info(
        "Converted %s.%s to dpo_trainer's DPOConfig, field by field.", kind.__module__, kind.__qualname__
    )
    return DPOConfig(**values)


def trainer_args(args: DPOConfig | None, model, train_dataset) -> DPOConfig:
    """`args` checked, or TRL's default when None: a `DPOConfig` writing to "<model name>-DPO"."""
    if train_dataset is None:
        raise ValueError(
            "`train_dataset` is required (as in TRL): pass the preference rows to train on, even when you "
            "only mean to evaluate."
        )
    if args is None:
        name = (
            model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        )
        return DPOConfig(output_dir=f"{(name or 'model').rstrip('/').split('/')[-1]}-DPO")
    if not isinstance(args, DPOConfig):
        if not is_trl_config(args):
            kind = type(args)
            raise TypeError(
                f"args must be a dpo_trainer.config.DPOConfig (or TRL's trl.trainer.dpo_config.DPOConfig, which is "
                f"converted), got {kind.__module__}.{kind.__qualname__}."
            )
        args = from_trl_config(args)
    if args.activation_offloading and not hasattr(torch.autograd.graph, "save_on_cpu"):
        raise ValueError("DPOConfig.activation_offloading=True needs torch.autograd.graph.save_on_cpu.")
    return args
