"""Rows given already tokenized (ours: `prompt_ids`, `response_ids`, `ref_logps`; TRL's: `prompt_ids`,
`chosen_ids`, `rejected_ids`) get what text rows get: truncation, the ranking checks, the dropping of rows
whose response is cut away, errors naming the row and the field. Text beside tokenized columns follows one
rule (`data.tokenized.row_kind`). TRL 1.16 is the oracle for the token ids of its own tokenized rows."""

import math

import pytest
from datasets import Dataset, IterableDataset

from dpo_trainer import DPOTrainer
from dpo_trainer.data import PaddedCollator
from dpo_trainer.data.prepare import prepare_dataset

from conftest import dpo_config, preference_rows

TEXT_COLUMNS = ["prompt", "chosen", "rejected"]


def prepared(rows, tokenizer, **settings):
    settings.setdefault("max_length", None)
    return prepare_dataset(rows, tokenizer, **settings).to_list()


@pytest.fixture
def rows():
    rows = preference_rows(12, seed=8)
    rows[2]["prompt"] = "Tell me about the garden and the river and the lamp:" * 3  # a long prompt
    return rows


@pytest.fixture
def ids(rows, tokenizer):
    """`rows` tokenized, uncut: our columns."""
    return prepared(rows, tokenizer)


def trl_columns(ours: list[dict]) -> list[dict]:
    return [
        {
            "prompt_ids": row["prompt_ids"],
            "chosen_ids": row["response_ids"][0],
            "rejected_ids": row["response_ids"][1],
        }
        for row in ours
    ]


# ---------------------------------------------------------------- truncation, as text rows


TRUNCATIONS = [  # (settings, rows dropped)
    (dict(max_length=14), 1),  # TRL's default mode (keep_start): the long prompt fills max_length
    (dict(max_length=14, truncation_mode="keep_end"), 0),  # the prompt keeps its end, one token at least
    (dict(max_length=16, max_prompt_length=6, truncation_mode="keep_end"), 0),
    (dict(max_length=16, max_prompt_length=6), 0),
    (dict(max_length=9), 9),  # most rows lose a response entirely
]


@pytest.mark.parametrize(("settings", "dropped"), TRUNCATIONS, ids=str)
@pytest.mark.parametrize("columns", ["ours", "trl"])
def test_tokenized_rows_are_truncated_and_dropped_as_text_rows(
    rows, ids, tokenizer, settings, dropped, columns, caplog
):
    given = ids if columns == "ours" else trl_columns(ids)
    with caplog.at_level("WARNING"):
        from_text = prepared(rows, tokenizer, **settings)
        from_ids = prepared(given, tokenizer, **settings)
    assert from_ids == from_text
    assert len(from_text) == len(rows) - dropped
    kept = [row for row in ids if row in from_text]
    assert len(kept) < len(from_text)  # rows were cut, not only dropped
    # dropped rows are reported for ids as for text
    assert caplog.text.count(f"dropping {dropped} of {len(rows)} rows") == (2 if dropped else 0)


def test_rows_truncated_away_entirely_are_refused_for_ids_as_for_text(ids, tokenizer):
    with pytest.raises(ValueError, match="every row has a response truncated away entirely"):
        prepared(ids, tokenizer, max_length=3)


def test_prepared_rows_prepare_to_themselves(ids, tokenizer):
    # DPOTrainer.evaluate prepares a dataset it is given, which may be one it prepared (with its ref_logps)
    once = prepared(ids, tokenizer, max_length=16, max_prompt_length=6)
    with_reference = [dict(row, ref_logps=[-1.5, -2.5]) for row in once]
    assert prepared(with_reference, tokenizer, max_length=16, max_prompt_length=6) == with_reference


# ---------------------------------------------------------------- TRL's tokenized rows: TRL as the oracle


