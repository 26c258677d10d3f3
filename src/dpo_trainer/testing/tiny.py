"""Tiny offline models and tokenizers for the examples and tests.

Nothing here touches the network: the tokenizer is trained on the given texts with the ``tokenizers``
library and the model is built from a config with random weights.

>>> tokenizer = train_tokenizer(["\\n\\nHuman: How do I make rice?\\n\\nAssistant: Simmer it."], vocab_size=300)
>>> tokenizer.decode(tokenizer("Any text, even ünïcode.")["input_ids"])
'Any text, even ünïcode.'
>>> model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
>>> model.config.vocab_size == len(tokenizer)
True
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["CHAT_TEMPLATE", "MAX_POSITIONS", "SPECIAL_TOKENS", "tiny_causal_lm", "train_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}

# Anthropic-HH style: "\n\nHuman: ..." and "\n\nAssistant: ..." turns, no EOS text after assistant turns
# (the tokenization step appends the EOS id). The generation prompt is "\n\nAssistant:" without the
# trailing space, so a conversation renders to prompt + " " + reply: the same strings as splitting a raw
# HH transcript at its last "\n\nAssistant:", and the reply's first word keeps its leading-space token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{%- else -%}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)

MAX_POSITIONS = 2048

_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "gpt2": transformers.GPT2Config,
}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte-level, so any text round-trips through encode/decode and ``<unk>`` never appears. The special
    tokens take ids 0-3 in the order of ``SPECIAL_TOKENS`` (pad, eos, bos, unk). No BOS or EOS is added
    when encoding, and the chat template renders Anthropic-HH transcripts. The same texts give the same
    tokenizer.
    """
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        **SPECIAL_TOKENS,
    )


def tiny_causal_lm(
    tokenizer_or_vocab_size: transformers.PreTrainedTokenizerBase | int,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    **config_overrides,
) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of architecture ``arch`` ("llama", "qwen2" or "gpt2").

    The vocabulary is ``len(tokenizer)`` and pad/eos/bos ids come from the tokenizer; given an int
    vocabulary size instead, the ids follow ``SPECIAL_TOKENS`` (pad 0, eos 1, bos 2). The MLP is
    4 x ``hidden_size`` wide, dropout is off (GPT-2 included), positions go up to 2048, attention is
    "sdpa". ``tie_word_embeddings=None`` keeps the architecture's default (untied for llama and qwen2,
    tied for gpt2). ``config_overrides`` go to the config, e.g. ``attn_implementation="eager"`` or
    ``num_key_value_heads=2``. Weights depend only on ``seed``; the global torch RNG is left untouched.
    """
    if arch not in _CONFIGS:
        raise ValueError(f"arch must be one of {sorted(_CONFIGS)}, got {arch!r}")
    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, pad_id, eos_id, bos_id = tokenizer_or_vocab_size, 0, 1, 2
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab_size = len(tokenizer)
        pad_id, eos_id, bos_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id

    attn_implementation = config_overrides.pop("attn_implementation", "sdpa")
    if arch == "gpt2":
        settings = dict(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        settings = dict(
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=MAX_POSITIONS,
        )
    if tie_word_embeddings is not None:
        settings["tie_word_embeddings"] = tie_word_embeddings
    settings.update(config_overrides)
    config = _CONFIGS[arch](
        vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id, **settings
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    return model
