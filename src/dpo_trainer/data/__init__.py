"""Data pipeline: dataset rows → :class:`Example` → token ids → padded batches with a scoring plan."""

from .collate import PaddedCollator
from .formats import Example, detect_format, split_hh_transcript, to_example
from .tokenize import TRUNCATION_MODES, tokenize_example, truncate_ids

__all__ = [
    "TRUNCATION_MODES",
    "Example",
    "PaddedCollator",
    "detect_format",
    "split_hh_transcript",
    "to_example",
    "tokenize_example",
    "truncate_ids",
]
