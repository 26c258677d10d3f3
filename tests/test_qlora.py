"""QLoRA on CPU: a 4-bit NF4 base (bitsandbytes) with LoRA adapters trains; the quantized base never moves."""

import bitsandbytes as bnb  # in the [dev] and [qlora] extras
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dpo_trainer import DPOTrainer

from conftest import dpo_config, preference_rows


def test_qlora_trains_the_adapter_on_a_frozen_4bit_base(tmp_path, make_model, tokenizer):
    path = str(tmp_path / "base")
    make_model(hidden_size=64).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    rows = preference_rows(16, seed=0)
    lora = LoraConfig(r=4, target_modules="all-linear")
    trainer = DPOTrainer(
        model,
        args=dpo_config(tmp_path, learning_rate=1e-2),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
        peft_config=lora,
    )
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert trainer.evaluate()["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    for name, value in trainer.model.named_parameters():
        if name in base:
            assert torch.equal(value.detach(), base[name]), name
    assert all(
        not torch.equal(p.detach(), adapter[n]) for n, p in trainer.model.named_parameters() if n in adapter
    )
