"""Row formats → Example: standard, conversational, implicit (Anthropic-HH), ranked, and bad rows."""

import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpo_trainer import DPOTrainer
from dpo_trainer.data.formats import (
    KNOWN_ROLES,
    Example,
    check_row_text,
    detect_format,
    split_common_prefix,
    split_hh_transcript,
    to_example,
)

from conftest import dpo_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# The generation prompt differs from how an assistant turn opens, so the prompt is no prefix of the full text.
MISMATCHED_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def build_tokenizer(chat_template=None):
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "hi", "hello", "bye"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def chat_tokenizer():
    return build_tokenizer(CHAT_TEMPLATE)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["prompt", "chosen", "rejected"], "standard"),
        (["chosen", "rejected", "id"], "implicit"),
        (["prompt", "responses", "scores"], "ranked"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


@pytest.mark.parametrize("columns", [["text"], ["prompt", "chosen"], ["responses"], ["chosen"]])
def test_detect_format_rejects_unknown_columns(columns):
    with pytest.raises(ValueError, match=r"(?s)standard: prompt, chosen, rejected.*found columns") as info:
        detect_format(columns)
    for column in columns:
        assert column in str(info.value)


def test_detect_format_rejects_ambiguous_columns():
    with pytest.raises(ValueError, match="ambiguous"):
        detect_format(["prompt", "chosen", "rejected", "responses"])


# ---------------------------------------------------------------- standard


def test_standard_strings():
    row = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "extra": 1}
    assert to_example(row, 0, "standard") == Example("Q: 2+2?", (" 4", " 5"), templated=False)


def test_standard_conversational(chat_tokenizer):
    row = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("bye")]}
    example = to_example(row, 0, "standard", chat_tokenizer)
    assert example == Example(
        "<|user|> hi <eos> <|assistant|> ", ("hello <eos> ", "bye <eos> "), templated=True
    )


def test_standard_conversational_multi_turn(chat_tokenizer):
    prompt = [user("hi"), assistant("hello"), user("bye")]
    row = {"prompt": prompt, "chosen": [assistant("bye")], "rejected": [assistant("hi")]}
    example = to_example(row, 0, "standard", chat_tokenizer)
    assert example.prompt == "<|user|> hi <eos> <|assistant|> hello <eos> <|user|> bye <eos> <|assistant|> "
    assert example.responses == ("bye <eos> ", "hi <eos> ")


def test_conversational_needs_chat_template():
    row = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("bye")]}
    with pytest.raises(ValueError, match=r"row 4, field 'prompt'.*chat_template"):
        to_example(row, 4, "standard", build_tokenizer(chat_template=None))
    with pytest.raises(ValueError, match=r"row 4, field 'prompt'.*chat_template"):
        to_example(row, 4, "standard", None)


def test_conversational_prompt_must_prefix_full_render():
    row = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("bye")]}
    with pytest.raises(
        ValueError, match=r"row 2, field 'chosen'.*chat template renders the prompt differently"
    ):
        to_example(row, 2, "standard", build_tokenizer(MISMATCHED_TEMPLATE))


# ---------------------------------------------------------------- implicit


@pytest.mark.parametrize(
    ("text", "prompt", "response"),
    [
        ("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant:", " hello"),
        (
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye",
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:",
            " bye",
        ),
        # odd whitespace: the response keeps its leading whitespace and trailing newlines exactly
        (
            "\n\nHuman:  hi  \n\nAssistant:   two spaces\n\n",
            "\n\nHuman:  hi  \n\nAssistant:",
            "   two spaces\n\n",
        ),
        ("\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:", ""),
        (
            "\n\nHuman: hi\n\nAssistant:\nline one\n\nline two",
            "\n\nHuman: hi\n\nAssistant:",
            "\nline one\n\nline two",
        ),
    ],
)
def test_split_hh_transcript(text, prompt, response):
    assert split_hh_transcript(text, row=0, field="chosen") == (prompt, response)
    assert prompt + response == text


def test_split_hh_transcript_without_marker():
    with pytest.raises(ValueError, match=r"row 7, field 'rejected'.*Assistant:"):
        split_hh_transcript("\n\nHuman: hi\nAssistant: hello", row=7, field="rejected")


