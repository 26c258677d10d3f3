"""Deprecated: moved to `dpo_trainer.testing` (this path goes away in the next release)."""

import warnings

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

warnings.warn("dpo_trainer.gguf is deprecated, import from dpo_trainer.testing", FutureWarning, stacklevel=2)

__all__ = [
    "CACHE_VARIABLE",
    "CHECK_TEXT",
    "CONVERSION_RECORD",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "cache_dir",
    "convert_gguf",
    "logits_fingerprint",
    "smollm2_gguf_file",
    "smollm2_path",
]
