"""The LM head's logit transforms: every `LOGIT_TRANSFORMS` entry on a tiny model of its architecture, and the
self-check that refuses a model whose logits `sequence_logps` does not reproduce."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dpo_trainer import DPOTrainer
from dpo_trainer.data import PaddedCollator
from dpo_trainer.data.layouts import GroupedCollator
from dpo_trainer.logit_transforms import LOGIT_TRANSFORMS, logit_transform
from dpo_trainer.logprobs import CHECK_TOLERANCE_16BIT, check_sequence_logps, sequence_logps

from conftest import dpo_config, preference_rows

VOCAB = 64
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SOFTCAP = {"final_logit_softcapping": 3.0}
# model_type -> the config values that make its transform matter (far from the identity)
ARCHITECTURES = {
    "gemma2": SOFTCAP,
    "gemma3_text": SOFTCAP,
    "gemma4_text": SOFTCAP,
    "vaultgemma": SOFTCAP,
    "nanochat": SOFTCAP,
    "beam": SOFTCAP,
    "inkling2_text": {**SOFTCAP, "unpadded_vocab_size": VOCAB},
    "recurrent_gemma": {"logits_soft_cap": 3.0, "block_types": ["recurrent", "attention"]},
    "cohere": {"logit_scale": 4.0},
    "cohere2": {"logit_scale": 4.0},
    "cohere2_moe": {"logit_scale": 4.0},
    "granite": {"logits_scaling": 8.0},
    "granite_swa": {"logits_scaling": 8.0},
    "granitemoe": {"logits_scaling": 8.0},
    "granitemoe_swa": {"logits_scaling": 8.0},
    "granitemoeshared": {"logits_scaling": 8.0},
    "granitemoehybrid": {
        "logits_scaling": 8.0,
        "mamba_n_heads": 8,
        "mamba_d_state": 8,
        "mamba_chunk_size": 4,
    },
    "minicpm3": {
        "dim_model_base": 8,  # logits_scaling = hidden_size / dim_model_base = 4
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "head_dim": 16,
        "num_key_value_heads": 4,
    },
    "hyperclovax": {"logits_scaling": 4.0},
    "falcon_h1": {
        "lm_head_multiplier": 4.0,
        "mamba_d_ssm": 32,
        "mamba_n_heads": 4,
        "mamba_d_head": 8,
        "mamba_d_state": 8,
        "mamba_chunk_size": 4,
    },
}


def tiny_model(model_type: str, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # logits of a few units, where soft-capping and scaling change the softmax a lot
        head = model.get_output_embeddings().weight
        head.mul_(4.0 / head.std())
    return model


def rows(seed=0, b=2, k=2):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(
            3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g
        ).tolist()

    return [{"prompt_ids": ids(2, 6), "response_ids": [ids(2, 7) for _ in range(k)]} for _ in range(b)]


def model_logps(model, features):
    """(B, K) float64: each prompt + response run alone through the model, its own log_softmax(logits)."""
    out = torch.zeros(len(features), len(features[0]["response_ids"]), dtype=torch.float64)
    with torch.no_grad():
        for b, row in enumerate(features):
            for k, response in enumerate(row["response_ids"]):
                ids = torch.tensor([row["prompt_ids"] + response])
                logps = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)[0]
                p = len(row["prompt_ids"])
                out[b, k] = sum(logps[p - 1 + j, token] for j, token in enumerate(response))
    return out


def test_every_table_entry_is_tested_here():
    assert set(LOGIT_TRANSFORMS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_logit_transform_matches_the_models_own_logits(model_type, monkeypatch):
    model = tiny_model(model_type, **ARCHITECTURES[model_type])
    features = rows()
    with torch.no_grad():
        ours = sequence_logps(model, PaddedCollator(pad_token_id=0)(features), chunk_size=3)
    torch.testing.assert_close(ours.double(), model_logps(model, features), rtol=1e-4, atol=2e-4)
    assert check_sequence_logps(model, features) < 1e-3

    # The entry is what makes them equal: without it the self-check refuses the model, by name.
    monkeypatch.delitem(LOGIT_TRANSFORMS, model.config.get_text_config().model_type)
    with pytest.raises(ValueError, match=type(model).__name__):
        check_sequence_logps(model, features)


def test_granite_divides_and_hyperclovax_multiplies_by_logits_scaling():
    # the same config name with opposite meanings: the table is keyed by architecture, not by field name
    assert logit_transform(tiny_model("granite", logits_scaling=8.0)).scale == pytest.approx(1 / 8)
    assert logit_transform(tiny_model("hyperclovax", logits_scaling=8.0)).scale == pytest.approx(8.0)


class ScaledLlama(LlamaForCausalLM):
    """A causal LM whose forward rescales its logits in a way no table knows."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        output = super().forward(input_ids, attention_mask, position_ids, **kwargs)
        output.logits = output.logits * 3.0
        return output


def scaled_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return ScaledLlama(config)


def scaled_llama_vocab():
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "head_dim": None})
    model = ScaledLlama(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0 / model.lm_head.weight.std())
    return model


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_check_catches_an_unknown_transform_in_every_layout(layout):
    model = scaled_llama_vocab()
    features = rows(seed=1, b=2, k=2)
    collator = PaddedCollator(0) if layout == "padded" else GroupedCollator(0, layout)
    with pytest.raises(ValueError, match=r"ScaledLlama.*nats per token"):
        check_sequence_logps(model, features, collator)
    # the plain Llama passes the same check
    plain = LlamaForCausalLM(model.config).eval()
    assert check_sequence_logps(plain, features, collator) < 1e-3


def test_check_in_bfloat16_passes_rounding_and_refuses_an_unknown_transform():
    features = rows(seed=2)
    plain = LlamaForCausalLM(scaled_llama_vocab().config).to(torch.bfloat16)
    assert check_sequence_logps(plain, features, GroupedCollator(0, "shared_prompt")) < CHECK_TOLERANCE_16BIT
    with pytest.raises(ValueError, match=r"ScaledLlama.*torch.bfloat16"):
        check_sequence_logps(scaled_llama_vocab().to(torch.bfloat16), features)


def test_trainer_refuses_a_model_whose_logits_it_cannot_reproduce(tmp_path, tokenizer):
    data = preference_rows(4, seed=0)
    with pytest.raises(ValueError, match="ScaledLlama"):
        DPOTrainer(
            scaled_llama(tokenizer), args=dpo_config(tmp_path), train_dataset=data, processing_class=tokenizer
        )


def test_trainer_check_can_be_turned_off(tmp_path, tokenizer):
    args = dpo_config(tmp_path, check_logprobs=False)
    trainer = DPOTrainer(
        scaled_llama(tokenizer),
        args=args,
        train_dataset=preference_rows(4, seed=0),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.model, ScaledLlama)


def test_check_leaves_the_model_as_it_found_it():
    model = tiny_model("granite", logits_scaling=8.0).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    check_sequence_logps(model, rows())
    assert model.training
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
