"""QLoRA on CPU: a 4-bit NF4 base (bitsandbytes) with LoRA adapters trains; the quantized base never moves.

"Never moves" is checked on what the quantized layers compute (their outputs on fixed inputs), not on
their storage: bitsandbytes may repack 4-bit weights into another layout on the first CPU forward
(it does on some AMD CPUs), which changes the stored bytes but not the layer's function.
"""

import math

import bitsandbytes as bnb  # in the [dev] and [qlora] extras
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dpo_trainer import DPOTrainer

from conftest import dpo_config, preference_rows


def base_layer_outputs(model, generator_seed: int = 0) -> dict[str, torch.Tensor]:
    """Each 4-bit base layer's output on a fixed random input (its adapter, if any, bypassed)."""
    generator = torch.Generator().manual_seed(generator_seed)
    outputs = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                inputs = torch.randn(3, module.in_features, generator=generator)
                outputs[name] = module(inputs).float().clone()
    return outputs


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
    frozen = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if "lora_" not in n and not isinstance(p, bnb.nn.Params4bit)
    }
    base_outputs = base_layer_outputs(trainer.model)
    assert len(base_outputs) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert trainer.evaluate()["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    for name, value in trainer.model.named_parameters():
        if name in frozen:  # embeddings, norms: plain tensors
            assert torch.equal(value.detach(), frozen[name]), name
    after = base_layer_outputs(trainer.model)
    assert after.keys() == base_outputs.keys()
    for name, output in base_outputs.items():
        torch.testing.assert_close(after[name], output, rtol=1e-5, atol=1e-6, msg=name)
    assert all(
        not torch.equal(p.detach(), adapter[n]) for n, p in trainer.model.named_parameters() if n in adapter
    )


def test_quantization_config_loads_4bit_and_keeps_adapters_in_the_compute_dtype(
    tmp_path, make_model, tokenizer
):
    path = str(tmp_path / "base")
    make_model(hidden_size=64).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    trainer = DPOTrainer(
        path,
        args=dpo_config(tmp_path, learning_rate=1e-2, max_steps=2, gradient_checkpointing=True),
        train_dataset=preference_rows(8, seed=1),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        quantization_config=quantization,
    )
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}
    trainer.train()  # checkpointed blocks of a frozen base still give the adapters gradients
    assert all(not torch.equal(trainable[n].detach(), value) for n, value in before.items())


def test_quantization_config_errors(tmp_path, make_model, tokenizer):
    quantization = BitsAndBytesConfig(load_in_4bit=True)
    rows = preference_rows(4, seed=0)
    with pytest.raises(ValueError, match="loaded from a name or path"):
        DPOTrainer(
            make_model(),
            args=dpo_config(tmp_path),
            train_dataset=rows,
            processing_class=tokenizer,
            quantization_config=quantization,
        )
    with pytest.raises(ValueError, match="both as a trainer argument and in DPOConfig.model_init_kwargs"):
        DPOTrainer(
            "some/model",
            args=dpo_config(tmp_path, model_init_kwargs={"quantization_config": quantization}),
            train_dataset=rows,
            processing_class=tokenizer,
            quantization_config=quantization,
        )


def test_a_given_qlora_adapter_is_its_own_frozen_reference(tmp_path, make_model, tokenizer):
    # QLoRA SFT, then DPO on the same adapter: a PeftModel over a 4-bit base, given with peft_config=None.
    from peft import get_peft_model

    from dpo_trainer.reference.sync import REFERENCE_ADAPTER

    path = str(tmp_path / "base")
    make_model(hidden_size=64).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    rows = preference_rows(8, seed=0)
    trainer = DPOTrainer(
        model,
        args=dpo_config(tmp_path, learning_rate=1e-2, max_steps=2, per_device_train_batch_size=4),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    reference = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if REFERENCE_ADAPTER in n}
    assert reference and not any(
        p.requires_grad for n, p in trainer.model.named_parameters() if n in reference
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # π = π_ref, not the base
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in reference.items())  # the reference never moves
    assert trainer.evaluate()["eval_loss"] < math.log(2)  # the policy's adapter did
