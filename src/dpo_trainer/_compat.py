"""Every touch of another library's private state, in one place.

Each entry says which upstream versions it was written and tested against (CI runs the newest versions in
`setup.cfg`'s ranges and the lowest, `.ci/constraints-lowest.txt`). `check_upstream()` runs when a trainer
is built and fails with the names that moved, rather than letting a renamed private method be skipped
silently (an override of a method the base class no longer calls would be dead code).

A leaf: it imports no module of this package, so that every module may use it. What the touches are for (the
trainer's hooks, the policy's placement in `placement`) lives with the code that uses them.
"""

from __future__ import annotations

import contextlib

from torch import nn

# torch 2.4-2.13: the common base class of nn.Dropout, Dropout1d/2d/3d, AlphaDropout and FeatureAlphaDropout.
DROPOUT_MODULE_TYPES = (nn.modules.dropout._DropoutNd,)


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module inside a `torch.compile` wrapper, else None (torch 2.4-2.13: `OptimizedModule._orig_mod`)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation a model runs (transformers 5.0-5.24: `config._attn_implementation`;
    set through the public `set_attn_implementation`)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def unregister_prepared(accelerator, *models: nn.Module) -> None:
    """Drop `models` from accelerate's registry of the models it trains and checkpoints.

    accelerate 1.4-1.15: `Accelerator.prepare_model` appends to `Accelerator._models`, which `save_state`
    walks and transformers' Trainer reads (empty = "the policy is not prepared yet").
    """
    accelerator._models[:] = [m for m in accelerator._models if not any(m is model for model in models)]


def accelerate_prepared(model: nn.Module) -> bool:
    """Whether accelerate prepared `model` (accelerate 1.4-1.15: `Accelerator.prepare_model` sets
    `_is_accelerate_prepared` on it)."""
    return getattr(model, "_is_accelerate_prepared", False)


def deepspeed_engine(trainer) -> nn.Module | None:
    """The DeepSpeed engine `trainer` built for the policy, None before it has (transformers 5.0-5.24:
    `Trainer.deepspeed`, set when training or evaluation prepares the policy)."""
    return trainer.deepspeed


@contextlib.contextmanager
def standing_in_for_policy(trainer, view: nn.Module):
    """Within the block, `trainer` takes the prepared `view` for its prepared policy; after it, the policy
    and accelerate's registry are restored and no DeepSpeed engine is kept.

    transformers 5.0-5.24: `evaluation_loop` calls `self.model` and takes a non-empty `accelerator._models`
    (accelerate 1.4-1.15) or a set `self.deepspeed` for "already prepared".
    """
    accelerator = trainer.accelerator
    policy, models = trainer.model, list(accelerator._models)
    trainer.model, trainer.model_wrapped = accelerator.unwrap_model(view), view
    accelerator._models[:] = [view]
    trainer.deepspeed = view if trainer.is_deepspeed_enabled else None
    try:
        yield
    finally:
        trainer.model = trainer.model_wrapped = policy
        accelerator._models[:] = models
        trainer.deepspeed = None


class TrainerOverrides:
    """The private `transformers.Trainer` methods `DPOTrainer` overrides, each handing over to a named hook of
    the trainer (where the work is done; nothing of this package is imported here).

    Written against transformers 5.24; every method below exists, with this signature, since 5.0.
    """

    # Trainer._get_num_items_in_batch(batch_samples, device): the training loss's denominator for a step.
    def _get_num_items_in_batch(self, batch_samples, device):
        return self.count_step_pairs(batch_samples, device)

    # Trainer._set_signature_columns_if_needed(): Trainer keeps only columns named like model.forward's
    # arguments (`_signature_columns`); ours feed the collator.
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(self.dataset_columns)

    # Trainer._get_grad_norm(model, grad_norm): called once the step's gradients are final, just before the
    # optimizer step.
    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.before_optimizer_step(model, grad_norm)
        return grad_norm

    # Trainer._save(output_dir, state_dict): writes the weights of every save (checkpoints and save_model).
    def _save(self, output_dir: str | None = None, state_dict=None):
        self.save_weights(output_dir or self.args.output_dir, state_dict, save=super()._save)

    # Trainer._load_from_checkpoint(resume_from_checkpoint, model=None): loads a checkpoint's weights when
    # resuming, before the callbacks' on_train_begin.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.after_checkpoint_loaded(resume_from_checkpoint)


def grad_scaler_found_inf(scaler):
    """How many inf/NaN findings `scaler` (a `torch.amp.GradScaler`) recorded unscaling this step's gradients,
    as a 0-dim float32 tensor on its device (no host sync), or None if it has unscaled nothing since `update()`.

    torch 2.6-2.13: `GradScaler.unscale_` (which accelerate 1.8-1.16's `clip_grad_norm_` calls, before
    `Trainer._get_grad_norm`) stores `found_inf_per_device` per optimizer in `_per_optimizer_states`; `step`
    skips the optimizer where one is non-zero and `update()` clears them. FSDP's `ShardedGradScaler` alike.
    """
    import torch

    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:
        raise RuntimeError(
            f"torch {torch.__version__}'s {type(scaler).__name__} has no `_per_optimizer_states`: dpo_trainer "
            "cannot tell the loss scaler's skipped steps from divergence; install torch within setup.cfg's range."
        )
    found = [value for state in states.values() for value in state["found_inf_per_device"].values()]
    if not found:
        return None
    return torch.stack([value.to(found[0].device, torch.float32) for value in found]).sum()


def deepspeed_fp16_overflow(accelerator) -> tuple[bool, float] | None:
    """Under DeepSpeed with fp16 loss scaling: (whether the engine's loss scaler skipped this step, the scale
    it holds now, already lowered after an overflow); else None.

    accelerate 1.8-1.16's `DeepSpeedEngineWrapper.backward` runs `engine.step()` on the step's last micro-batch,
    before `Trainer._get_grad_norm`; deepspeed 0.19's fp16 optimizers (FP16_Optimizer, ZeRO 1-3) then hold
    that step's `overflow` (what accelerate's `step_was_skipped` reads) and their `loss_scale`.
    """
    engine = getattr(getattr(accelerator, "deepspeed_engine_wrapped", None), "engine", None)
    if engine is None or not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    return bool(getattr(optimizer, "overflow", False)), float(getattr(optimizer, "loss_scale", 1.0))


# (module, attribute) pairs the code above relies on.
_UPSTREAM = (
    ("transformers.Trainer", "_get_num_items_in_batch"),
    ("transformers.Trainer", "_set_signature_columns_if_needed"),
    ("transformers.Trainer", "_get_grad_norm"),
    ("transformers.Trainer", "_save"),
    ("transformers.Trainer", "_prepare_inputs"),
    ("transformers.Trainer", "_load_from_checkpoint"),
    ("transformers.Trainer", "_init_training_state"),  # checkpoints.StopsAtTheEnd
    ("accelerate.Accelerator", "prepare_model"),
)


def check_upstream() -> None:
    """Raise ImportError naming every private method listed in `_UPSTREAM` that is missing upstream."""
    import transformers

    import accelerate

    classes = {"transformers.Trainer": transformers.Trainer, "accelerate.Accelerator": accelerate.Accelerator}
    missing = [f"{owner}.{name}" for owner, name in _UPSTREAM if not hasattr(classes[owner], name)]
    if missing:
        raise ImportError(
            f"dpo_trainer overrides {', '.join(missing)}, which transformers {transformers.__version__} / "
            f"accelerate {accelerate.__version__} no longer have; install versions within setup.cfg's ranges."
        )
