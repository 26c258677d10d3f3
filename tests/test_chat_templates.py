"""Tokenization on real chat templates equals TRL 1.16's, token for token.

The templates below are written from the published templates of SmolLM2 (ChatML), Llama 3, Qwen2.5,
Qwen3 (with and without thinking), Gemma 2 and Mistral (v0.1 Instruct), shortened where they only add
text (dates, long default system prompts). Each gets an offline tokenizer built with the `tokenizers`
library the way the real model's is built: byte-level BPE (ChatML, Llama 3, Qwen) or SentencePiece-style
Metaspace BPE (Gemma, Mistral), the template's markers as special tokens, BOS added on encode where the
real tokenizer adds it, and the real eos/bos/pad tokens.

TRL's `DPOTrainer` tokenizes the same rows (the oracle); our prompt and response ids must be equal for
conversational pairs, implicit-prompt conversations, multi-turn prompts, tool calls, per-row
`chat_template_kwargs` and standard string rows. In particular a response ends as the template ends the
assistant turn (`<|im_end|>\\n`, `<|eot_id|>`, `<end_of_turn>\\n`, `</s>`), never with a second EOS.
"""

import copy
import json
import math

import pytest
import trl  # the oracle: a dev/test dependency (setup.cfg extras "dev")
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import dpo_trainer
from dpo_trainer.data import detect_format, to_example, tokenize_example
from dpo_trainer.testing import tiny_causal_lm

# ---------------------------------------------------------------- templates, from the published ones

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_QWEN_TOOLS_HEADER = (
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
)
_QWEN_TOOL_MESSAGE = (
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
)

QWEN2 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    + _QWEN_TOOLS_HEADER
    + "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    + _QWEN_TOOL_MESSAGE
    + "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    + _QWEN_TOOLS_HEADER.replace("'\\n\\n# Tools", "'# Tools")
    + "{%- else %}{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    + _QWEN_TOOL_MESSAGE.replace("message.content", "content")
    + "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# name: (template, pre-tokenization, special tokens (ids 0..), named tokens, BOS added on encode,
#        added non-special tokens, whether the template takes a system message)
SPECS = {
    "smollm2": (
        SMOLLM2,
        "bytelevel",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
        ),
        None,
        [],
        True,
    ),
    "llama3": (
        LLAMA3,
        "bytelevel",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "<|begin_of_text|>",
        [],
        True,
    ),
    "qwen2": (
        QWEN2,
        "bytelevel",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        None,
        ["<tool_call>", "</tool_call>"],
        True,
    ),
    "qwen3": (
        QWEN3,
        "bytelevel",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        None,
        ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        True,
    ),
    "gemma": (
        GEMMA,
        "metaspace-never",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
        "<bos>",
        [],
        False,
    ),
    "mistral": (
        MISTRAL,
        "metaspace-first",
        ["<unk>", "<s>", "</s>"],
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        "<s>",
        [],
        False,
    ),
}
THINKING = ("qwen3",)
TOOLS = ("qwen2", "qwen3")

# ---------------------------------------------------------------- rows

QUESTIONS = ["What is the sky like today?", "How are you?", "Name a green fruit.", "Is it cold outside?"]
GOOD = ["It is blue and clear.", "I am fine, thanks!", "A green apple.", "Yes, take a warm coat."]
BAD = ["No idea.", "Why do you ask?", "Blue.", "I will not say."]
SYSTEM = "You are a kind helper."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def tool_call(city):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {"role": "assistant", "tool_calls": [call]}


def conversational_rows(system: bool):
    rows = []
    for k, (question, good, bad) in enumerate(zip(QUESTIONS, GOOD, BAD)):
        prompt = [user(question)]
        if k % 2:  # multi-turn prompts
            prompt = [user(QUESTIONS[k - 1]), assistant(GOOD[k - 1]), user(question)]
        if system and k == 2:
            prompt = [{"role": "system", "content": SYSTEM}, *prompt]
        rows.append({"prompt": prompt, "chosen": [assistant(good)], "rejected": [assistant(bad)]})
    return rows


