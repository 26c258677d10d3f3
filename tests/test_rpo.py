"""rpo_alpha: the chosen response's mean token NLL added to each pair's DPO loss (TRL's option)."""

import pytest
import torch

from dpo_trainer import DPOTrainer
from dpo_trainer.logprobs import sequence_logps

from conftest import dpo_config, preference_rows


def test_rpo_adds_alpha_times_the_chosen_mean_token_nll(tmp_path, make_model, tokenizer):
    rows = preference_rows(6, seed=3)
    losses = {}
    for alpha in (None, 0.5):
        trainer = DPOTrainer(
            make_model(seed=2),
            args=dpo_config(tmp_path / str(alpha), rpo_alpha=alpha),
            train_dataset=rows,
            processing_class=tokenizer,
        )
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
        trainer.model.train()
        losses[alpha] = trainer.compute_loss(trainer.model, batch)
        with torch.no_grad():
            chosen = sequence_logps(trainer.model, batch)[:, 0]
        tokens = batch["response_lengths"][:, 0].float()
    expected = 0.5 * (-chosen / tokens).mean()
    assert expected > 0
    torch.testing.assert_close(losses[0.5] - losses[None], expected, rtol=1e-5, atol=1e-6)


def test_rpo_alpha_is_validated(tmp_path):
    with pytest.raises(ValueError, match="DPOConfig.rpo_alpha"):
        dpo_config(tmp_path, rpo_alpha=-1.0)