def trl_prepared(tmp_path, make_model, rows, tokenizer, max_length):
    """TRL 1.16's DPOTrainer.train_dataset: the text columns and TRL's ids side by side."""
    import trl  # the oracle, in the dev extras (not in the lowest-versions environment, which skips "trl" tests)

    args = trl.DPOConfig(
        output_dir=str(tmp_path / f"trl{max_length}"),
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        max_length=max_length,
    )
    return trl.DPOTrainer(
        make_model(),
        ref_model=make_model(),  # TRL would reload the reference from the model's (here empty) path
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train_dataset


def completion_mask(features):
    # TRL's completion mask of our rows: 0 over the prompt, 1 over the response, rows as PaddedCollator's
    masks = [[0] * len(f["prompt_ids"]) + [1] * len(f["response_ids"][k]) for k in range(2) for f in features]
    width = max(map(len, masks))
    return [mask + [0] * (width - len(mask)) for mask in masks]


def test_trl_tokenized_rows_give_trls_token_ids(tmp_path, make_model, rows, tokenizer):
    # TRL 1.16 truncates in its collator (keep_start: each sequence keeps its first max_length tokens) and
    # drops rows whose prompt alone fills max_length. Its own DPOTrainer refuses rows holding ids only
    # (extract_prompt looks for `chosen`), so the ids come from its prepared dataset, text columns removed.
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    max_length, pad = 14, tokenizer.pad_token_id
    uncut = trl_prepared(tmp_path, make_model, rows, tokenizer, None)
    theirs = list(trl_prepared(tmp_path, make_model, rows, tokenizer, max_length))
    assert len(theirs) == len(rows) - 1  # the long prompt's row
    expected = DataCollatorForPreference(pad_token_id=pad, max_length=max_length)(theirs)
    ids_only = uncut.remove_columns(TEXT_COLUMNS)
    for given in (ids_only, ids_only.to_list(), ids_only.to_iterable_dataset()):
        ours = list(prepare_dataset(given, tokenizer, max_length=max_length))
        got = PaddedCollator(pad)(ours)
        assert got["input_ids"].tolist() == expected["input_ids"].tolist(), type(given).__name__
        assert got["attention_mask"].tolist() == expected["attention_mask"].tolist()
        assert completion_mask(ours) == expected["completion_mask"].tolist()
    assert any(len(r["prompt_ids"]) + len(r["chosen_ids"]) > max_length for r in theirs)  # cuts were made


def test_text_beside_trl_ids_is_tokenized_from_the_text_as_trl_does(
    tmp_path, make_model, rows, tokenizer, caplog
):
    uncut = trl_prepared(tmp_path, make_model, rows, tokenizer, None)
    assert set(TEXT_COLUMNS) < set(uncut.column_names)  # TRL keeps the text beside its ids
    stale = uncut.map(
        lambda row: {"chosen_ids": [5, 6], "rejected_ids": [7]}
    )  # ids that disagree with the text
    with caplog.at_level("WARNING"):
        ours = prepared(stale, tokenizer)
    assert ours == prepared(rows, tokenizer)
    assert "chosen_ids, prompt_ids, rejected_ids are ignored" in caplog.text
    # TRL itself: the text wins too
    theirs = trl_prepared(tmp_path, make_model, stale.to_list(), tokenizer, None)
    assert theirs["chosen_ids"] == uncut["chosen_ids"]


# ---------------------------------------------------------------- text beside our ids: refused


def test_text_beside_our_ids_is_refused_naming_both_sets(rows, ids, tokenizer):
    both = [dict(row, **tokenized) for row, tokenized in zip(rows, ids)]
    for given in (both, Dataset.from_list(both), Dataset.from_list(both).to_iterable_dataset()):
        with pytest.raises(ValueError) as info:
            prepare_dataset(given, tokenizer, max_length=None, name="train_dataset")
        message = str(info.value)
        assert "train_dataset has both text columns (chosen, prompt, rejected)" in message
        assert "tokenized columns (prompt_ids, response_ids)" in message and "remove_columns" in message


def test_both_sets_of_tokenized_columns_are_refused(ids, tokenizer):
    both = [dict(row, **trl_row) for row, trl_row in zip(ids, trl_columns(ids))]
    with pytest.raises(ValueError, match=r"both our tokenized columns .* and TRL's"):
        prepare_dataset(both, tokenizer, max_length=None)


def test_the_issues_rows_are_refused_when_the_trainer_is_built(tmp_path, make_model, rows, ids, tokenizer):
    # issue 20: text rows with prompt_ids / response_ids and a ref_logps-like column used to be taken as
    # tokenized, the text ignored, and failed in the collator of the first batch
    both = [dict(row, **tokenized, ref_logps=[-1.0]) for row, tokenized in zip(rows, ids)]
    with pytest.raises(ValueError, match="both text columns"):
        DPOTrainer(make_model(), args=dpo_config(tmp_path), train_dataset=both, processing_class=tokenizer)


# ---------------------------------------------------------------- ref_logps checked at preparation


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([-1.0], r"row 5, field 'ref_logps': 1 reference log-probs for 2 responses"),
        ([-1.0, -2.0, -3.0], r"row 5, field 'ref_logps': 3 reference log-probs for 2 responses"),
        (None, r"row 5, field 'ref_logps': value is None"),
        ([-1.0, math.nan], r"row 5, field 'ref_logps': expected finite numbers"),
    ],
)
def test_ref_logps_that_do_not_fit_the_responses_are_refused_naming_the_row(ids, tokenizer, value, message):
    given = [dict(row, ref_logps=[-1.0, -2.0]) for row in ids]
    given[5]["ref_logps"] = value
    for dataset in (given, Dataset.from_list(given)):
        with pytest.raises(ValueError, match=message):
            prepared(dataset, tokenizer)
    streamed = prepare_dataset(Dataset.from_list(given).to_iterable_dataset(), tokenizer, max_length=None)
    with pytest.raises(ValueError, match=message):
        list(streamed)


