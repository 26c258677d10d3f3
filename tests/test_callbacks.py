"""TR-DPO's reference updates (`dpo_trainer.reference.sync`): the soft update's arithmetic, its schedule inside a
training run, that the loss uses the updated reference, and the combinations refused (as TRL 1.16 does)."""

import math

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from dpo_trainer import DPOTrainer
from dpo_trainer.reference.sync import SyncRefModelCallback, mix_into

from conftest import dpo_config


def test_mix_into_is_the_soft_update():
    """reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter; alpha = 1 copies."""
    torch.manual_seed(0)
    policy, reference = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = {
        n: 0.3 * p.detach() + 0.7 * r.detach()
        for (n, p), (_, r) in zip(policy.named_parameters(), reference.named_parameters())
    }
    mix_into(reference, policy, 0.3)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name])
    mix_into(reference, policy, 1.0)
    for (_, p), (_, r) in zip(policy.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, r)


def test_mix_into_rejects_different_models():
    with pytest.raises(ValueError, match="different parameters"):
        mix_into(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), 0.5)
    with pytest.raises(ValueError, match=r"shape \(2, 4\) in the policy and \(2, 3\)"):
        mix_into(nn.Linear(3, 2), nn.Linear(4, 2), 0.5)


@pytest.mark.parametrize(("alpha", "steps"), [(0.0, 1), (1.5, 1), (0.5, 0)])
def test_callback_validates_its_settings(alpha, steps):
    with pytest.raises(ValueError, match="ref_model_mixup_alpha|ref_model_sync_steps"):
        SyncRefModelCallback(nn.Linear(2, 2), alpha=alpha, sync_steps=steps)


class Snapshots(TrainerCallback):
    """The policy after each optimizer step (before the sync of that step) and the reference before each step."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.policy, self.reference = trainer_ref, {}, {}

    @staticmethod
    def weight(model):
        return model.get_output_embeddings().weight.detach().clone()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.reference[state.global_step] = self.weight(self.trainer_ref())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.policy[state.global_step] = self.weight(model)


def test_reference_is_mixed_every_tau_steps_during_training(tmp_path, make_model, tokenizer, pairs):
    trainer_box = {}
    snapshots = Snapshots(lambda: trainer_box["trainer"].ref_model)
    trainer = DPOTrainer(
        make_model(),
        args=dpo_config(
            tmp_path, sync_ref_model=True, ref_model_mixup_alpha=0.25, ref_model_sync_steps=2, max_steps=5
        ),
        train_dataset=pairs,
        processing_class=tokenizer,
        callbacks=[snapshots],
    )
    trainer_box["trainer"] = trainer
    assert any(isinstance(c, SyncRefModelCallback) for c in trainer.callback_handler.callbacks)
    reference = snapshots.weight(trainer.ref_model)
    initial = reference.clone()
    trainer.train()
    snapshots.reference[5] = snapshots.weight(trainer.ref_model)  # after the last step
    for step in range(1, 6):
        if step % 2 == 0:  # after steps 2 and 4: 0.25 x policy + 0.75 x reference
            reference = 0.25 * snapshots.policy[step] + 0.75 * reference
        torch.testing.assert_close(snapshots.reference[step], reference)
    assert not torch.equal(reference, initial)  # it did move
    assert not torch.equal(snapshots.policy[5], reference)  # and it is not the policy


def test_loss_uses_the_updated_reference(tmp_path, make_model, tokenizer, pairs):
    """alpha = 1, tau = 1: after training the reference is the policy, so every reward is 0 and the loss ln 2."""
    trainer = DPOTrainer(
        make_model(),
        args=dpo_config(
            tmp_path, sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1, max_steps=2
        ),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    baseline = DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path / "b", max_steps=2),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    baseline.train()
    assert abs(baseline.evaluate()["eval_rewards/margins"]) > 1e-3  # without the sync the rewards move


def test_a_separate_reference_of_another_shape_is_refused(tmp_path, make_model, tokenizer, pairs):
    with pytest.raises(ValueError, match="sync_ref_model: parameter .* has shape"):
        DPOTrainer(
            make_model(),
            ref_model=make_model(hidden_size=16),
            args=dpo_config(tmp_path, sync_ref_model=True),
            train_dataset=pairs,
            processing_class=tokenizer,
        )