def test_implicit_strings_split_at_last_assistant_marker():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: again?\n\nAssistant:"
    # both replies open with the same words; they must stay in the responses, not fold into the prompt
    row = {"chosen": prompt + " Sure, gladly.", "rejected": prompt + " Sure, no."}
    assert to_example(row, 0, "implicit") == Example(prompt, (" Sure, gladly.", " Sure, no."))


def test_implicit_strings_prompts_differ():
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hey\n\nAssistant: hello",
    }
    with pytest.raises(ValueError, match=r"row 3: prompts differ between chosen and rejected"):
        to_example(row, 3, "implicit")


def test_implicit_strings_missing_marker_names_field():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "no marker here"}
    with pytest.raises(ValueError, match=r"row 5, field 'rejected'"):
        to_example(row, 5, "implicit")


def test_implicit_messages(chat_tokenizer):
    history = [user("hi"), assistant("hello"), user("bye")]
    row = {"chosen": [*history, assistant("bye")], "rejected": [*history, assistant("hi")]}
    example = to_example(row, 0, "implicit", chat_tokenizer)
    expected = to_example(
        {"prompt": history, "chosen": [assistant("bye")], "rejected": [assistant("hi")]},
        0,
        "standard",
        chat_tokenizer,
    )
    assert example == expected


def test_implicit_messages_with_no_shared_prompt_are_refused(chat_tokenizer):
    row = {"chosen": [user("hi"), assistant("hello")], "rejected": [user("bye"), assistant("hello")]}
    with pytest.raises(ValueError, match=r"row 6: chosen and rejected share nothing.*'prompt' column"):
        to_example(row, 6, "implicit", chat_tokenizer)


def test_implicit_messages_last_turn_must_be_assistant(chat_tokenizer):
    row = {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), user("hello")]}
    with pytest.raises(ValueError, match=r"row 1, field 'rejected'.*assistant"):
        to_example(row, 1, "implicit", chat_tokenizer)


def test_implicit_messages_need_a_prompt(chat_tokenizer):
    row = {"chosen": [assistant("hello")], "rejected": [assistant("bye")]}
    with pytest.raises(ValueError, match=r"row 1: chosen and rejected share nothing"):
        to_example(row, 1, "implicit", chat_tokenizer)
    # identical single messages: TRL keeps the one message back for the responses, leaving no prompt
    row = {"chosen": [assistant("hello")], "rejected": [assistant("hello"), user("hi"), assistant("bye")]}
    with pytest.raises(ValueError, match=r"row 2: chosen and rejected share only their first message"):
        to_example(row, 2, "implicit", chat_tokenizer)


# ------------------------------------- implicit rows without the marker: TRL 1.16's `extract_prompt`

TRL_IMPLICIT_ROWS = [
    # the TRL suite's rows: the prompt stops before the space that opens the first differing word
    ("Beautiful is better than ugly.", "Beautiful is better than the moon."),
    ("Readability counts.", "Readability is optional."),
    # identical opening words of both replies fold into the prompt (the marker rule exists to avoid this)
    ("Q: colour? A: The sky is bright blue.", "Q: colour? A: The sky is bright red."),
    # divergence inside a word: the prompt ends mid-word, as TRL cuts it
    ("The sky is blue", "The sky is black"),
    # one a prefix of the other, and identical rows: TRL keeps the last shared character for the responses
    ("Go on", "Go on and on"),
    ("Go on and on", "Go on"),
    ("Same text.", "Same text."),
    # newlines and several spaces: only one space is moved to the responses
    ("Line one\nLine two:  yes", "Line one\nLine two:  no"),
    ("Human: hi\nAssistant: hello", "Human: hi\nAssistant: bye"),  # no blank line: not the HH marker
]


@pytest.mark.parametrize(("chosen", "rejected"), TRL_IMPLICIT_ROWS)
def test_implicit_strings_without_marker_split_as_trl(chosen, rejected):
    from trl.data_utils import extract_prompt

    theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert split_common_prefix(chosen, rejected, row=0) == (
        theirs["prompt"],
        theirs["chosen"],
        theirs["rejected"],
    )
    example = to_example({"chosen": chosen, "rejected": rejected}, 0, "implicit")
    assert example == Example(theirs["prompt"], (theirs["chosen"], theirs["rejected"]))


