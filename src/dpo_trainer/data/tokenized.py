"""Rows that arrive already tokenized: our `prompt_ids` / `response_ids` (with `ref_logps` when the reference
log-probs are given), or TRL 1.16's `prompt_ids` / `chosen_ids` / `rejected_ids`. Which kind a dataset holds
(`row_kind`), and each row checked, with its row and field named, and truncated as a text row is (`from_ids`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .formats import FORMAT_COLUMNS, MIN_RESPONSES
from .tokenize import truncate_ids

# The columns a tokenized row carries (and precomputed reference log-probs, when there are).
TOKENIZED_COLUMNS = ("prompt_ids", "response_ids", "ref_logps")
# Rows tokenized by TRL 1.16 (its `DPOTrainer.train_dataset` keeps the text columns beside them).
TRL_TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def row_kind(columns, name: str) -> str:
    """Which columns the rows are read from: "ours" (`prompt_ids`, `response_ids`), "trl" (`prompt_ids`,
    `chosen_ids`, `rejected_ids`) or "text" (a format of `formats.FORMAT_COLUMNS`).

    Text beside our tokenized columns is refused: nothing says which of the two to train on. Text beside TRL's
    tokenized columns is what TRL's own `DPOTrainer.train_dataset` holds; TRL tokenizes such rows again from
    their text, and so is it done here ("text"; `prepare` names the columns left out in a warning).
    """
    columns = set(columns)
    ours, trl = set(TOKENIZED_COLUMNS[:2]) <= columns, set(TRL_TOKENIZED_COLUMNS) <= columns
    text = sorted({column for cols in FORMAT_COLUMNS.values() if set(cols) <= columns for column in cols})
    if ours and trl:
        raise ValueError(
            f"{name} has both our tokenized columns (prompt_ids, response_ids) and TRL's (prompt_ids, "
            "chosen_ids, rejected_ids), so it is ambiguous which responses to train on; drop one set, e.g. "
            "dataset.remove_columns(['chosen_ids', 'rejected_ids'])."
        )
    if ours and text:
        raise ValueError(
            f"{name} has both text columns ({', '.join(text)}) and tokenized columns (prompt_ids, response_ids), "
            "so it is ambiguous which to train on. Drop one set: dataset.remove_columns(['prompt_ids', "
            f"'response_ids']) to tokenize the text, or dataset.remove_columns({text}) to train on the ids as given."
        )
    if text:
        return "text"
    return "ours" if ours else "trl" if trl else "text"


def _token_ids(value, index: int, field: str) -> list[int]:
    """`value` as a list of token ids (integers >= 0), or an error naming the row and the field."""
    if value is None:
        raise ValueError(f"row {index}, field {field!r}: value is None")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"row {index}, field {field!r}: expected a list of token ids, got {type(value).__name__}"
        )
    if all(type(token) is int for token in value) and (not value or min(value) >= 0):
        return list(value)  # the common case, checked fast
    for position, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(
                f"row {index}, field {field!r}: expected token ids (integers >= 0), got {token!r} at position "
                f"{position}"
            )
    return [int(token) for token in value]


def given_responses(row, index: int, kind: str) -> list[tuple[str, list[int]]]:
    """(field, ids) of each response of a tokenized row, best first."""
    if kind == "trl":
        return [(field, _token_ids(row.get(field), index, field)) for field in TRL_TOKENIZED_COLUMNS[1:]]
    responses = row.get("response_ids")
    if responses is None or isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence):
        raise TypeError(
            f"row {index}, field 'response_ids': expected a list of K token id lists (best first), got "
            f"{type(responses).__name__}"
        )
    if len(responses) < MIN_RESPONSES:
        raise ValueError(
            f"row {index}, field 'response_ids': needs at least {MIN_RESPONSES} responses, got {len(responses)}"
        )
    return [
        (f"response_ids[{k}]", _token_ids(ids, index, f"response_ids[{k}]"))
        for k, ids in enumerate(responses)
    ]


def _reference_values(value, index: int, num_responses: int) -> list[float]:
    if value is None:
        raise ValueError(
            f"row {index}, field 'ref_logps': value is None (the column holds reference log-probs)"
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"row {index}, field 'ref_logps': expected a list of numbers, got {type(value).__name__}"
        )
    if len(value) != num_responses:
        raise ValueError(
            f"row {index}, field 'ref_logps': {len(value)} reference log-probs for {num_responses} responses; "
            "give one per response, in the order of response_ids"
        )
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"row {index}, field 'ref_logps': expected finite numbers, got {list(value)}")
    return [float(v) for v in value]


def from_ids(kind: str, num_responses: int, with_reference: bool, settings: dict):
    """(row, index) -> tokenized row, for rows given as token ids (`kind` "ours" or "trl").

    They are checked and truncated as text rows are (`truncate_ids`): a prompt and K >= 2 responses of at least
    one token each, K as in row 0, and, in our rows, one `ref_logps` value per response. Reference log-probs
    belong to the ids they were computed on: a row that truncation would cut is refused, unless it is dropped
    (a response cut away entirely). TRL's `ref_chosen_logps` / `ref_rejected_logps` are not carried over (they
    belong to TRL's truncation and model) and are recomputed when `precompute_ref_log_probs` is set.
    """

    def convert(row, index):
        prompt = _token_ids(row.get("prompt_ids"), index, "prompt_ids")
        named = given_responses(row, index, kind)
        if len(named) != num_responses:
            raise ValueError(
                f"row {index}: {len(named)} responses where row 0 has {num_responses}; every row of a dataset "
                "must rank the same number of responses."
            )
        if not prompt:
            raise ValueError(
                f"row {index}, field 'prompt_ids': empty; the first response token would have no context (text "
                "rows get the tokenizer's BOS id there)"
            )
        for field, ids in named:
            if not ids:
                raise ValueError(f"row {index}, field {field!r}: empty; a response needs at least one token")
        responses = [ids for _, ids in named]
        cut_prompt, cut_responses = truncate_ids(prompt, responses, **settings)
        out = {"prompt_ids": cut_prompt, "response_ids": cut_responses}
        if kind == "ours" and (with_reference or row.get("ref_logps") is not None):
            if not with_reference:
                raise ValueError(f"row {index}, field 'ref_logps': given where row 0 has none")
            out["ref_logps"] = _reference_values(row.get("ref_logps"), index, num_responses)
            kept = min(map(len, cut_responses)) > 0
            if kept and (cut_prompt, cut_responses) != (prompt, responses):
                raise ValueError(
                    f"row {index}: truncation (max_length={settings['max_length']}, max_prompt_length="
                    f"{settings['max_prompt_length']}, truncation_mode={settings['truncation_mode']!r}) cuts this "
                    "row's ids, but its 'ref_logps' were computed on the uncut ids; remove the ref_logps column "
                    "(precompute_ref_log_probs=True computes them on the cut ids) or raise max_length."
                )
        return out

    return convert
