"""TR-DPO's reference updates with a LoRA policy (`dpo_trainer.reference.sync`): the reference is a second, frozen
adapter on the same base model, started as a copy of the policy's adapter and mixed into every τ steps."""

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback

from dpo_trainer import DPOTrainer
from dpo_trainer.logprobs import sequence_logps
from dpo_trainer.reference.sync import (
    REFERENCE_ADAPTER,
    SyncRefModelCallback,
    add_reference_adapter,
    mix_reference_adapter,
)

from conftest import dpo_config

TARGETS = ["q_proj", "v_proj"]


def lora(**overrides):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **overrides})


def adapter_weights(model, adapter):
    """{name with the adapter's name left out: a copy} of one adapter's parameters."""
    return {
        name.replace(f".{adapter}.", "."): param.detach().clone()
        for name, param in model.named_parameters()
        if adapter in name.split(".")
    }


def sync_trainer(tmp_path, make_model, tokenizer, pairs, *, peft_config=None, callbacks=None, **overrides):
    settings = dict(sync_ref_model=True, learning_rate=1e-2, **overrides)
    return DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path, **settings),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config or lora(),
        callbacks=callbacks,
    )


def a_batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(4)]
    return trainer.data_collator([{k: row[k] for k in ("prompt_ids", "response_ids")} for row in rows])


@torch.no_grad()
def policy_logps(model, batch):
    was_training = model.training
    model.eval()
    try:
        return sequence_logps(model, batch)
    finally:
        model.train(was_training)


class ReferenceSnapshots(TrainerCallback):
    """The reference adapter before each optimizer step and the policy adapter after it (before that step's sync:
    this callback runs before the sync callback, which the trainer adds last)."""

    def __init__(self):
        self.reference, self.policy, self.at_train_begin = {}, {}, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_train_begin = adapter_weights(model, REFERENCE_ADAPTER)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.reference[state.global_step] = adapter_weights(model, REFERENCE_ADAPTER)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.policy[state.global_step] = adapter_weights(model, "default")


