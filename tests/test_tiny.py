"""Tiny offline tokenizer and models (dpo_trainer.testing.tiny)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from dpo_trainer.testing import SPECIAL_TOKENS, tiny_causal_lm, train_tokenizer  # noqa: E402

CORPUS = [
    "\n\nHuman: How do I make rice?\n\nAssistant: Simmer one cup of rice in two cups of water.",
    "\n\nHuman: How do I grow basil?\n\nAssistant: Sow basil in warm soil in a sunny spot.",
    "\n\nHuman: Any travel advice about jet lag?\n\nAssistant: I don't know, figure it out yourself.",
] * 5
CONVERSATION = [
    {"role": "user", "content": "How do I make rice?"},
    {"role": "assistant", "content": "Simmer it."},
    {"role": "user", "content": "And basil?"},
    {"role": "assistant", "content": "Grow it in sun."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_tokenizer_is_deterministic(tokenizer):
    again = train_tokenizer(CORPUS, vocab_size=400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_special_tokens_and_no_automatic_bos(tokenizer):
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert [tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token] == list(
        SPECIAL_TOKENS.values()
    )
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id] == [0, 1, 2]
    ids = tokenizer("How do I make rice?")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize(
    "text", ["How do I make rice?", "unseen wörds, émojis 🍚 and\ttabs\n\nnewlines  ", " leading space"]
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_hh_and_generation_prompt_is_a_prefix(tokenizer):
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert (
        full
        == "\n\nHuman: How do I make rice?\n\nAssistant: Simmer it.\n\nHuman: And basil?\n\nAssistant: Grow it in sun."
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    # the same prompt/reply split as cutting a raw HH transcript at its last "\n\nAssistant:"
    hh_prompt, hh_reply = full.rsplit("\n\nAssistant:", 1)
    assert prompt == hh_prompt + "\n\nAssistant:"
    assert full[len(prompt) :] == hh_reply == " Grow it in sun."


def test_tokenizer_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").exists()
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "\n\nHuman: How do I grow basil? 🌿\n\nAssistant: In sun."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )


@pytest.mark.parametrize("arch, tied_by_default", [("llama", False), ("qwen2", False), ("gpt2", True)])
def test_each_arch_runs_forward_with_tokenizer_ids(tokenizer, arch, tied_by_default):
    model = tiny_causal_lm(tokenizer, arch=arch)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 2)
    assert config._attn_implementation == "sdpa"
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == tied_by_default
    input_ids = tokenizer(["How do I make rice?", "Sow basil."], padding=True, return_tensors="pt")
    logits = model(**input_ids).logits
    assert logits.shape == (*input_ids["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads(arch, tie):
    model = tiny_causal_lm(97, arch=arch, hidden_size=16, num_layers=1, num_heads=2, tie_word_embeddings=tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    assert model.config.vocab_size == 97


def test_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_causal_lm(50, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = tiny_causal_lm(50, seed=7)
    other = tiny_causal_lm(50, seed=8)
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not all(torch.equal(first_state[name], other_state[name]) for name in first_state)


def test_overrides_reach_the_config():
    model = tiny_causal_lm(50, attn_implementation="eager", num_key_value_heads=2, hidden_size=32)
    assert model.config._attn_implementation == "eager"
    assert model.config.num_key_value_heads == 2
    assert model.config.max_position_embeddings == 2048
    with pytest.raises(ValueError, match="arch"):
        tiny_causal_lm(50, arch="mamba")


def test_model_save_and_load(tmp_path):
    model = tiny_causal_lm(50, hidden_size=16, num_layers=1, num_heads=2).eval()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)
