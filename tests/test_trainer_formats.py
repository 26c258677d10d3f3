"""Every row format through the whole DPOTrainer: conversational, implicit-prompt Anthropic-HH strings,
implicit conversational and ranked rows build a trainer, evaluate to the step-0 loss and train; the
formats that describe the same text tokenize to the same ids; bad rows and bad combinations fail
before training, naming the row and field, also when tokenization runs in worker processes."""

import copy
import json
import math
import os

import pytest
from datasets import Dataset

from dpo_trainer import DPOTrainer
from dpo_trainer.data import split_hh_transcript

from conftest import dpo_config, preference_rows

HH_TRAIN = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "data", "hh_tiny", "train.jsonl")
HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "


def config(tmp_path, **overrides):
    # no truncation: formats are compared on whole rows
    return dpo_config(tmp_path, **{"max_steps": 2, "max_length": 1024, "max_prompt_length": 512, **overrides})


def tokenized(trainer):
    return trainer.train_dataset.to_list()


# ---------------------------------------------------------------- rows in each format


def hh_rows(n=16):
    with open(HH_TRAIN, encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def hh_to_standard(row, index):
    prompt, chosen = split_hh_transcript(row["chosen"], row=index, field="chosen")
    prompt_r, rejected = split_hh_transcript(row["rejected"], row=index, field="rejected")
    assert prompt == prompt_r
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def hh_to_messages(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    messages = []
    for turn in text.split(HUMAN)[1:]:
        user, *replies = turn.split(ASSISTANT)
        messages.append({"role": "user", "content": user})
        messages += [{"role": "assistant", "content": reply} for reply in replies]
    return messages


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conversational_rows(n=16, seed=0):
    """Standard-format rows whose prompt and responses are message lists."""
    return [
        {
            "prompt": [user(row["prompt"])],
            "chosen": [assistant(row["chosen"].lstrip())],
            "rejected": [assistant(row["rejected"].lstrip())],
        }
        for row in preference_rows(n, seed=seed)
    ]


def implicit_conversational_rows(n=16, seed=0):
    return [
        {"chosen": row["prompt"] + [row["chosen"][0]], "rejected": row["prompt"] + [row["rejected"][0]]}
        for row in conversational_rows(n, seed)
    ]


def implicit_string_rows(n=16, seed=0):
    """Rows with no prompt and no Anthropic marker: split at what chosen and rejected share, as in TRL."""
    return [
        {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        for row in preference_rows(n, seed=seed)
    ]


FORMATS = {
    "standard strings": (lambda: preference_rows(16, seed=0), 2),
    "implicit strings without marker": (implicit_string_rows, 2),
    "conversational": (conversational_rows, 2),
    "implicit HH strings": (hh_rows, 2),
    "implicit conversational": (implicit_conversational_rows, 2),
    "ranked K=3": (lambda: preference_rows(16, seed=3, k=3), 3),
}


# ---------------------------------------------------------------- every format through the trainer


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_evaluates_to_the_step_zero_loss_and_trains(tmp_path, make_model, tokenizer, name):
    make_rows, k = FORMATS[name]
    rows = make_rows()
    trainer = DPOTrainer(
        make_model(), args=config(tmp_path), train_dataset=rows, eval_dataset=rows, processing_class=tokenizer
    )
    assert len(trainer.train_dataset) == len(rows)
    assert all(len(responses) == k for responses in trainer.train_dataset["response_ids"])
    metrics = trainer.evaluate()
    # policy == reference at step 0: every ranking is equally likely, loss ln K!
    assert metrics["eval_loss"] == pytest.approx(math.log(math.factorial(k)), abs=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert losses[0] == pytest.approx(math.log(math.factorial(k)), abs=1e-5)
    # the first step moved the policy away from the reference
    assert math.isfinite(losses[1]) and losses[1] != pytest.approx(losses[0], abs=1e-6)


# ---------------------------------------------------------------- formats that describe the same text


def test_hh_strings_tokenize_like_the_equivalent_standard_rows(tmp_path, make_model, tokenizer):
    rows = hh_rows()
    standard = [hh_to_standard(row, i) for i, row in enumerate(rows)]
    assert sum(row["prompt"].count(HUMAN) > 1 for row in standard) >= 1  # multi-turn rows are covered
    assert all(row["prompt"].endswith("\n\nAssistant:") and row["chosen"].startswith(" ") for row in standard)
    model = make_model()
    from_hh = DPOTrainer(model, args=config(tmp_path / "hh"), train_dataset=rows, processing_class=tokenizer)
    from_standard = DPOTrainer(
        model, args=config(tmp_path / "std"), train_dataset=standard, processing_class=tokenizer
    )
    assert tokenized(from_hh) == tokenized(from_standard)


def test_hh_transcripts_as_messages_tokenize_like_the_strings(tmp_path, make_model, tokenizer):
    # The tiny chat template renders Anthropic-HH transcripts, so the same conversation as message lists
    # (implicit conversational, multi-turn included) must give the very same token ids as the raw strings.
    rows = hh_rows()
    as_messages = [
        {"chosen": hh_to_messages(r["chosen"]), "rejected": hh_to_messages(r["rejected"])} for r in rows
    ]
    for row, messages in zip(rows, as_messages):  # the parse round-trips through the template
        assert tokenizer.apply_chat_template(messages["chosen"], tokenize=False) == row["chosen"]
    model = make_model()
    from_text = DPOTrainer(
        model, args=config(tmp_path / "text"), train_dataset=rows, processing_class=tokenizer
    )
    from_messages = DPOTrainer(
        model, args=config(tmp_path / "msgs"), train_dataset=as_messages, processing_class=tokenizer
    )
    assert tokenized(from_messages) == tokenized(from_text)


def test_conversational_and_implicit_conversational_rows_tokenize_alike(tmp_path, make_model, tokenizer):
    model = make_model()
    explicit = DPOTrainer(
        model, args=config(tmp_path / "a"), train_dataset=conversational_rows(), processing_class=tokenizer
    )
    implicit = DPOTrainer(
        model,
        args=config(tmp_path / "b"),
        train_dataset=implicit_conversational_rows(),
        processing_class=tokenizer,
    )
    assert tokenized(explicit) == tokenized(implicit)


def ranked_conversational_rows(n=16, seed=3):
    return [
        {"prompt": [user(row["prompt"])], "responses": [[assistant(r.lstrip())] for r in row["responses"]]}
        for row in preference_rows(n, seed=seed, k=3)
    ]


def test_ranked_rows_with_two_responses_are_standard_pairs(tmp_path, make_model, tokenizer):
    pairs = preference_rows(16, seed=0)
    ranked = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]} for r in pairs]
    model = make_model(seed=1)
    args = dict(loss_type="ipo", beta=0.5)  # K = 2 uses the pairwise loss, so any loss type is allowed
    as_pairs = DPOTrainer(
        model,
        ref_model=make_model(seed=2),
        args=config(tmp_path / "a", **args),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    as_ranking = DPOTrainer(
        model,
        ref_model=make_model(seed=2),
        args=config(tmp_path / "b", **args),
        train_dataset=ranked,
        eval_dataset=ranked,
        processing_class=tokenizer,
    )
    assert tokenized(as_ranking) == tokenized(as_pairs)
    expected, got = as_pairs.evaluate(), as_ranking.evaluate()
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/rejected"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


def test_ranked_conversational_rows_tokenize_like_ranked_strings_rendered(tmp_path, make_model, tokenizer):
    # The tiny template renders [user(p)] + generation prompt as "\n\nHuman: p\n\nAssistant:" and a reply as
    # " " + content, so these message lists are the HH transcripts of the string rows.
    strings = [
        {"prompt": HUMAN + r["prompt"] + ASSISTANT.rstrip(), "responses": r["responses"]}
        for r in preference_rows(16, seed=3, k=3)
    ]
    model = make_model()
    from_messages = DPOTrainer(
        model,
        args=config(tmp_path / "m"),
        train_dataset=ranked_conversational_rows(),
        processing_class=tokenizer,
    )
    from_strings = DPOTrainer(
        model, args=config(tmp_path / "s"), train_dataset=strings, processing_class=tokenizer
    )
    assert tokenized(from_messages) == tokenized(from_strings)


@pytest.mark.parametrize("name", [*FORMATS, "ranked conversational K=3"])
def test_a_dataset_and_a_list_of_dicts_tokenize_alike(tmp_path, make_model, tokenizer, name):
    rows = ranked_conversational_rows() if name == "ranked conversational K=3" else FORMATS[name][0]()
    model = make_model()
    from_list = DPOTrainer(
        model, args=config(tmp_path / "list"), train_dataset=rows, processing_class=tokenizer
    )
    from_dataset = DPOTrainer(
        model, args=config(tmp_path / "ds"), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    assert tokenized(from_list) == tokenized(from_dataset)


def test_implicit_strings_without_marker_give_trls_token_ids(tmp_path, make_model, tokenizer):
    # TRL 1.16 takes the characters chosen and rejected share as the prompt (trl.data_utils.extract_prompt);
    # where the responses open with different letters the cut falls on a token boundary (before the space),
    # so both libraries must give the very same ids (a cut inside a word is the merge case, README)
    import trl

    originals = preference_rows(24, seed=2)
    rows = [
        row
        for row, original in zip(implicit_string_rows(24, seed=2), originals)
        if trl.extract_prompt(row)["prompt"] == original["prompt"]  # not "...: a" when both open with "a"
    ]
    assert len(rows) >= 20
    theirs = trl.DPOTrainer(
        make_model(),
        ref_model=make_model(),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to="none",
            max_length=None,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train_dataset
    ours = DPOTrainer(make_model(), args=config(tmp_path), train_dataset=rows, processing_class=tokenizer)
    for index, (a, b) in enumerate(zip(theirs, ours.train_dataset, strict=True)):
        assert a["prompt_ids"] == b["prompt_ids"], f"row {index}: prompt ids differ"
        assert [a["chosen_ids"], a["rejected_ids"]] == b["response_ids"], f"row {index}: response ids differ"


def test_tokenized_rows_train_and_are_cut_by_the_trainer(tmp_path, make_model, tokenizer):
    from dpo_trainer.data.prepare import prepare_dataset

    rows = preference_rows(16, seed=0)
    ids = prepare_dataset(rows, tokenizer, max_length=None).to_list()
    settings = dict(max_length=12, max_prompt_length=5, truncation_mode="keep_end")
    from_ids = DPOTrainer(
        make_model(), args=config(tmp_path / "ids", **settings), train_dataset=ids, processing_class=tokenizer
    )
    from_text = DPOTrainer(
        make_model(),
        args=config(tmp_path / "text", **settings),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    assert tokenized(from_ids) == tokenized(from_text) != ids
    assert all(len(r["prompt_ids"]) + max(map(len, r["response_ids"])) <= 12 for r in tokenized(from_ids))
    from_ids.train()
    assert from_ids.state.global_step == 2


# ---------------------------------------------------------------- bad rows and bad combinations


def _with_bad_row(rows, index, update):
    rows = [dict(row) for row in rows]
    rows[index].update(update)
    return rows


TOKENIZED_ROWS = [{"prompt_ids": [3, 4, 5], "response_ids": [[6, 7, 1], [8, 1]]}] * 16
TRL_TOKENIZED_ROWS = [{"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7, 1], "rejected_ids": [8, 1]}] * 16

BAD_ROWS = {
    # name: (rows, exception, row, field); row 13 lies in the second worker's shard when num_proc=2
    "standard None": (
        lambda: _with_bad_row(preference_rows(16, seed=0), 13, {"rejected": None}),
        ValueError,
        13,
        "rejected",
    ),
    "HH missing marker": (
        lambda: _with_bad_row(hh_rows(), 13, {"chosen": "\n\nHuman: hi there, no reply marker"}),
        ValueError,
        13,
        "chosen",
    ),
    "HH prompts differ": (
        lambda: _with_bad_row(hh_rows(), 2, {"rejected": "\n\nHuman: another question\n\nAssistant: no."}),
        ValueError,
        2,
        None,
    ),
    "conversational last turn not assistant": (
        lambda: [  # the prompt as in chosen, then a user turn where the assistant's reply should be
            dict(row, rejected=[row["chosen"][0], user("b")]) if i == 11 else row
            for i, row in enumerate(implicit_conversational_rows())
        ],
        ValueError,
        11,
        "rejected",
    ),
    "implicit strings sharing no prompt": (
        lambda: _with_bad_row(implicit_string_rows(), 13, {"rejected": "Why? No."}),
        ValueError,
        13,
        None,
    ),
    "tokenized negative id": (
        lambda: _with_bad_row(TOKENIZED_ROWS, 13, {"prompt_ids": [3, -100]}),
        ValueError,
        13,
        "prompt_ids",
    ),
    "tokenized ref_logps count": (
        lambda: _with_bad_row(
            [dict(r, ref_logps=[-1.0, -2.0]) for r in TOKENIZED_ROWS], 13, {"ref_logps": [-1.0]}
        ),
        ValueError,
        13,
        "ref_logps",
    ),
    "TRL-tokenized empty response": (
        lambda: _with_bad_row(TRL_TOKENIZED_ROWS, 13, {"rejected_ids": []}),
        ValueError,
        13,
        "rejected_ids",
    ),
    "ranked None response": (
        lambda: [
            dict(row, responses=[row["responses"][0], None, row["responses"][2]]) if i == 9 else row
            for i, row in enumerate(preference_rows(16, seed=3, k=3))
        ],
        TypeError,  # a value of the wrong type raises TypeError, naming the row and field
        9,
        "responses[1]",
    ),
}


@pytest.mark.parametrize("num_proc", [None, 2])
@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_rows_are_reported_before_training_naming_the_row(
    tmp_path, make_model, tokenizer, name, num_proc
):
    make_rows, exception, row, field = BAD_ROWS[name]
    args = config(tmp_path, dataset_num_proc=num_proc)
    with pytest.raises(exception) as info:
        DPOTrainer(make_model(), args=args, train_dataset=make_rows(), processing_class=tokenizer)
    message = str(info.value)
    assert f"row {row}" in message, message
    if field is not None:
        assert repr(field) in message, message


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (5, "an int"),
        ([assistant("hi")], "a message list among strings"),
        ([" a.", " b."], "a list of strings"),
    ],
    ids=["int", "messages-among-strings", "list-of-strings"],
)
def test_a_wrongly_typed_value_in_a_list_of_dicts_names_the_row(tmp_path, make_model, tokenizer, value, what):
    # The documented contract (data/formats.py): every bad row raises ValueError, or TypeError for a value
    # of the wrong type, naming the row and field. A list of dicts is a documented train_dataset type, so
    # a bad value in it must be reported the same way, not as an Arrow conversion error.
    rows = _with_bad_row(preference_rows(8, seed=0), 5, {"chosen": value})
    with pytest.raises((TypeError, ValueError)) as info:
        DPOTrainer(make_model(), args=config(tmp_path), train_dataset=rows, processing_class=tokenizer)
    message = str(info.value)
    assert "row 5" in message and "'chosen'" in message, f"{what}: {type(info.value).__name__}: {message}"


def test_bad_eval_rows_fail_at_construction_too(tmp_path, make_model, tokenizer):
    bad = _with_bad_row(preference_rows(8, seed=1), 5, {"chosen": None})
    with pytest.raises(ValueError, match=r"row 5, field 'chosen'"):
        DPOTrainer(
            make_model(),
            args=config(tmp_path),
            train_dataset=preference_rows(8, seed=0),
            eval_dataset=bad,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="ipo"),
        dict(loss_type="hinge"),
        dict(loss_type="robust"),
        dict(loss_type="cdpo", label_smoothing=0.1),  # (sigmoid with label_smoothing: DPOConfig refuses it)
    ],
)
def test_ranked_rows_need_the_plain_sigmoid_loss(tmp_path, make_model, tokenizer, overrides):
    rows = preference_rows(8, seed=3, k=3)
    with pytest.raises(ValueError, match=r"ranks 3 responses.*Plackett-Luce"):
        DPOTrainer(
            make_model(), args=config(tmp_path, **overrides), train_dataset=rows, processing_class=tokenizer
        )
    with pytest.raises(ValueError, match=r"eval_dataset ranks 3"):  # the eval set is checked as well
        DPOTrainer(
            make_model(),
            args=config(tmp_path, **overrides),
            train_dataset=preference_rows(8, seed=0),
            eval_dataset=rows,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "overrides", [dict(loss_weights=[0.5]), dict(f_divergence_type="js_divergence"), dict(use_weighting=True)]
)
def test_ranked_rows_refuse_pairwise_settings_when_the_trainer_is_built(
    tmp_path, make_model, tokenizer, overrides
):
    with pytest.raises(ValueError, match=r"ranks 3 responses.*Plackett-Luce.*would ignore"):
        DPOTrainer(
            make_model(),
            args=config(tmp_path, **overrides),
            train_dataset=preference_rows(8, seed=3, k=3),
            processing_class=tokenizer,
        )


def test_conversational_rows_need_a_chat_template(tmp_path, make_model, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"row 0.*chat_template"):
        DPOTrainer(
            make_model(), args=config(tmp_path), train_dataset=conversational_rows(4), processing_class=plain
        )