def implicit_rows(system: bool):
    return [
        {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        for row in conversational_rows(system)
    ]


def standard_rows():
    # prompts end on a pre-tokenizer boundary (":" then a space), as TRL's joint tokenization needs
    return [
        {"prompt": f"Q: {q}\nA:", "chosen": f" {g}", "rejected": f" {b}"}
        for q, g, b in zip(QUESTIONS, GOOD, BAD)
    ]


def thinking_rows():
    """Qwen3: reasoning in the reply, and thinking switched off per row through chat_template_kwargs."""
    rows = []
    for k, (question, good, bad) in enumerate(zip(QUESTIONS, GOOD, BAD)):
        # thinking on in rows 1 and 3; row 1's reply holds its reasoning, row 3's an empty thought block
        chosen = f"<think>\nThe user asks: {question}\n</think>\n\n{good}" if k == 1 else good
        rows.append(
            {
                "prompt": [user(question)],
                "chosen": [assistant(chosen)],
                "rejected": [assistant(bad)],
                "chat_template_kwargs": {"enable_thinking": k in (1, 3)},
            }
        )
    return rows


def tool_rows():
    """A tool call in the prompt with its result, and a tool call (no content) as the chosen response."""
    tools = json.dumps([WEATHER_TOOL])  # TRL's form: Arrow would reshape per-row schemas otherwise
    return [
        {
            "prompt": [
                user("Is it cold in Paris?"),
                tool_call("Paris"),
                {"role": "tool", "content": "2 degrees"},
            ],
            "chosen": [assistant("Yes, it is 2 degrees in Paris.")],
            "rejected": [assistant("No idea.")],
            "tools": tools,
        },
        {
            "prompt": [user("How warm is Rome?")],
            "chosen": [tool_call("Rome")],
            "rejected": [assistant("It is always warm.")],
            "tools": tools,
        },
    ]


def row_sets(name):
    system = SPECS[name][6]
    sets = {
        "conversational": conversational_rows(system),
        "implicit": implicit_rows(system),
        "standard": standard_rows(),
    }
    if name in THINKING:
        sets["thinking"] = thinking_rows()
    if name in TOOLS:
        sets["tools"] = tool_rows()
    return sets


# ---------------------------------------------------------------- tokenizers and the two libraries


def corpus():
    texts = (
        QUESTIONS + GOOD + BAD + [SYSTEM, json.dumps(WEATHER_TOOL), "Is it cold in Paris? How warm is Rome?"]
    )
    # the templates' own literal text, one piece at a time, so that no merge spans a template boundary
    texts += ["system", "user", "assistant", "model", "[INST]", "[/INST]", "You are Qwen, created by Alibaba"]
    texts += ["You are a helpful AI assistant named SmolLM, trained by Hugging Face", "degrees"]
    return texts * 3


def build_tokenizer(name):
    template, kind, specials, named, encode_bos, added, _ = SPECS[name]
    backend = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    if kind == "bytelevel":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        scheme = kind.split("-")[1]
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = sorted(set("".join(corpus())) | set("▁\n{}\"'<>/_:,.!?[]#"))
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    if encode_bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{encode_bos} $A", special_tokens=[(encode_bos, backend.token_to_id(encode_bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **named)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in added])
    return tokenizer


@pytest.fixture(autouse=True)
def no_trl_telemetry(monkeypatch):
    monkeypatch.setattr("trl.trainer.base_trainer._BaseTrainer._send_telemetry", lambda self: None)


def trl_tokenized(tmp_path, tokenizer, sets, model=None):
    """TRL 1.16's DPOTrainer on a tiny model with `tokenizer`: its tokenized eval datasets, by name."""
    model = (
        model if model is not None else tiny_causal_lm(tokenizer, hidden_size=8, num_layers=1, num_heads=2)
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
        per_device_eval_batch_size=2,
        prediction_loss_only=True,
    )
    trainer = trl.DPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(sets["conversational"]),
        eval_dataset={name: Dataset.from_list(rows) for name, rows in sets.items()},
        processing_class=copy.deepcopy(tokenizer),
    )
    return trainer


def our_tokenized(tokenizer, rows):
    """Our data functions on the rows as a datasets.Dataset gives them (as DPOTrainer.prepare_dataset does)."""
    dataset = Dataset.from_list(rows)
    fmt = detect_format(dataset.column_names)
    return [
        tokenize_example(
            to_example(row, index, fmt, tokenizer),
            tokenizer,
            index=index,
            max_length=None,
            max_prompt_length=None,
        )
        for index, row in enumerate(dataset)
    ]


@pytest.fixture(scope="module")
def tokenizers_by_name():
    return {name: build_tokenizer(name) for name in SPECS}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(SPECS))
