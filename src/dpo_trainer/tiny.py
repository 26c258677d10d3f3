"""Deprecated: moved to `dpo_trainer.testing` (this path goes away in the next release)."""

import warnings

from dpo_trainer.testing.tiny import (
    CHAT_TEMPLATE,
    MAX_POSITIONS,
    SPECIAL_TOKENS,
    tiny_causal_lm,
    train_tokenizer,
)

warnings.warn("dpo_trainer.tiny is deprecated, import from dpo_trainer.testing", FutureWarning, stacklevel=2)

__all__ = ["CHAT_TEMPLATE", "MAX_POSITIONS", "SPECIAL_TOKENS", "tiny_causal_lm", "train_tokenizer"]
