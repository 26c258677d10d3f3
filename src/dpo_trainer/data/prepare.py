"""Datasets in, tokenized datasets out: `prepare_dataset`, used by `DPOTrainer` and by `sft`.

Rows in any supported format (`formats`), or already tokenized (our `prompt_ids` / `response_ids`, or TRL's
`prompt_ids` / `chosen_ids` / `rejected_ids`: `tokenized`), become one tokenized row per example. Lists of dicts,
`datasets.Dataset` and streamed `datasets.IterableDataset` are accepted; a bad row is named by its index and
field, never left to fail inside Arrow or torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pyarrow
from datasets import Dataset, IterableDataset

from .formats import check_row_text, detect_format, to_example
from .tokenize import check_truncation_settings, tokenize_example
from .tokenized import TOKENIZED_COLUMNS, TRL_TOKENIZED_COLUMNS, from_ids, given_responses, row_kind

logger = logging.getLogger(__name__)


def _named(dataset_name: str, function, *args, **kwargs):
    """Call `function`, prefixing the data errors it raises with the dataset's name."""
    try:
        return function(*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{dataset_name}: {error}") from error


def _check_text_only(columns, name: str) -> None:
    """TRL raises for image columns given to a text model; they must not be dropped silently."""
    found = [column for column in ("image", "images") if column in set(columns)]
    if found:
        raise ValueError(
            f"The dataset appears to be vision-related ({name} has an {found[0]!r} column), but the provided "
            "model does not seem to be a vision-language model: dpo_trainer trains text-only causal language "
            "models. Remove the column to train on the text alone."
        )


def check_ranking(
    num_responses: int,
    loss_type: str | Sequence[str],
    label_smoothing: float,
    name: str,
    *,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    use_weighting: bool = False,
) -> None:
    """Rankings (K > 2 responses) train with the Plackett-Luce loss, which takes β only: refuse the pairwise
    settings it would ignore (a loss other than `sigmoid`, label smoothing, loss weights, an f-divergence, WPO).
    """
    if num_responses <= 2:
        return
    losses = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    ignored = {
        "loss_type": losses != ["sigmoid"],
        "label_smoothing": bool(label_smoothing),
        "loss_weights": loss_weights is not None and [float(w) for w in loss_weights] != [1.0],
        "f_divergence_type": f_divergence_type != "reverse_kl",
        "use_weighting": bool(use_weighting),
    }
    values = {
        "loss_type": loss_type,
        "label_smoothing": label_smoothing,
        "loss_weights": loss_weights,
        "f_divergence_type": f_divergence_type,
        "use_weighting": use_weighting,
    }
    found = [f"{setting}={values[setting]!r}" for setting, bad in ignored.items() if bad]
    if found:
        raise ValueError(
            f"{name} ranks {num_responses} responses per row, which trains with the Plackett-Luce loss (paper App. "
            f"A.3); it takes beta only, and would ignore {', '.join(found)}. Use loss_type='sigmoid', "
            "label_smoothing=0, loss_weights=None, f_divergence_type='reverse_kl' and use_weighting=False, or give "
            "pairs."
        )


# Columns of tokenized rows that text rows may carry too (TRL's prepared datasets keep their text): ignored.
_IGNORED_BESIDE_TEXT = {*TOKENIZED_COLUMNS, *TRL_TOKENIZED_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"}


def _row_tokenizer(columns, first_row, tokenizer, settings: dict, name: str):
    """(row, index) -> tokenized row, for a dataset with `columns`; the number of responses per row."""
    kind = row_kind(columns, name)
    if kind != "text":
        num_responses = len(_named(name, given_responses, first_row, 0, kind))
        with_reference = kind == "ours" and "ref_logps" in set(columns)
        convert = from_ids(kind, num_responses, with_reference, settings)
        return (lambda row, index: _named(name, convert, row, index)), num_responses
    ignored = sorted(set(columns) & _IGNORED_BESIDE_TEXT)
    if ignored:
        logger.warning(
            "%s: the rows are tokenized from their text, and the columns %s are ignored (as TRL ignores its "
            "tokenized columns beside text); to train on token ids as given, remove the text columns.",
            name,
            ", ".join(ignored),
        )
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


def _as_dataset(dataset, tokenizer, settings: dict, name: str) -> Dataset:
    """A list of dicts as a `datasets.Dataset`, each row's text checked first (Arrow would fail without it)."""
    if not dataset:
        raise ValueError(f"{name} is empty.")
    if not all(isinstance(row, Mapping) for row in dataset):
        raise TypeError(f"{name}: a list dataset must hold dicts (rows).")
    _check_text_only(dataset[0].keys(), name)
    for index, row in enumerate(dataset):
        _named(name, check_row_text, row, index)
    if row_kind(dataset[0].keys(), name) != "text":
        # token ids are checked before Arrow turns a column holding one float into floats in every row
        convert, _ = _row_tokenizer(dataset[0].keys(), dataset[0], tokenizer, settings, name)
        for index, row in enumerate(dataset):
            convert(row, index)
    try:
        return Dataset.from_list(list(dataset))
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        # Arrow rejects mixed types before any row is checked: find the row and field ourselves.
        convert, _ = _row_tokenizer(dataset[0].keys(), dataset[0], tokenizer, settings, name)
        for index, row in enumerate(dataset):
            convert(row, index)
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
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    use_weighting: bool = False,
    num_proc: int | None = None,
    name: str = "dataset",
    warn_identical: bool = True,
):
    """Rows in any supported format -> `prompt_ids`, `response_ids` (one tokenized row per example).

    `max_length`, `max_prompt_length` and `truncation_mode` truncate as `DPOConfig` documents; the loss settings
    (`loss_type`, `label_smoothing`, `loss_weights`, `f_divergence_type`, `use_weighting`) decide whether
    rankings (K > 2 responses) are allowed (`check_ranking`). Rows already tokenized (ours, or TRL's) are
    checked, truncated and dropped as text rows are, and keep their `ref_logps` (one per response) where nothing
    is cut; text beside tokenized columns follows `tokenized.row_kind`. A streamed `datasets.IterableDataset` is
    tokenized lazily, as it is read. Rows whose responses are truncated away entirely are dropped with a
    warning (all of them: a value error). Rows with two token-identical responses are kept, with one warning
    giving their count and the first one's index (a streamed dataset: the first one's), unless `warn_identical`
    is False (fine-tuning on the chosen responses alone, where rejected may repeat chosen). None gives None.

    >>> from dpo_trainer.testing import train_tokenizer
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
    loss = {
        "loss_type": loss_type,
        "label_smoothing": label_smoothing,
        "loss_weights": loss_weights,
        "f_divergence_type": f_divergence_type,
        "use_weighting": use_weighting,
    }
    if isinstance(dataset, IterableDataset):
        return _prepare_streamed(dataset, tokenizer, settings, loss, name, warn_identical)
    if isinstance(dataset, list):
        dataset = _as_dataset(dataset, tokenizer, settings, name)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{name} must be a datasets.Dataset, a datasets.IterableDataset or a list of dicts, got "
            f"{type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    tokenize, num_responses = _row_tokenizer(dataset.column_names, dataset[0], tokenizer, settings, name)
    check_ranking(num_responses, name=name, **loss)
    dataset = dataset.map(
        tokenize,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Tokenizing {name}",
    )
    all_responses = dataset["response_ids"]
    emptied = [i for i, responses in enumerate(all_responses) if min(map(len, responses)) == 0]
    if warn_identical:
        identical = [i for i, responses in enumerate(all_responses) if _has_identical(responses)]
        _warn_identical(identical, len(dataset), name)
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


def _has_identical(responses: Sequence[Sequence[int]]) -> bool:
    """Whether two of a row's responses are the same token ids (and not emptied by truncation)."""
    kept = [tuple(ids) for ids in responses if ids]
    return len(set(kept)) < len(kept)


def _warn_identical(rows: list[int], total: int | None, name: str) -> None:
    """Warn once about rows whose responses are token-identical (`rows`: their indices, in order)."""
    if not rows:
        return
    how_many = f"{len(rows)} of {total} rows" if total is not None else "rows"
    logger.warning(
        "%s: %s (first: row %d) have two responses with identical token ids after tokenization and truncation: "
        "under a preference loss their margin is 0 whatever the model does, so they add a constant (ln 2 for "
        "DPO's sigmoid loss) and teach nothing while counting in the mean. Remove them, or raise max_length if "
        "truncation made them equal.",
        name,
        how_many,
        rows[0],
    )


def prepare_each(datasets, tokenizer, name: str, **settings):
    """`prepare_dataset` on a dataset, or on each dataset of a dict of them (named "<name>['<key>']")."""
    if isinstance(datasets, Mapping):
        return {
            key: prepare_dataset(value, tokenizer, **settings, name=f"{name}[{key!r}]")
            for key, value in datasets.items()
        }
    return prepare_dataset(datasets, tokenizer, **settings, name=name)


def _prepare_streamed(
    dataset: IterableDataset, tokenizer, settings: dict, loss: dict, name: str, warn_identical: bool = True
) -> IterableDataset:
    """Tokenize a streamed dataset lazily; checks that need the whole set are made per row as it is read."""
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"{name} is empty.")
    columns = list(first.keys())
    tokenize, num_responses = _row_tokenizer(columns, first, tokenizer, settings, name)
    check_ranking(num_responses, name=name, **loss)
    warned, identical = [], []

    def keep(row, index) -> bool:
        if warn_identical and not identical and _has_identical(row["response_ids"]):
            identical.append(index)  # the count is not known before the stream is read: the first one only
            _warn_identical(identical, None, name)
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

    # Columns the rows are replaced by are kept by name: datasets 3.0 removes `remove_columns` after the map,
    # which would drop the new `prompt_ids` / `response_ids` of rows given tokenized (later releases remove first).
    try:
        produced = set(tokenize(dict(first), 0))
    except ValueError:  # a bad first row is named when the stream is read
        produced = {"prompt_ids", "response_ids"}
    dropped = [column for column in columns if column not in produced]
    return dataset.map(tokenize, with_indices=True, remove_columns=dropped).filter(keep, with_indices=True)


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
    """Refuse rows longer than a model's positions before training, not mid-run.

    `limit` is (what limits, positions) (`models.position_limit`: `max_position_embeddings`, or the length a
    RoPE scaling reaches). Every layout gives a response the positions after its prompt, so a row needs
    prompt + longest response positions.
    """
    if limit is None:
        return
    what, positions = limit
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
                    f"{what}; set DPOConfig.max_length <= {positions}."
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
            f"`precompute_ref_log_probs=True` is not supported with IterableDataset: {', '.join(streamed)} "
            "is streamed (datasets.IterableDataset), and the reference log-probs are computed over a map-style "
            "dataset before training. Set precompute_ref_log_probs=False or load the data without streaming."
        )
