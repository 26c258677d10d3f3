"""Datasets in, tokenized datasets out: `prepare_dataset`, used by `DPOTrainer` and by `sft`.

Rows in any supported format (`formats`), or already tokenized (our `prompt_ids` / `response_ids`, or TRL's
`prompt_ids` / `chosen_ids` / `rejected_ids`), become one tokenized row per example. Lists of dicts,
`datasets.Dataset` and streamed `datasets.IterableDataset` are accepted; a bad row is named by its index and
field, never left to fail inside Arrow or torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pyarrow
from datasets import Dataset, IterableDataset

from .formats import check_row_text, detect_format, to_example
from .tokenize import check_truncation_settings, tokenize_example, truncate_ids

logger = logging.getLogger(__name__)

# The columns a tokenized row carries (and precomputed reference log-probs, when there are).
TOKENIZED_COLUMNS = ("prompt_ids", "response_ids", "ref_logps")


def _named(dataset_name: str, function, *args, **kwargs):
    """Call `function`, prefixing the data errors it raises with the dataset's name."""
    try:
        return function(*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{dataset_name}: {error}") from error


def _is_tokenized(columns) -> bool:
    return {"prompt_ids", "response_ids"} <= set(columns)


def _is_trl_tokenized(columns) -> bool:
    return {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns)


def _from_trl_columns(settings: dict):
    """Rows tokenized by TRL (`prompt_ids`, `chosen_ids`, `rejected_ids`) -> ours, truncated by our rules.

    TRL's `ref_chosen_logps` / `ref_rejected_logps` are not carried over: they belong to TRL's truncation and
    model, and are recomputed when `precompute_ref_log_probs` is set.
    """

    def convert(row, index):
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = row[column]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"row {index}, field {column!r}: expected a list of token ids")
        prompt, responses = truncate_ids(
            list(row["prompt_ids"]), [list(row["chosen_ids"]), list(row["rejected_ids"])], **settings
        )
        return {"prompt_ids": prompt, "response_ids": responses}

    return convert


def _check_text_only(columns, name: str) -> None:
    """TRL raises for image columns given to a text model; they must not be dropped silently."""
    found = [column for column in ("image", "images") if column in set(columns)]
    if found:
        raise ValueError(
            f"{name} has an {found[0]!r} column: it looks like vision-language data, but dpo_trainer trains "
            "text-only causal language models. Remove the column to train on the text alone."
        )


def check_ranking(
    num_responses: int, loss_type: str | Sequence[str], label_smoothing: float, name: str
) -> None:
    """Rankings (K > 2 responses) train with Plackett-Luce, which is defined for the sigmoid loss only."""
    losses = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if num_responses > 2 and (losses != ["sigmoid"] or label_smoothing):
        raise ValueError(
            f"{name} ranks {num_responses} responses per row, which trains with the Plackett-Luce loss; it "
            f"needs loss_type='sigmoid' and label_smoothing=0 (got {loss_type!r}, {label_smoothing})."
        )


def _row_tokenizer(columns, first_row, tokenizer, settings: dict, name: str):
    """(row, index) -> tokenized row, for a dataset with `columns`; the number of responses per row."""
    if _is_trl_tokenized(columns):
        convert = _from_trl_columns(settings)
        return (lambda row, index: _named(name, convert, row, index)), 2
    _check_text_only(columns, name)
    fmt = _named(name, detect_format, columns)
    num_responses = len(_named(name, to_example, first_row, 0, fmt, tokenizer).responses)

    def tokenize(row, index):
        example = _named(name, to_example, row, index, fmt, tokenizer)
        if len(example.responses) != num_responses:
            raise ValueError(
                f"{name} row {index}: {len(example.responses)} responses where row 0 has {num_responses}; "
                "every row of a dataset must rank the same number of responses."
            )
        return _named(name, tokenize_example, example, tokenizer, index=index, **settings)

    return tokenize, num_responses