def test_token_ids_equal_trl_on_real_templates(tmp_path, tokenizers_by_name, name):
    tokenizer = tokenizers_by_name[name]
    sets = row_sets(name)
    theirs = trl_tokenized(tmp_path, tokenizer, sets)
    eos = tokenizer.eos_token_id
    for set_name, rows in sets.items():
        ours = our_tokenized(tokenizer, rows)
        reference = theirs.eval_dataset[set_name]
        assert len(reference) == len(ours) == len(rows)
        for index, (a, b) in enumerate(zip(reference, ours)):
            where = f"{name}/{set_name} row {index}"
            assert b["prompt_ids"] == a["prompt_ids"], f"{where}: prompt ids differ"
            assert b["response_ids"] == [a["chosen_ids"], a["rejected_ids"]], (
                f"{where}: response ids differ: ours "
                f"{[tokenizer.convert_ids_to_tokens(r) for r in b['response_ids']]}, TRL's "
                f"{tokenizer.convert_ids_to_tokens(a['chosen_ids'])}, "
                f"{tokenizer.convert_ids_to_tokens(a['rejected_ids'])}"
            )
            for response in b["response_ids"]:
                # never a second end of turn (Gemma's turn ends with <end_of_turn>, not its EOS <eos>)
                assert response.count(eos) <= 1, f"{where}: {tokenizer.convert_ids_to_tokens(response)}"


# What each template's assistant turn ends with, read off the published templates (not off our output).
TURN_ENDS = {
    "smollm2": ["<|im_end|>", "Ċ"],
    "llama3": ["<|eot_id|>"],
    "qwen2": ["<|im_end|>", "Ċ"],
    "qwen3": ["<|im_end|>", "Ċ"],
    "gemma": ["<end_of_turn>", "\n"],
    "mistral": ["</s>"],
}


@pytest.mark.parametrize("name", list(SPECS))
def test_responses_end_as_the_template_ends_the_assistant_turn(tokenizers_by_name, name):
    tokenizer = tokenizers_by_name[name]
    for rows in (conversational_rows(SPECS[name][6]), implicit_rows(SPECS[name][6])):
        for out in our_tokenized(tokenizer, rows):
            for response in out["response_ids"]:
                tokens = tokenizer.convert_ids_to_tokens(response)
                ends = TURN_ENDS[name]
                assert tokens[-len(ends) :] == ends, tokens
                assert tokenizer.eos_token_id not in response[: -len(ends)]
    for out in our_tokenized(tokenizer, standard_rows()):  # plain strings still end with EOS
        assert all(response[-1] == tokenizer.eos_token_id for response in out["response_ids"])


def test_mistral_response_tokenizes_as_after_the_prompt(tokenizers_by_name):
    # SentencePiece-style pre-tokenization prepends "▁" to a text of its own; after "[/INST]" the reply
    # has none. The response ids are those of the whole conversation, as at inference.
    tokenizer = tokenizers_by_name["mistral"]
    row = {"prompt": [user("How are you?")], "chosen": [assistant("Fine")], "rejected": [assistant("No")]}
    out = our_tokenized(tokenizer, [row])[0]
    full = tokenizer.apply_chat_template([user("How are you?"), assistant("Fine")], tokenize=True)[
        "input_ids"
    ]
    assert out["prompt_ids"] + out["response_ids"][0] == full
    alone = tokenizer("Fine</s>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0].startswith("▁")
    assert out["response_ids"][0] != alone


def test_qwen3_thinking_switch_and_tools_are_rendered(tokenizers_by_name):
    tokenizer = tokenizers_by_name["qwen3"]
    rows = thinking_rows()
    outs = our_tokenized(tokenizer, rows)
    for row, out in zip(rows, outs):
        prompt = tokenizer.decode(out["prompt_ids"])
        thinking_off = not row["chat_template_kwargs"]["enable_thinking"]
        # the generation prompt holds an empty thought block exactly when thinking is off
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == thinking_off
        chosen = tokenizer.decode(out["response_ids"][0])
        assert chosen.startswith("<think>") != thinking_off
        assert chosen.endswith("<|im_end|>\n")
    tools_rows = tool_rows()
    outs = our_tokenized(tokenizer, tools_rows)
    prompt = tokenizer.decode(outs[0]["prompt_ids"])
    assert '"name": "get_weather"' in prompt and "<tool_response>\n2 degrees\n</tool_response>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    chosen = tokenizer.decode(outs[1]["response_ids"][0])
    assert chosen.endswith('{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n')
    # tools given as a list rather than a JSON string render the same
    as_list = [{**row, "tools": json.loads(row["tools"])} for row in tools_rows]
    assert [to_example(row, i, "standard", tokenizer) for i, row in enumerate(as_list)] == [
        to_example(row, i, "standard", tokenizer) for i, row in enumerate(tools_rows)
    ]


def test_a_template_that_cannot_render_a_row_names_the_row(tokenizers_by_name):
    # SmolLM2's template concatenates message['content'], which a tool-call turn does not have
    row = {
        "prompt": [user("How warm is Rome?")],
        "chosen": [tool_call("Rome")],
        "rejected": [assistant("Warm.")],
    }
    with pytest.raises(ValueError, match=r"row 5, field 'chosen'.*chat template cannot render"):
        to_example(row, 5, "standard", tokenizers_by_name["smollm2"])
    # Gemma refuses system messages
    row = {"prompt": [{"role": "system", "content": SYSTEM}, user("Hi?")], "chosen": [assistant("Hello.")]}
    row["rejected"] = [assistant("Go away.")]
    with pytest.raises(ValueError, match=r"row 2, field 'prompt'.*System role not supported"):
        to_example(row, 2, "standard", tokenizers_by_name["gemma"])


def test_evaluation_metrics_equal_trl_on_a_chatml_template(tmp_path, tokenizers_by_name):
    """The double-EOS bug showed in every log-prob; with equal ids, TRL's eval metrics are ours."""
    tokenizer = tokenizers_by_name["smollm2"]
    rows = conversational_rows(True)
    policy = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    reference = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=2)
    theirs = trl.DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            max_length=None,
            save_strategy="no",
            disable_tqdm=True,
            per_device_eval_batch_size=2,
            prediction_loss_only=True,
            beta=0.2,
        ),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),
    )
    ours = dpo_trainer.DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=dpo_trainer.DPOConfig(
            output_dir=str(tmp_path / "ours"),
            report_to="none",
            use_cpu=True,
            bf16=False,  # as TRL's arm
            gradient_checkpointing=False,
            max_length=4096,
            max_prompt_length=2048,
            save_strategy="no",
            disable_tqdm=True,
            per_device_eval_batch_size=2,
            beta=0.2,
            ref_logps_cache_dir=str(tmp_path / "cache"),
        ),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=copy.deepcopy(tokenizer),
    )
    for a, b in zip(theirs.eval_dataset, ours.eval_dataset):
        assert b["prompt_ids"] == a["prompt_ids"]
        assert b["response_ids"] == [a["chosen_ids"], a["rejected_ids"]]
    trl_metrics, our_metrics = theirs.evaluate(), ours.evaluate()
    assert abs(our_metrics["eval_rewards/margins"]) > 1e-3  # policy != reference
    for key in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins"):
        assert math.isfinite(our_metrics[key])
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=2e-6), key