def trained_looking_policy(make_model):
    """A PeftModel whose adapter is not at its initialisation (B != 0, the lm_head copy moved)."""
    model = get_peft_model(make_model(), lora(modules_to_save=["lm_head"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "default" in name.split("."):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def test_the_reference_adapter_starts_as_a_frozen_copy_of_the_policy(tmp_path, make_model, tokenizer, pairs):
    trainer = DPOTrainer(
        trained_looking_policy(make_model),
        args=dpo_config(tmp_path, sync_ref_model=True),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is None
    assert any(isinstance(c, SyncRefModelCallback) for c in trainer.callback_handler.callbacks)
    model = trainer.model
    assert set(model.peft_config) == {"default", REFERENCE_ADAPTER} and model.active_adapter == "default"
    policy, reference = adapter_weights(model, "default"), adapter_weights(model, REFERENCE_ADAPTER)
    assert reference.keys() == policy.keys()
    assert any("lora_A" in k for k in policy) and any("lora_B" in k for k in policy)
    assert any("modules_to_save" in k for k in policy)  # adapter parameters besides the LoRA factors
    for name, value in policy.items():
        assert torch.equal(reference[name], value), name
    for name, param in model.named_parameters():
        parts = name.split(".")
        assert param.requires_grad == ("default" in parts), name
    batch = a_batch(trainer)
    reference = trainer.reference_logps(batch)
    # at start the reference is the policy as it is then, not the base model
    torch.testing.assert_close(reference, policy_logps(model, batch), rtol=0, atol=0)
    with torch.no_grad(), model.disable_adapter():
        assert (reference - sequence_logps(model, batch)).abs().max() > 1e-3


def test_hard_update_makes_the_reference_the_policy(tmp_path, make_model, tokenizer, pairs):
    """(a) alpha = 1, tau = 1: after one step the reference scores like the policy, not like the base model."""
    trainer = sync_trainer(
        tmp_path,
        make_model,
        tokenizer,
        pairs,
        peft_config=lora(lora_dropout=0.5),
        ref_model_mixup_alpha=1.0,
        ref_model_sync_steps=1,
        max_steps=1,
    )
    trainer.train()
    model, batch = trainer.model, a_batch(trainer)
    model.train()  # as during training: the reference is still scored without dropout
    reference = trainer.reference_logps(batch)
    policy = policy_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        base = sequence_logps(model, batch)
    torch.testing.assert_close(reference, policy, rtol=0, atol=1e-6)
    assert (reference - base).abs().max() > 1e-4  # the step moved the policy, and the reference with it
    assert model.active_adapter == "default"  # scoring the reference switched back to the policy's adapter


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_soft_update_mixes_the_adapter_every_tau_steps(tmp_path, make_model, tokenizer, pairs, alpha):
    """(b) tau = 2: after each sync reference = alpha x policy + (1 - alpha) x previous reference, and unchanged
    in between."""
    snapshots = ReferenceSnapshots()
    trainer = sync_trainer(
        tmp_path,
        make_model,
        tokenizer,
        pairs,
        peft_config=lora(modules_to_save=["lm_head"]),
        callbacks=[snapshots],
        ref_model_mixup_alpha=alpha,
        ref_model_sync_steps=2,
        max_steps=4,
    )
    trainer.train()
    snapshots.reference[4] = adapter_weights(trainer.model, REFERENCE_ADAPTER)
    expected = snapshots.reference[0]
    for step in range(1, 5):
        if step % 2 == 0:
            expected = {k: alpha * snapshots.policy[step][k] + (1 - alpha) * v for k, v in expected.items()}
            for name, value in expected.items():
                torch.testing.assert_close(snapshots.reference[step][name], value, rtol=1e-6, atol=1e-7)
        else:  # no sync after an odd step: exactly the reference of the step before
            for name, value in snapshots.reference[step - 1].items():
                assert torch.equal(snapshots.reference[step][name], value), (step, name)
    assert any(not torch.equal(snapshots.reference[4][k], v) for k, v in snapshots.reference[0].items())
    assert any(not torch.equal(snapshots.reference[4][k], v) for k, v in snapshots.policy[4].items())


def test_the_reference_adapter_is_never_trained(tmp_path, make_model, tokenizer, pairs):
    """(c) Not in the optimizer, and unchanged by optimizer steps when no sync falls among them."""
    trainer = sync_trainer(
        tmp_path,
        make_model,
        tokenizer,
        pairs,
        peft_config=lora(modules_to_save=["lm_head"]),
        ref_model_sync_steps=100,
        max_steps=3,
        weight_decay=0.1,
    )
    model = trainer.model
    before_policy, before_reference = (
        adapter_weights(model, "default"),
        adapter_weights(model, REFERENCE_ADAPTER),
    )
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    reference_params = [p for n, p in model.named_parameters() if REFERENCE_ADAPTER in n.split(".")]
    policy_params = [p for n, p in model.named_parameters() if "default" in n.split(".")]
    assert reference_params and not any(id(p) in in_optimizer for p in reference_params)
    assert all(id(p) in in_optimizer for p in policy_params)
    # scoring the reference during training switched adapters: the flags are as they were
    assert not any(p.requires_grad for p in reference_params) and all(p.requires_grad for p in policy_params)
    after_reference = adapter_weights(model, REFERENCE_ADAPTER)
    for name, value in before_reference.items():
        assert torch.equal(after_reference[name], value), name
    after_policy = adapter_weights(model, "default")
    assert any(not torch.equal(after_policy[k], v) for k, v in before_policy.items())


def test_reference_scoring_restores_the_policy_adapter_and_mode(tmp_path, make_model, tokenizer, pairs):
    trainer = sync_trainer(tmp_path, make_model, tokenizer, pairs)
    model = trainer.model
    model.train()
    frozen = next(p for n, p in model.named_parameters() if "lora_A.default" in n)
    frozen.requires_grad_(False)  # a policy parameter the user froze stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainer.reference_logps(a_batch(trainer))
    assert model.training and model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_resume_restores_the_reference_adapter(tmp_path, make_model, tokenizer, pairs):
    """(d) A checkpoint carries the reference adapter; resuming from it gives the uninterrupted run's reference."""
    settings = dict(ref_model_mixup_alpha=0.5, ref_model_sync_steps=2, max_steps=4)
    straight_snapshots = ReferenceSnapshots()
    straight = sync_trainer(
        tmp_path / "a", make_model, tokenizer, pairs, callbacks=[straight_snapshots], **settings
    )
    straight.train()
    final = adapter_weights(straight.model, REFERENCE_ADAPTER)

    first = sync_trainer(
        tmp_path / "b", make_model, tokenizer, pairs, save_strategy="steps", save_steps=2, **settings
    )
    first.train()
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-2")
    assert os.path.exists(os.path.join(checkpoint, REFERENCE_ADAPTER, "adapter_model.safetensors"))

    resumed_snapshots = ReferenceSnapshots()
    resumed = sync_trainer(
        tmp_path / "b",
        make_model,
        tokenizer,
        pairs,
        callbacks=[resumed_snapshots],
        save_strategy="steps",
        save_steps=2,
        **settings,
    )
    fresh = adapter_weights(resumed.model, REFERENCE_ADAPTER)
    resumed.train(resume_from_checkpoint=checkpoint)
    loaded = resumed_snapshots.at_train_begin  # the reference after step 2's sync, read from the checkpoint
    for name, value in straight_snapshots.reference[2].items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    assert any(not torch.equal(loaded[k], v) for k, v in fresh.items())
    for name, value in final.items():
        torch.testing.assert_close(adapter_weights(resumed.model, REFERENCE_ADAPTER)[name], value)
    in_optimizer = {id(p) for group in resumed.optimizer.param_groups for p in group["params"]}
    assert not any(
        id(p) in in_optimizer or p.requires_grad
        for n, p in resumed.model.named_parameters()
        if REFERENCE_ADAPTER in n.split(".")
    )


def test_the_saved_model_loads_as_the_policy(tmp_path, make_model, tokenizer, pairs):
    """(e) save_model writes the policy's adapter as the default one; the reference goes to a subfolder."""
    trainer = sync_trainer(
        tmp_path, make_model, tokenizer, pairs, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1, max_steps=2
    )
    trainer.train()
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    batch = a_batch(trainer)
    policy, reference = policy_logps(trainer.model, batch), trainer.reference_logps(batch)
    assert (policy - reference).abs().max() > 1e-5  # alpha < 1: the two differ

    loaded = PeftModel.from_pretrained(make_model(), out)
    assert set(loaded.peft_config) == {"default"}
    torch.testing.assert_close(policy_logps(loaded, batch), policy, rtol=0, atol=1e-5)

    loaded.load_adapter(os.path.join(out, REFERENCE_ADAPTER), REFERENCE_ADAPTER)
    loaded.set_adapter(REFERENCE_ADAPTER)
    torch.testing.assert_close(policy_logps(loaded, batch), reference, rtol=0, atol=1e-5)


def test_an_adapter_named_like_the_reference_is_refused(tmp_path, make_model, tokenizer, pairs):
    model = PeftModel(make_model(), lora(), adapter_name=REFERENCE_ADAPTER)
    with pytest.raises(ValueError, match="give the policy's adapter another name"):
        DPOTrainer(
            model,
            args=dpo_config(tmp_path, sync_ref_model=True),
            train_dataset=pairs,
            processing_class=tokenizer,
        )


def test_before_any_sync_training_is_plain_lora_dpo(tmp_path, make_model, tokenizer, pairs):
    """A fresh LoRA's copy is the base model: with no sync yet, the run is the adapter-disabled one exactly
    (switching adapters for the reference between the policy's forward and backward loses no gradient)."""
    runs = {}
    for sync in (True, False):
        trainer = DPOTrainer(
            make_model(),
            args=dpo_config(tmp_path / str(sync), sync_ref_model=sync, ref_model_sync_steps=100, max_steps=3),
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=lora(lora_dropout=0.1),
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[sync] = losses, adapter_weights(trainer.model, "default")
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value)
    assert any("lora_B" in name and value.abs().max() > 0 for name, value in runs[True][1].items())


def test_a_soft_update_mixes_the_factors_not_the_weight_deltas(make_model):
    """The documented arithmetic: B'A' = a BA + (1 - a) B_r A_r - a (1 - a) (B - B_r)(A - A_r)."""
    model = trained_looking_policy(make_model)
    add_reference_adapter(model)
    with torch.no_grad():  # move the policy away from its copy in both factors
        for name, param in model.named_parameters():
            if "default" in name.split("."):
                param.add_(0.1)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = dict(model.named_parameters())

    def factors(adapter):
        return (
            weights[f"{prefix}.lora_A.{adapter}.weight"].detach().clone(),
            weights[f"{prefix}.lora_B.{adapter}.weight"].detach().clone(),
        )

    (a, b), (a_ref, b_ref) = factors("default"), factors(REFERENCE_ADAPTER)
    mix_reference_adapter(model, 0.3)
    a_new, b_new = factors(REFERENCE_ADAPTER)
    torch.testing.assert_close(a_new, 0.3 * a + 0.7 * a_ref)
    expected = 0.3 * b @ a + 0.7 * b_ref @ a_ref - 0.3 * 0.7 * (b - b_ref) @ (a - a_ref)
    torch.testing.assert_close(b_new @ a_new, expected)
    assert (b_new @ a_new - (0.3 * b @ a + 0.7 * b_ref @ a_ref)).abs().max() > 1e-4
