"""tokenize_example: exact ids, EOS handling, the documented truncation order, empty prompts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dpo_trainer.data.formats import Example
from dpo_trainer.data.tokenize import tokenize_example, truncate_ids

from conftest import dpo_config

# ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, a 4, b 5, ..., h 11, j 12, k 13 (no "i")
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", *"abcdefghjk"]
PAD, BOS, EOS = 0, 1, 2
A, B, C, D, E, F, G, H, J, K = range(4, 14)


def build_tokenizer(*, bos_token="<bos>", eos_token="<eos>", adds_bos=False):
    """A word-level tokenizer; ``adds_bos`` prepends BOS when special tokens are added."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token="<pad>",
        bos_token=bos_token,
        unk_token="<unk>",
    )


@pytest.fixture
def tokenizer():
    return build_tokenizer()


def tokenize(example, tokenizer, max_length=None, max_prompt_length=None, **kwargs):
    return tokenize_example(
        example, tokenizer, index=0, max_length=max_length, max_prompt_length=max_prompt_length, **kwargs
    )


def test_exact_ids_with_bos():
    out = tokenize(Example("a b c", (" d e", " f")), build_tokenizer(adds_bos=True))
    assert out == {"prompt_ids": [BOS, A, B, C], "response_ids": [[D, E, EOS], [F, EOS]]}


def test_templated_text_gets_no_extra_special_tokens():
    # a chat template already rendered BOS into the text; tokenizing must not add a second one
    out = tokenize(
        Example("<bos> a b", ("c <eos>", "d <eos>"), templated=True), build_tokenizer(adds_bos=True)
    )
    assert out == {"prompt_ids": [BOS, A, B], "response_ids": [[C, EOS], [D, EOS]]}


def test_eos_appended_once(tokenizer):
    out = tokenize(Example("a", ("b <eos>", "c", "<eos>", "")), tokenizer)
    assert out["response_ids"] == [[B, EOS], [C, EOS], [EOS], [EOS]]


def test_templated_response_ends_as_the_template_ends_it():
    # a chat template that ends the assistant turn with a special token of its own (ChatML's
    # "<|im_end|>\n"): nothing appended, trailing whitespace after it included; one that ends the turn
    # with no special token at all: EOS appended, so that the model still learns to stop
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken("<sep>", special=True)])
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    out = tokenize(Example("a", (" c <sep> ", " d e", " <eos>"), templated=True), tokenizer)
    assert out["response_ids"] == [[C, sep], [D, E, EOS], [EOS]]


def test_plain_text_response_gets_eos_even_after_another_special_token():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken("<sep>", special=True)])
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    out = tokenize(Example("a", (" c <sep>", " d")), tokenizer)
    assert out["response_ids"] == [[C, sep, EOS], [D, EOS]]