def _as_dataset(dataset, tokenizer, name: str) -> Dataset:
    """A list of dicts as a `datasets.Dataset`, each row's text checked first (Arrow would fail without it)."""
    if not dataset:
        raise ValueError(f"{name} is empty.")
    if not all(isinstance(row, Mapping) for row in dataset):
        raise TypeError(f"{name}: a list dataset must hold dicts (rows).")
    _check_text_only(dataset[0].keys(), name)
    for index, row in enumerate(dataset):
        _named(name, check_row_text, row, index)
    try:
        return Dataset.from_list(list(dataset))
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        # Arrow rejects mixed types before any row is checked: find the row and field ourselves.
        fmt = detect_format(dataset[0].keys())
        for index, row in enumerate(dataset):
            _named(name, to_example, row, index, fmt, tokenizer)
        raise TypeError(f"{name}: the rows do not share one column type ({error}).") from error


def prepare_dataset(
    dataset,
    tokenizer,
    *,
    max_length: int | None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    num_proc: int | None = None,
    name: str = "dataset",
):
    """Rows in any supported format -> `prompt_ids`, `response_ids` (one tokenized row per example).

    `max_length`, `max_prompt_length` and `truncation_mode` truncate as `DPOConfig` documents; `loss_type` and
    `label_smoothing` decide whether rankings (K > 2 responses) are allowed (`check_ranking`). A dataset
    already tokenized (with both columns) is returned as it is; a streamed `datasets.IterableDataset` is
    tokenized lazily, as it is read. Rows whose responses are truncated away entirely are dropped with a
    warning (all of them: a value error). None gives None.

    >>> from dpo_trainer.tiny import train_tokenizer
    >>> tokenizer = train_tokenizer(["Q: hi A: hello bye"], vocab_size=60)
    >>> rows = [{"prompt": "Q: hi", "chosen": " A: hello", "rejected": " A: bye"}]
    >>> prepared = prepare_dataset(rows, tokenizer, max_length=32)
    >>> prepared.column_names, len(prepared[0]["response_ids"])
    (['prompt_ids', 'response_ids'], 2)
    """
    check_truncation_settings(max_length, max_prompt_length, truncation_mode)
    if dataset is None:
        return None
    settings = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode,
    }
    if isinstance(dataset, IterableDataset):
        return _prepare_streamed(dataset, tokenizer, settings, (loss_type, label_smoothing), name)
    if isinstance(dataset, list):
        dataset = _as_dataset(dataset, tokenizer, name)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{name} must be a datasets.Dataset, a datasets.IterableDataset or a list of dicts, got "
            f"{type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    if _is_tokenized(dataset.column_names):
        return dataset
    tokenize, _ = _row_tokenizer(dataset.column_names, dataset[0], tokenizer, settings, name)
    dataset = dataset.map(
        tokenize,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Tokenizing {name}",
    )
    check_ranking(len(dataset[0]["response_ids"]), loss_type, label_smoothing, name)
    emptied = [i for i, responses in enumerate(dataset["response_ids"]) if min(map(len, responses)) == 0]
    if emptied:
        if len(emptied) == len(dataset):
            raise ValueError(
                f"{name}: every row has a response truncated away entirely (max_length={max_length}); "
                "raise max_length or set max_prompt_length."
            )
        logger.warning(
            "%s: dropping %d of %d rows whose response is truncated away entirely (first: row %d); raise "
            "max_length or set max_prompt_length to keep them.",
            name,
            len(emptied),
            len(dataset),
            emptied[0],
        )
        dropped = set(emptied)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    return dataset


def prepare_each(datasets, tokenizer, name: str, **settings):
    """`prepare_dataset` on a dataset, or on each dataset of a dict of them (named "<name>['<key>']")."""
    if isinstance(datasets, Mapping):
        return {
            key: prepare_dataset(value, tokenizer, **settings, name=f"{name}[{key!r}]")
            for key, value in datasets.items()
        }
    return prepare_dataset(datasets, tokenizer, **settings, name=name)