def test_implicit_strings_without_marker_agree_with_trl_on_random_rows():
    from trl.data_utils import extract_prompt

    rng = random.Random(0)
    compared = refused = 0
    for _ in range(3000):
        shared = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 4)))
        chosen = shared + "".join(rng.choice("ab ") for _ in range(rng.randint(0, 4)))
        rejected = shared + "".join(rng.choice("ab ") for _ in range(rng.randint(0, 4)))
        try:
            ours = split_common_prefix(chosen, rejected, row=0)
        except ValueError:
            refused += 1
            # refused exactly where TRL gives no prompt, a prompt that is no prefix of rejected, or fails
            try:
                theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
            except UnboundLocalError:  # an empty chosen or rejected
                continue
            assert theirs["prompt"] == "" or not rejected.startswith(theirs["prompt"]), (chosen, rejected)
            continue
        compared += 1
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"]), (chosen, rejected)
        assert ours[0] and ours[1] and ours[2]  # a prompt and two responses, never empty
    assert compared > 1000 and refused > 100


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        ("Yes, gladly.", "No way.", r"row 4: chosen and rejected share nothing.*'prompt' column"),
        (" yes", " no", r"row 4: chosen and rejected share only ' '"),
        ("a", "ab", r"row 4: chosen and rejected share only 'a'"),
        # TRL: the prompt would be "Yes," (chosen without its last character), a text rejected does not start with
        ("Yes, ", "No, ", r"row 4: chosen and rejected share nothing"),
        ("", "Some text", r"row 4, field 'chosen': empty"),
        ("Some text", "", r"row 4, field 'rejected': empty"),
    ],
)
def test_implicit_strings_without_a_shared_prompt_are_refused(chosen, rejected, message):
    with pytest.raises(ValueError, match=message) as info:
        to_example({"chosen": chosen, "rejected": rejected}, 4, "implicit")
    if "share" in message:
        assert "\\n\\nAssistant:" in str(info.value)  # says the HH marker was looked for


def test_implicit_strings_with_the_marker_in_one_field_only_follow_the_marker_rule():
    # the row is an HH transcript with a broken side: named, not split at a shared prefix
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\nAssistant: bye"}
    with pytest.raises(ValueError, match=r"row 2, field 'rejected': no '\\n\\nAssistant:' marker"):
        to_example(row, 2, "implicit")


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [
        # the final turns differ: the same as all-but-the-last
        ([user("hi"), assistant("hello")], [user("hi"), assistant("bye")]),
        # an earlier assistant turn differs: the prompt stops there, each response holds the rest
        (
            [user("hi"), assistant("hello"), user("bye"), assistant("bye")],
            [user("hi"), assistant("bye"), user("bye"), assistant("hi")],
        ),
        # identical rows, and one a prefix of the other: TRL keeps the last shared message back
        ([user("hi"), assistant("hello")], [user("hi"), assistant("hello")]),
        ([user("hi"), assistant("hello")], [user("hi"), assistant("hello"), user("bye"), assistant("hi")]),
    ],
)
def test_implicit_messages_split_as_trl(chat_tokenizer, chosen, rejected):
    from trl.data_utils import extract_prompt

    theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert split_common_prefix(chosen, rejected, row=0) == (
        theirs["prompt"],
        theirs["chosen"],
        theirs["rejected"],
    )
    example = to_example({"chosen": chosen, "rejected": rejected}, 0, "implicit", chat_tokenizer)
    assert example == to_example(theirs, 0, "standard", chat_tokenizer)


def test_implicit_messages_whose_shared_prompt_is_not_followed_by_an_assistant_turn(chat_tokenizer):
    # the rows share [user, assistant]; the rest opens with a user turn, which no generation prompt precedes
    chosen = [user("hi"), assistant("hello"), user("bye"), assistant("bye")]
    rejected = [user("hi"), assistant("hello"), user("hi"), assistant("hi")]
    with pytest.raises(ValueError, match=r"row 3, field 'chosen'.*followed by an assistant turn.*'user'"):
        to_example({"chosen": chosen, "rejected": rejected}, 3, "implicit", chat_tokenizer)


# ---------------------------------------------------------------- ranked


def test_ranked_strings():
    row = {"prompt": "Q:", "responses": [" best", " middle", " worst"]}
    assert to_example(row, 0, "ranked") == Example("Q:", (" best", " middle", " worst"))


def test_ranked_conversational(chat_tokenizer):
    row = {"prompt": [user("hi")], "responses": [[assistant("hello")], [assistant("hi")], [assistant("bye")]]}
    example = to_example(row, 0, "ranked", chat_tokenizer)
    assert example.responses == ("hello <eos> ", "hi <eos> ", "bye <eos> ")
    assert example.templated


