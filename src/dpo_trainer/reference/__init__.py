"""The reference model π_ref, each concern in its own module:

  * `scoring`: the strategies (a separate frozen model, the policy with its adapter disabled, its frozen
    reference adapter) and `reference_logps`, the one helper training, evaluation and precomputation share;
    `build_reference`, the cheapest exact reference for a policy;
  * `precompute`: the reference log-probs of a trainer's datasets computed once before training, added as a
    `ref_logps` column;
  * `cache`: those values on disk, keyed by fingerprints of the reference, the tokenizer and the rows;
  * `sync`: TR-DPO's reference updates (`SyncRefModelCallback`) and the frozen reference adapter.

The names below are importable from `dpo_trainer.reference`; each is defined in one of those modules.
"""

from .cache import (
    CACHE_FORMAT_VERSION,
    CACHE_KEY_FIELD,
    STALE_TEMPORARY_S,
    cache_dir_problem,
    cache_key,
    cache_path,
    default_cache_dir,
    load_cached,
    model_fingerprint,
    rows_fingerprint,
    save_cached,
)
from .precompute import (
    add_reference_column,
    check_reference_column,
    compute_dataset_reference_logps,
    compute_reference_column,
    precompute_reference,
    reference_scorer,
)
from .scoring import build_reference, reference_logps
from .sync import (
    REFERENCE_ADAPTER,
    SyncRefModelCallback,
    add_reference_adapter,
    load_reference_adapter,
    mix_into,
    mix_reference_adapter,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CACHE_KEY_FIELD",
    "REFERENCE_ADAPTER",
    "STALE_TEMPORARY_S",
    "SyncRefModelCallback",
    "add_reference_adapter",
    "add_reference_column",
    "build_reference",
    "cache_dir_problem",
    "cache_key",
    "cache_path",
    "check_reference_column",
    "compute_dataset_reference_logps",
    "compute_reference_column",
    "default_cache_dir",
    "load_cached",
    "load_reference_adapter",
    "mix_into",
    "mix_reference_adapter",
    "model_fingerprint",
    "precompute_reference",
    "reference_logps",
    "reference_scorer",
    "rows_fingerprint",
    "save_cached",
]