def build_metaspace_tokenizer():
    """SentencePiece-style: "▁" marks a word start and is prepended to a text of its own; punctuation
    splits words. So "b" alone is "▁b", while after "a:" it is "b"."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "▁a", ":", "b", "▁b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>"
    ), vocab


def test_response_ids_are_those_that_follow_the_prompt():
    # TRL's ids, and the ones a model produces after this prompt: "b" as continued text, not "▁b"
    tokenizer, vocab = build_metaspace_tokenizer()
    assert tokenizer("b", add_special_tokens=False)["input_ids"] == [vocab["▁b"]]
    out = tokenize(Example("a:", ("b", "b b")), tokenizer)
    assert out["prompt_ids"] == [vocab["▁a"], vocab[":"]]
    assert out["response_ids"] == [[vocab["b"], EOS], [vocab["b"], vocab["▁b"], EOS]]


def test_tokens_merging_across_the_boundary_keep_the_prompt_whole(tokenizer):
    # "a" + "b" tokenizes as one unknown word "ab": the prompt keeps its inference ids and the response
    # is tokenized on its own (TRL would cut the prompt back to the common prefix, here to nothing)
    out = tokenize(Example("a", ("b", " c")), tokenizer)
    assert out == {"prompt_ids": [A], "response_ids": [[B, EOS], [C, EOS]]}


def test_tokenizer_without_eos():
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize(Example("a", ("b", "c")), build_tokenizer(eos_token=None))


# ---------------------------------------------------------------- truncation
# prompt "a b c d e f" is 6 tokens; responses [G, H, EOS] (3) and [J, EOS] (2): 9 tokens in all.
LONG = Example("a b c d e f", ("g h", "j"))


def test_no_truncation_when_it_fits(tokenizer):
    out = tokenize(LONG, tokenizer, max_length=9, max_prompt_length=4)
    assert out == {"prompt_ids": [A, B, C, D, E, F], "response_ids": [[G, H, EOS], [J, EOS]]}


def test_no_truncation_without_max_length(tokenizer):
    out = tokenize(LONG, tokenizer, max_length=None, max_prompt_length=2)
    assert out["prompt_ids"] == [A, B, C, D, E, F]


def test_prompt_keep_end(tokenizer):
    out = tokenize(LONG, tokenizer, max_length=8, max_prompt_length=4)
    assert out == {"prompt_ids": [C, D, E, F], "response_ids": [[G, H, EOS], [J, EOS]]}


def test_prompt_keep_start(tokenizer):
    out = tokenize(LONG, tokenizer, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert out == {"prompt_ids": [A, B, C, D], "response_ids": [[G, H, EOS], [J, EOS]]}


def test_prompt_then_responses_cut(tokenizer):
    # prompt cut to 4, then 6 - 4 = 2 tokens left for each response; the short one already fits
    out = tokenize(LONG, tokenizer, max_length=6, max_prompt_length=4)
    assert out == {"prompt_ids": [C, D, E, F], "response_ids": [[G, H], [J, EOS]]}


def test_responses_fill_the_budget_a_short_prompt_leaves(tokenizer):
    # prompt 2 <= max_prompt_length 3 is kept; responses get 6 - 2 = 4 tokens (the reference
    # implementation would give them 6 - 3 = 3)
    out = tokenize(Example("a b", ("c d e f", "g")), tokenizer, max_length=6, max_prompt_length=3)
    assert out == {"prompt_ids": [A, B], "response_ids": [[C, D, E, F], [G, EOS]]}


def test_max_prompt_length_none_keep_end_leaves_room_for_the_longest_response(tokenizer):
    eos = tokenizer.eos_token_id
    out = tokenize(LONG, tokenizer, max_length=7, max_prompt_length=None)
    assert out == {"prompt_ids": [C, D, E, F], "response_ids": [[G, H, eos], [J, eos]]}
    out = tokenize(LONG, tokenizer, max_length=5, max_prompt_length=None)  # the prompt's end survives
    assert out == {"prompt_ids": [E, F], "response_ids": [[G, H, eos], [J, eos]]}


def test_fully_truncated_responses_are_empty(tokenizer):
    out = tokenize(LONG, tokenizer, max_length=5, max_prompt_length=None, truncation_mode="keep_start")
    assert out == {"prompt_ids": [A, B, C, D, E], "response_ids": [[], []]}


def test_truncate_ids_matches_the_reference_order():
    prompt, responses = truncate_ids(list(range(10)), [[1] * 8, [2] * 3], max_length=12, max_prompt_length=6)
    assert prompt == [4, 5, 6, 7, 8, 9]
    assert responses == [[1] * 6, [2] * 3]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"truncation_mode": "middle"}, "truncation_mode"),
        ({"max_length": 4, "max_prompt_length": 4}, "max_prompt_length"),
        ({"max_length": 4, "max_prompt_length": 8}, "max_prompt_length"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": 4, "max_prompt_length": 0}, "max_prompt_length"),
    ],
)
def test_bad_truncation_settings(tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        tokenize(LONG, tokenizer, **settings)


# ---------------------------------------------------------------- empty prompt


def test_empty_prompt_gets_bos(tokenizer):
    out = tokenize(Example("", ("a", "b")), tokenizer)
    assert out == {"prompt_ids": [BOS], "response_ids": [[A, EOS], [B, EOS]]}


def test_empty_templated_prompt_gets_bos():
    out = tokenize(Example("", ("a", "b"), templated=True), build_tokenizer(adds_bos=True))
    assert out["prompt_ids"] == [BOS]


def test_empty_prompt_without_bos():
    with pytest.raises(ValueError, match=r"row 3, field 'prompt': prompt is empty after tokenization"):
        tokenize_example(
            Example("", ("a", "b")),
            build_tokenizer(bos_token=None),
            index=3,
            max_length=None,
            max_prompt_length=None,
        )


def test_pure(tokenizer):
    first = tokenize(LONG, tokenizer, max_length=6, max_prompt_length=4)
    first["prompt_ids"].append(99)
    assert tokenize(LONG, tokenizer, max_length=6, max_prompt_length=4)["prompt_ids"] == [C, D, E, F]


def test_keep_end_without_a_prompt_cap_keeps_every_row(tokenizer, tmp_path):
    """max_prompt_length=None cuts a long prompt only as far as max_length requires: no row is dropped."""
    from dpo_trainer import DPOTrainer

    rows = [{"prompt": "the garden " * 30 + ":", "chosen": " thanks happy.", "rejected": " go away."}] * 2
    args = dpo_config(tmp_path, max_length=24, max_prompt_length=None, truncation_mode="keep_end")
    dataset = DPOTrainer.prepare_dataset(rows, tokenizer, args, "train_dataset")
    assert len(dataset) == 2
    for prompt, responses in zip(dataset["prompt_ids"], dataset["response_ids"]):
        longest = max(map(len, responses))
        assert len(prompt) + longest == 24 and min(map(len, responses)) > 0
        assert prompt == tokenizer(rows[0]["prompt"])["input_ids"][-len(prompt) :]  # the prompt's end