@pytest.mark.parametrize("responses", [[], [" only one"]])
def test_ranked_needs_two_responses(responses):
    with pytest.raises(ValueError, match=r"row 9, field 'responses'.*at least 2"):
        to_example({"prompt": "Q:", "responses": responses}, 9, "ranked")


def test_ranked_responses_must_be_a_list():
    with pytest.raises(TypeError, match=r"row 9, field 'responses'"):
        to_example({"prompt": "Q:", "responses": "a b"}, 9, "ranked")


def test_ranked_bad_response_names_its_position():
    with pytest.raises(TypeError, match=r"row 2, field 'responses\[1\]'"):
        to_example({"prompt": "Q:", "responses": [" a", 3]}, 2, "ranked")


# ---------------------------------------------------------------- bad rows

STANDARD = {"prompt": "Q:", "chosen": " a", "rejected": " b"}


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_missing_value(field):
    row = {k: v for k, v in STANDARD.items() if k != field}
    with pytest.raises(ValueError, match=rf"row 11, field '{field}'.*missing"):
        to_example(row, 11, "standard")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_none_value(field):
    with pytest.raises(ValueError, match=rf"row 12, field '{field}'.*None"):
        to_example({**STANDARD, field: None}, 12, "standard")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("value", [3, 1.5, {"role": "user", "content": "hi"}])
def test_wrong_type(field, value):
    with pytest.raises(TypeError, match=rf"row 13, field '{field}'"):
        to_example({**STANDARD, field: value}, 13, "standard")


def test_wrong_type_in_implicit_row():
    with pytest.raises(TypeError, match=r"row 13, field 'chosen'"):
        to_example({"chosen": 1, "rejected": "\n\nHuman: a\n\nAssistant: b"}, 13, "implicit")


@pytest.mark.parametrize("missing", ["role", "content"])
def test_message_without_key(chat_tokenizer, missing):
    bad = {k: v for k, v in assistant("hello").items() if k != missing}
    row = {"prompt": [user("hi")], "chosen": [assistant("hi"), bad], "rejected": [assistant("bye")]}
    with pytest.raises(ValueError, match=rf"row 14, field 'chosen', message 1: missing '{missing}'"):
        to_example(row, 14, "standard", chat_tokenizer)


def test_message_with_non_string_content(chat_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": 5}],
        "chosen": [assistant("hi")],
        "rejected": [assistant("bye")],
    }
    with pytest.raises(TypeError, match=r"row 15, field 'prompt', message 0: 'content'"):
        to_example(row, 15, "standard", chat_tokenizer)


def test_message_not_a_dict(chat_tokenizer):
    row = {"prompt": [user("hi")], "chosen": [assistant("hi")], "rejected": ["bye"]}
    with pytest.raises(TypeError, match=r"row 16, field 'rejected', message 0"):
        to_example(row, 16, "standard", chat_tokenizer)


def test_empty_message_list(chat_tokenizer):
    row = {"prompt": [], "chosen": [assistant("hi")], "rejected": [assistant("bye")]}
    with pytest.raises(ValueError, match=r"row 17, field 'prompt': empty message list"):
        to_example(row, 17, "standard", chat_tokenizer)


def test_mixing_strings_and_messages(chat_tokenizer):
    row = {"prompt": "Q:", "chosen": [assistant("hi")], "rejected": " b"}
    with pytest.raises(ValueError, match=r"row 18, field 'chosen'.*strings throughout or message lists"):
        to_example(row, 18, "standard", chat_tokenizer)
    row = {"prompt": [user("hi")], "responses": [[assistant("hi")], " b"]}
    with pytest.raises(ValueError, match=r"row 18, field 'responses\[1\]'.*strings throughout"):
        to_example(row, 18, "ranked", chat_tokenizer)
    row = {"chosen": [user("hi"), assistant("a")], "rejected": "\n\nHuman: hi\n\nAssistant: b"}
    with pytest.raises(ValueError, match=r"row 18, field 'rejected'.*strings throughout"):
        to_example(row, 18, "implicit", chat_tokenizer)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        to_example(STANDARD, 0, "pairs")


def test_example_needs_two_responses():
    with pytest.raises(ValueError, match="at least 2"):
        Example("Q:", (" a",))