def test_trainer_takes_tool_calls_tools_and_chat_template_kwargs(tmp_path, tokenizers_by_name):
    tokenizer = tokenizers_by_name["qwen3"]
    sets = {"conversational": conversational_rows(True), "tools": tool_rows(), "thinking": thinking_rows()}
    theirs = trl_tokenized(tmp_path, tokenizer, sets)
    model = tiny_causal_lm(tokenizer, hidden_size=8, num_layers=1, num_heads=2)
    ours = dpo_trainer.DPOTrainer(
        model,
        args=dpo_trainer.DPOConfig(
            output_dir=str(tmp_path / "ours"),
            report_to="none",
            use_cpu=True,
            bf16=False,  # as TRL's arm
            gradient_checkpointing=False,
            max_length=4096,
            max_prompt_length=2048,
            save_strategy="no",
            disable_tqdm=True,
            per_device_eval_batch_size=2,
            ref_logps_cache_dir=str(tmp_path / "cache"),
        ),
        train_dataset=sets["tools"],  # a list of dicts
        eval_dataset=Dataset.from_list(sets["thinking"]),  # a datasets.Dataset
        processing_class=copy.deepcopy(tokenizer),
    )
    for set_name, dataset in (("tools", ours.train_dataset), ("thinking", ours.eval_dataset)):
        for a, b in zip(theirs.eval_dataset[set_name], dataset, strict=True):
            assert b["prompt_ids"] == a["prompt_ids"], set_name
            assert b["response_ids"] == [a["chosen_ids"], a["rejected_ids"]], set_name
    # policy == reference at step 0: the loss is ln 2
    assert ours.evaluate()["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_a_reply_at_odds_with_the_template_is_refused_naming_the_row(tokenizers_by_name):
    # Qwen3 with thinking off renders an empty thought block as the generation prompt, while a reply that
    # holds reasoning renders it in full: the prompt alone is no prefix of the conversation. TRL trains on
    # the shared start (a context inference never shows); we refuse the row.
    row = {**thinking_rows()[1], "chat_template_kwargs": {"enable_thinking": False}}
    with pytest.raises(
        ValueError, match=r"row 1, field 'chosen'.*renders the prompt differently.*enable_thinking"
    ):
        to_example(row, 1, "standard", tokenizers_by_name["qwen3"])
