"""Dropout off in the policy and the reference (attention dropout included), the model's config untouched."""

import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dpo_trainer import DPOTrainer
from dpo_trainer.models import disable_dropout

from conftest import dpo_config, preference_rows

DROPOUT = 0.5


def llama(vocab):
    # Llama-family attention copies config.attention_dropout into the module when it is built
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=DROPOUT,
    )
    return LlamaForCausalLM(config)


def qwen2(vocab):
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=DROPOUT,
    )
    return Qwen2ForCausalLM(config)


def gpt2(vocab):
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        attn_pdrop=DROPOUT,
        resid_pdrop=DROPOUT,
        embd_pdrop=DROPOUT,
    )
    return GPT2LMHeadModel(config)


MODELS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2}


def train_mode_outputs(model, input_ids, n=2):
    model.train()
    with torch.no_grad():
        return [model(input_ids=input_ids).logits for _ in range(n)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_disable_dropout_makes_train_mode_deterministic_and_keeps_the_config(name):
    torch.manual_seed(0)
    model = MODELS[name](50)
    config_before = model.config.to_dict()
    input_ids = torch.randint(0, 50, (2, 9))
    first, second = train_mode_outputs(model, input_ids)
    assert not torch.allclose(first, second)  # the dropout is there to be turned off

    disable_dropout(model)
    first, second = train_mode_outputs(model, input_ids)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # and equal to what eval mode computes (no dropout anywhere)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, first, rtol=1e-6, atol=1e-6)
    assert model.config.to_dict() == config_before


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trainer_turns_dropout_off_in_policy_and_reference_without_rewriting_the_config(
    name, tmp_path, tokenizer
):
    torch.manual_seed(0)
    model = MODELS[name](len(tokenizer))
    config_before = model.config.to_dict()
    trainer = DPOTrainer(
        model, args=dpo_config(tmp_path), train_dataset=preference_rows(4, seed=0), processing_class=tokenizer
    )
    input_ids = torch.tensor([tokenizer("Tell me about the river: thanks happy.")["input_ids"]])
    for net in (trainer.model, trainer.ref_model):
        first, second = train_mode_outputs(net, input_ids)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    config_after = trainer.model.config.to_dict()
    config_after["use_cache"] = config_before["use_cache"]  # transformers' Trainer turns the KV cache off
    assert config_after == config_before

    trainer.save_model(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "config.json") as handle:
        saved = json.load(handle)
    keys = ("attn_pdrop", "resid_pdrop", "embd_pdrop") if name == "gpt2" else ("attention_dropout",)
    assert all(saved[key] == DROPOUT for key in keys)


def test_dropout_can_stay_on(tmp_path, tokenizer):
    torch.manual_seed(0)
    args = dpo_config(tmp_path, disable_dropout=False)
    trainer = DPOTrainer(
        llama(len(tokenizer)), args=args, train_dataset=preference_rows(4, seed=0), processing_class=tokenizer
    )
    first, second = train_mode_outputs(trainer.model, torch.tensor([[5, 6, 7, 8, 9, 10]]))
    assert not torch.allclose(first, second)


def test_a_model_reading_dropout_from_its_config_is_named_in_a_warning(caplog):
    # Falcon's forward reads config.hidden_dropout itself: the config stays the caller's, so say so
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=DROPOUT
    )
    model = FalconForCausalLM(config)
    with caplog.at_level("WARNING", logger="dpo_trainer.reference"):
        disable_dropout(model)
    assert "FalconForCausalLM reads hidden_dropout" in caplog.text
    assert model.config.hidden_dropout == DROPOUT