# ---------------------------------------------------------------- text that is no valid text, roles


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_lone_surrogate_names_row_and_field(field):
    row = {**STANDARD, field: STANDARD[field] + "\ud800 tail"}
    with pytest.raises(ValueError, match=rf"row 21, field '{field}': lone surrogate U\+D800 at character 2"):
        to_example(row, 21, "standard")


def test_lone_surrogate_inside_a_message(chat_tokenizer):
    row = {"prompt": [user("hi")], "chosen": [assistant("hel\udfffo")], "rejected": [assistant("bye")]}
    with pytest.raises(ValueError, match=r"row 22, field 'chosen'\[0\]\['content'\]: lone surrogate U\+DFFF"):
        to_example(row, 22, "standard", chat_tokenizer)


@pytest.mark.parametrize("fmt", ["standard", "implicit", "ranked"])
def test_bytes_value_names_row_and_field(fmt):
    rows = {
        "standard": ({**STANDARD, "chosen": b" a"}, "chosen"),
        "implicit": ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": b"x"}, "rejected"),
        "ranked": ({"prompt": "Q:", "responses": [" a", b" b"]}, r"responses'\[1\]"),
    }
    row, field = rows[fmt]
    with pytest.raises(TypeError, match=rf"row 23, field '{field}'?: a bytes value; decode it"):
        to_example(row, 23, fmt)


def test_bytes_in_a_message_and_in_tools(chat_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": b"hi"}],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
    }
    with pytest.raises(TypeError, match=r"row 24, field 'prompt'\[0\]\['content'\]: a bytes value"):
        to_example(row, 24, "standard", chat_tokenizer)
    row = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")], "tools": b"[]"}
    with pytest.raises(TypeError, match=r"row 24, field 'tools': a bytes value"):
        to_example(row, 24, "standard", chat_tokenizer)


def test_check_row_text_allows_bytes_outside_the_data_columns():
    check_row_text({**STANDARD, "image": b"\x89PNG"}, 0)  # an unrelated binary column is not ours to judge
    with pytest.raises(ValueError, match=r"row 2, field 'source': lone surrogate"):
        check_row_text({**STANDARD, "source": "web\ud800"}, 2)  # but Arrow cannot store this one


@pytest.mark.parametrize("role", ["assisstant", "human", "bot", ""])
def test_unknown_role(chat_tokenizer, role):
    row = {
        "prompt": [{"role": role, "content": "hi"}],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
    }
    with pytest.raises(ValueError, match=rf"row 25, field 'prompt', message 0: unknown role '{role}'"):
        to_example(row, 25, "standard", chat_tokenizer)


@pytest.mark.parametrize("role", KNOWN_ROLES)
def test_known_roles_are_accepted(chat_tokenizer, role):
    row = {
        "prompt": [{"role": role, "content": "hi"}],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
    }
    assert to_example(row, 0, "standard", chat_tokenizer).prompt.startswith(f"<|{role}|> hi")


def test_role_not_a_string(chat_tokenizer):
    row = {"prompt": [{"role": 1, "content": "hi"}], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    with pytest.raises(TypeError, match=r"row 26, field 'prompt', message 0: 'role' must be a string"):
        to_example(row, 26, "standard", chat_tokenizer)


def test_response_must_end_with_an_assistant_turn(chat_tokenizer):
    row = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [user("b")]}
    with pytest.raises(ValueError, match=r"row 27, field 'rejected': the last message must be an assistant"):
        to_example(row, 27, "standard", chat_tokenizer)


def test_template_error_names_the_row():
    # the template raises for roles it does not know; the error keeps its text and gains the row
    strict = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    row = {
        "prompt": [user("hi"), {"role": "tool", "content": "x"}],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
    }
    with pytest.raises(
        ValueError, match=r"row 28, field 'prompt': the chat template cannot render.*no tools here"
    ):
        to_example(row, 28, "standard", build_tokenizer(strict))


# ---------------------------------------------------------------- tool calls, tools, chat_template_kwargs

TOOL_TEMPLATE = (
    "{% if tools %}[tools] {{ tools | map(attribute='name') | join(',') }} {% endif %}"
    "{% if greeting is defined %}[greet] {{ greeting }} {% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }} {% endfor %}"
    "{% else %}{{ m['content'] }} {% endif %}<eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def call(name):
    return {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}],
    }