def test_ref_logps_of_rows_that_truncation_cuts_are_refused(ids, tokenizer):
    given = [dict(row, ref_logps=[-1.0, -2.0]) for row in ids]
    with pytest.raises(
        ValueError, match=r"row 2: truncation \(max_length=30.*'ref_logps' were computed on the uncut"
    ):
        prepared(
            given, tokenizer, max_length=30, truncation_mode="keep_end"
        )  # row 2's prompt loses its start
    # under keep_start row 2's prompt fills max_length: the row is dropped (its reference values with it), and
    # the rest, uncut, keep theirs
    kept = prepared(given, tokenizer, max_length=30)
    assert len(kept) == len(given) - 1 and kept == given[:2] + given[3:]


def test_ref_logps_with_the_wrong_count_fail_when_the_trainer_is_built(tmp_path, make_model, ids, tokenizer):
    given = [dict(row, ref_logps=[-1.0, -2.0]) for row in ids]
    given[7]["ref_logps"] = [-1.0]  # was: 'feature at batch position 0 has 1 ref_logps for 2 responses'
    with pytest.raises(ValueError, match=r"train_dataset: row 7, field 'ref_logps'"):
        DPOTrainer(make_model(), args=dpo_config(tmp_path), train_dataset=given, processing_class=tokenizer)


# ---------------------------------------------------------------- bad ids, named by row and field


