"""Data pipeline: dataset rows → :class:`Example` → token ids → padded batches with a scoring plan."""

from .collate import PaddedCollator
from .formats import (
    KNOWN_ROLES,
    TEMPLATE_COLUMNS,
    Example,
    check_row_text,
    detect_format,
    split_common_prefix,
    split_hh_transcript,
    to_example,
)
from .prepare import prepare_dataset
from .tokenize import TRUNCATION_MODES, tokenize_example, truncate_ids

__all__ = [
    "KNOWN_ROLES",
    "TEMPLATE_COLUMNS",
    "TRUNCATION_MODES",
    "Example",
    "PaddedCollator",
    "check_row_text",
    "detect_format",
    "prepare_dataset",
    "split_common_prefix",
    "split_hh_transcript",
    "to_example",
    "tokenize_example",
    "truncate_ids",
]