def test_tool_calls_and_tool_messages_render():
    row = {
        "prompt": [user("hi"), call("bye"), {"role": "tool", "content": "hello"}],
        "chosen": [call("hi")],  # a tool call as the response, without content
        "rejected": [{**assistant("bye"), "tool_calls": None}],  # Arrow fills absent keys with None
        "tools": [{"name": "hi"}, {"name": "bye"}],
    }
    example = to_example(row, 0, "standard", build_tokenizer(TOOL_TEMPLATE))
    assert example.prompt == (
        "[tools] hi,bye <|user|> hi <eos> <|assistant|> call bye <eos> <|tool|> hello <eos> <|assistant|> "
    )
    assert example.responses == ("call hi <eos> ", "bye <eos> ")


def test_tools_as_a_json_string_equal_tools_as_a_list():
    tokenizer = build_tokenizer(TOOL_TEMPLATE)
    base = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("bye")]}
    as_list = to_example({**base, "tools": [{"name": "hi"}]}, 0, "standard", tokenizer)
    as_json = to_example({**base, "tools": '[{"name": "hi"}]'}, 0, "standard", tokenizer)
    assert as_list == as_json and as_list.prompt.startswith("[tools] hi ")
    assert not to_example({**base, "tools": None}, 0, "standard", tokenizer).prompt.startswith("[tools]")


def test_chat_template_kwargs_reach_the_template():
    tokenizer = build_tokenizer(TOOL_TEMPLATE)
    base = {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("bye")]}
    example = to_example({**base, "chat_template_kwargs": {"greeting": "bye"}}, 0, "implicit", tokenizer)
    assert example.prompt == "[greet] bye <|user|> hi <eos> <|assistant|> "
    assert to_example({**base, "chat_template_kwargs": None}, 0, "implicit", tokenizer).prompt.startswith(
        "<|user|>"
    )


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ({"tools": "[{not json"}, ValueError, r"row 29, field 'tools': not valid JSON"),
        ({"tools": 5}, TypeError, r"row 29, field 'tools': expected a list of tool schemas"),
        ({"chat_template_kwargs": "enable_thinking"}, TypeError, r"row 29, field 'chat_template_kwargs'"),
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            ValueError,
            r"row 29, field 'chat_template_kwargs': \['add_generation_prompt'\] are set by the trainer",
        ),
    ],
)
def test_bad_template_columns(chat_tokenizer, extra, error, message):
    row = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")], **extra}
    with pytest.raises(error, match=message):
        to_example(row, 29, "standard", chat_tokenizer)


def test_content_may_be_absent_only_for_a_tool_call(chat_tokenizer):
    row = {
        "prompt": [user("hi")],
        "chosen": [{"role": "assistant", "tool_calls": []}],
        "rejected": [assistant("b")],
    }
    with pytest.raises(ValueError, match=r"row 30, field 'chosen', message 0: missing 'content'"):
        to_example(row, 30, "standard", chat_tokenizer)
    row["chosen"] = [{"role": "user", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    with pytest.raises(ValueError, match=r"row 30, field 'chosen', message 0: missing 'content'"):
        to_example(row, 30, "standard", chat_tokenizer)


# ---------------------------------------------------------------- through DPOTrainer, before Arrow


def _rows_with(index, **values):
    rows = [{"prompt": f"Q{k}:", "chosen": " a", "rejected": " b"} for k in range(8)]
    rows[index] = {**rows[index], **values}
    return rows


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        # Arrow refuses a lone surrogate with an error that names neither row nor field
        (_rows_with(5, rejected=" b\ud800"), ValueError, r"row 5, field 'rejected': lone surrogate"),
        # Arrow silently turns the whole column into bytes, so the error would name row 0
        (_rows_with(6, chosen=b" a"), TypeError, r"row 6, field 'chosen': a bytes value"),
        (
            _rows_with(
                3,
                prompt=[{"role": "narrator", "content": "hi"}],
                chosen=[assistant("a")],
                rejected=[assistant("b")],
            ),
            ValueError,
            r"row 3, field 'prompt', message 0: unknown role 'narrator'",
        ),
    ],
)
def test_trainer_names_the_bad_row_of_a_list_before_training(
    tmp_path, make_model, tokenizer, rows, error, message
):
    with pytest.raises(error, match=rf"train_dataset: {message}"):
        DPOTrainer(make_model(), args=dpo_config(tmp_path), train_dataset=rows, processing_class=tokenizer)