def _prepare_streamed(
    dataset: IterableDataset, tokenizer, settings: dict, loss, name: str
) -> IterableDataset:
    """Tokenize a streamed dataset lazily; checks that need the whole set are made per row as it is read."""
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"{name} is empty.")
    columns = list(first.keys())
    if _is_tokenized(columns):
        return dataset
    tokenize, num_responses = _row_tokenizer(columns, first, tokenizer, settings, name)
    check_ranking(num_responses, *loss, name)
    warned = []

    def keep(row) -> bool:
        kept = min(map(len, row["response_ids"])) > 0
        if not kept and not warned:
            warned.append(True)
            logger.warning(
                "%s: skipping streamed rows whose response is truncated away entirely (max_length=%s); raise "
                "max_length or set max_prompt_length to keep them.",
                name,
                settings["max_length"],
            )
        return kept

    return dataset.map(tokenize, with_indices=True, remove_columns=columns).filter(keep)


def named_datasets(datasets: Mapping) -> list[tuple[str, object]]:
    """(name, dataset) pairs, a dict of eval datasets spread as "eval_dataset['key']"."""
    named = []
    for key, value in datasets.items():
        if isinstance(value, Mapping):
            named += [(f"{key}[{k!r}]", v) for k, v in value.items()]
        else:
            named.append((key, value))
    return named


def check_positions(datasets: Mapping, limit: tuple[str, int] | None) -> None:
    """Refuse rows longer than a model's `max_position_embeddings` before training, not mid-run.

    `limit` is (model class name, positions) (`models.position_limit`). Every layout gives a response the
    positions after its prompt, so a row needs prompt + longest response positions.
    """
    if limit is None:
        return
    model_name, positions = limit
    for key, dataset in named_datasets(datasets):
        if not isinstance(dataset, Dataset):
            continue  # streamed: not known before training
        lengths = (
            len(prompt) + max(map(len, responses))
            for prompt, responses in zip(dataset["prompt_ids"], dataset["response_ids"])
        )
        for row, length in enumerate(lengths):
            if length > positions:
                raise ValueError(
                    f"{key} row {row} (after tokenization and truncation) needs {length} positions, but "
                    f"{model_name} has max_position_embeddings={positions}; set DPOConfig.max_length <= {positions}."
                )


def check_streaming(args, train_dataset, eval_dataset) -> None:
    """Refuse early what a streamed `datasets.IterableDataset` cannot do (`args` is a `DPOConfig`)."""
    streamed = [
        name
        for name, dataset in named_datasets({"train_dataset": train_dataset, "eval_dataset": eval_dataset})
        if isinstance(dataset, IterableDataset)
    ]
    if isinstance(train_dataset, IterableDataset):
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError(
                "train_dataset is a streamed datasets.IterableDataset, whose length is unknown: set "
                "DPOConfig.max_steps to the number of optimizer steps to train."
            )
        if args.max_tokens_per_batch is not None:
            raise ValueError(
                "DPOConfig.max_tokens_per_batch sorts the whole training set by length, which a streamed "
                "train_dataset (datasets.IterableDataset) cannot offer; unset it or use a map-style Dataset."
            )
        # accelerate's dispatch mode (its default for a streamed dataset) concatenates the batches of several
        # processes, which fails for batches of different shapes: set to False on the given DPOConfig, as TRL
        # does, and said so.
        if args.accelerator_config.dispatch_batches is not False:
            log = logger.warning if args.accelerator_config.dispatch_batches else logger.info
            log("DPOConfig.accelerator_config.dispatch_batches is set to False for a streamed train_dataset.")
            args.accelerator_config.dispatch_batches = False
    if streamed and args.precompute_ref_log_probs:
        raise ValueError(
            f"DPOConfig.precompute_ref_log_probs=True needs map-style datasets, but {', '.join(streamed)} "
            "is streamed (datasets.IterableDataset); set precompute_ref_log_probs=False or load the data "
            "without streaming."
        )