@pytest.mark.parametrize(
    ("update", "error", "message"),
    [
        ({"prompt_ids": [3, -100]}, ValueError, r"row 4, field 'prompt_ids': .*-100 at position 1"),
        ({"prompt_ids": []}, ValueError, r"row 4, field 'prompt_ids': empty"),
        ({"prompt_ids": None}, ValueError, r"row 4, field 'prompt_ids': value is None"),
        ({"response_ids": [[5, 2], []]}, ValueError, r"row 4, field 'response_ids\[1\]': empty"),
        ({"response_ids": [[5, 2]]}, ValueError, r"row 4, field 'response_ids': needs at least 2"),
        ({"response_ids": [[5, 2], [6, 2], [7, 2]]}, ValueError, r"row 4: 3 responses where row 0 has 2"),
        ({"response_ids": [[5, 2], [6, 2.5]]}, ValueError, r"row 4, field 'response_ids\[1\]': .*2.5"),
        ({"response_ids": [[5, 2], "abc"]}, TypeError, r"row 4, field 'response_ids\[1\]': expected a list"),
    ],
    ids=[
        "negative",
        "empty prompt",
        "None",
        "empty response",
        "one response",
        "K differs",
        "float",
        "string",
    ],
)
def test_bad_ids_are_named_by_row_and_field(ids, tokenizer, update, error, message):
    given = [dict(row) for row in ids]
    given[4].update(update)
    with pytest.raises(error, match=message):  # a list of dicts: checked before Arrow converts it
        prepared(given, tokenizer)
    try:
        dataset = Dataset.from_list(given)
    except Exception:  # noqa: BLE001 - Arrow refuses the mix: the list case above is the one to check
        return
    if repr(dataset[0]) != repr(given[0]):
        return  # Arrow made every row's ids floats: row 0 is then the first bad row
    with pytest.raises(error, match=message):
        prepared(dataset, tokenizer)
    with pytest.raises(error, match=message):
        list(prepare_dataset(dataset.to_iterable_dataset(), tokenizer, max_length=None))


def test_bad_trl_ids_are_named_by_row_and_field(ids, tokenizer):
    given = trl_columns(ids)
    given[6]["rejected_ids"] = []
    with pytest.raises(ValueError, match=r"row 6, field 'rejected_ids': empty"):
        prepared(given, tokenizer)


# ---------------------------------------------------------------- rankings of tokenized rows

RANKED = [{"prompt_ids": [3, 4], "response_ids": [[5, 2], [6, 2], [7, 2]]}] * 4


@pytest.mark.parametrize(
    "loss",
    [
        dict(loss_type="ipo"),
        dict(loss_type=["sigmoid", "sft"]),
        dict(label_smoothing=0.1),
        dict(loss_weights=[0.5]),
        dict(f_divergence_type="js_divergence"),
        dict(use_weighting=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("given", ["text", "ids", "streamed ids"])
def test_rankings_refuse_the_pairwise_settings_plackett_luce_ignores(tokenizer, loss, given):
    rows = {
        "text": preference_rows(4, seed=3, k=3),
        "ids": RANKED,
        "streamed ids": Dataset.from_list(RANKED).to_iterable_dataset(),
    }[given]
    setting = next(iter(loss))
    with pytest.raises(ValueError, match=rf"ranks 3 responses per row.*Plackett-Luce.*ignore {setting}="):
        prepare_dataset(rows, tokenizer, max_length=None, **loss)


def test_rankings_keep_the_settings_plackett_luce_honours(tokenizer):
    same = dict(
        loss_type=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0, f_divergence_type="reverse_kl"
    )
    assert prepared(RANKED, tokenizer, **same) == RANKED
    pairs = [{"prompt_ids": [3], "response_ids": [[5, 2], [6, 2]]}]  # pairs: every pairwise setting applies
    assert prepared(pairs, tokenizer, loss_type="ipo", loss_weights=[0.5], use_weighting=True) == pairs


def test_streamed_tokenized_rows_are_cut_and_skipped_as_read(ids, tokenizer, caplog):
    stream = IterableDataset.from_generator(lambda: iter(ids))
    with caplog.at_level("WARNING"):
        read = list(prepare_dataset(stream, tokenizer, max_length=14))
    assert read == prepared(ids, tokenizer, max_length=14)
    assert "skipping streamed rows" in caplog.text
