"""Preference rows of any supported format → :class:`Example` (prompt, responses best first).

Formats (see :func:`detect_format`):

- ``standard``: ``prompt``, ``chosen``, ``rejected``. Strings, or lists of ``{"role", "content"}``
  messages (conversational), which are rendered with the tokenizer's chat template.
- ``implicit``: ``chosen`` and ``rejected`` only. Strings holding Anthropic's ``"\\n\\nAssistant:"``
  marker are HH transcripts, split at its last occurrence as the paper's reference implementation does;
  other strings, and message lists, are split as TRL 1.16's ``extract_prompt`` splits them: the prompt is
  what both share (:func:`split_common_prefix`).
- ``ranked``: ``prompt`` and ``responses`` (two or more, best first), strings or message lists.

Conversational rows may hold tool calls, as TRL 1.16 accepts them: assistant messages with ``tool_calls``
(``content`` then optional), ``tool`` messages, an optional ``tools`` column (a list of tool schemas or
its JSON string) and an optional ``chat_template_kwargs`` column (a dict, e.g. ``{"enable_thinking":
False}``); both are passed to ``tokenizer.apply_chat_template``.

Every bad row raises ``ValueError`` (``TypeError`` for a value of the wrong type) naming the row and field:
``bytes`` values, strings with lone surrogates (not valid Unicode), messages that are not dicts or lack a
role, unknown roles, and chat templates that fail on the row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HH_ASSISTANT_MARKER = "\n\nAssistant:"

FORMAT_COLUMNS = {
    "standard": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
}
MIN_RESPONSES = 2

# Optional columns of conversational rows, passed to the chat template (as TRL 1.16 does).
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
_DATA_COLUMNS = {column for columns in FORMAT_COLUMNS.values() for column in columns} | set(TEMPLATE_COLUMNS)
# Roles of the published chat templates (Llama 3.1 names tool results "ipython"; OpenAI's "developer" and
# "function"); anything else is most likely a typo that a template would render verbatim or reject.
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
# apply_chat_template arguments the trainer sets itself; a row may not override them.
_RESERVED_TEMPLATE_KWARGS = (
    "conversation",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_assistant_tokens_mask",
)


@dataclass(frozen=True)
class Example:
    """One preference example, ready for tokenization.

    Attributes:
        prompt: the text the model sees before each response.
        responses: the responses, best first; at least two (pairs are ``(chosen, rejected)``).
        templated: True when a chat template rendered the text, which then already holds any special
            tokens: tokenize it without adding special tokens, and end each response as the template
            ends the assistant turn.
    """

    prompt: str
    responses: tuple[str, ...]
    templated: bool = False

    def __post_init__(self):
        if len(self.responses) < MIN_RESPONSES:
            raise ValueError(
                f"an Example needs at least {MIN_RESPONSES} responses, got {len(self.responses)}"
            )


def detect_format(column_names) -> str:
    """Name the format of a dataset from its column names; extra columns are allowed.

    >>> detect_format(["prompt", "chosen", "rejected", "source"])
    'standard'
    >>> detect_format(["chosen", "rejected"])
    'implicit'
    >>> detect_format(["prompt", "responses"])
    'ranked'
    """
    columns = set(column_names)
    found = [name for name in ("standard", "ranked") if set(FORMAT_COLUMNS[name]) <= columns]
    if len(found) == 1:
        return found[0]
    accepted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    if found:
        raise ValueError(
            f"ambiguous columns: both standard and ranked match ({accepted}); found columns {sorted(columns)}"
        )
    if set(FORMAT_COLUMNS["implicit"]) <= columns and "prompt" not in columns:
        return "implicit"
    raise ValueError(
        f"unrecognised columns; accepted column sets are {accepted}; found columns {sorted(columns)}"
    )


def split_hh_transcript(text: str, *, row: int, field: str) -> tuple[str, str]:
    """Split an Anthropic-HH transcript into (prompt, response) at the LAST ``"\\n\\nAssistant:"``.

    The prompt includes the marker; the response keeps its leading space.

    >>> split_hh_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant: Ciao",
    ...                     row=0, field="chosen")
    ('\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant:', ' Ciao')
    """
    _require_text(text, row, field)
    cut = text.rfind(HH_ASSISTANT_MARKER)
    if cut < 0:
        raise ValueError(f"{_where(row, field)}: no {HH_ASSISTANT_MARKER!r} marker to split the prompt at")
    cut += len(HH_ASSISTANT_MARKER)
    return text[:cut], text[cut:]


def check_row_text(row: Mapping, index: int) -> None:
    """Raise for text that Arrow or a tokenizer cannot take, naming the row and the field.

    The data columns (those of every format, and :data:`TEMPLATE_COLUMNS`) must hold no ``bytes``
    (``TypeError``); no string in any column may hold a lone surrogate (``ValueError``). Cheap enough to
    run on every row of a list before it becomes an Arrow table, which would otherwise fail without naming
    the row, or silently turn a whole string column into bytes.

    >>> check_row_text({"prompt": "Q\\ud800", "chosen": " a", "rejected": " b"}, 3)
    Traceback (most recent call last):
    ...
    ValueError: row 3, field 'prompt': lone surrogate U+D800 at character 1, which is not valid Unicode text (a string decoded with errors='surrogatepass' or a JSON '\\ud800' escape?); fix or drop the row
    """
    for field, value in row.items():
        _check_text(value, _where(index, field), allow_bytes=field not in _DATA_COLUMNS)


def to_example(row: Mapping, index: int, fmt: str, tokenizer=None) -> Example:
    """Turn one dataset row of format ``fmt`` into an :class:`Example`.

    ``index`` is the row's position, used in error messages. ``tokenizer`` (with a ``chat_template``)
    is needed only for message lists.

    >>> to_example({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, 0, "standard")
    Example(prompt='Q:', responses=(' yes', ' no'), templated=False)
    """
    if fmt not in FORMAT_COLUMNS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMAT_COLUMNS)}")
    check_row_text(row, index)
    if fmt == "standard":
        prompt = _field(row, index, "prompt")
        responses = [("chosen", _field(row, index, "chosen")), ("rejected", _field(row, index, "rejected"))]
        return _build(("prompt", prompt), responses, index, row, tokenizer)
    if fmt == "implicit":
        return _implicit(row, index, tokenizer)
    prompt = _field(row, index, "prompt")
    responses = _field(row, index, "responses")
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise TypeError(
            f"{_where(index, 'responses')}: expected a list of responses, got {type(responses).__name__}"
        )
    if len(responses) < MIN_RESPONSES:
        raise ValueError(
            f"{_where(index, 'responses')}: needs at least {MIN_RESPONSES} responses, got {len(responses)}"
        )
    named = [(f"responses[{k}]", response) for k, response in enumerate(responses)]
    return _build(("prompt", prompt), named, index, row, tokenizer)


_NO_MARKER = f", used where there is no {HH_ASSISTANT_MARKER!r} marker to split at"


def split_common_prefix(chosen, rejected, *, row: int) -> tuple:
    """Split a row without a prompt as TRL 1.16's ``extract_prompt`` does: (prompt, chosen rest, rejected rest).

    ``chosen`` and ``rejected`` are both strings (compared character by character) or both message lists
    (compared message by message). The prompt is their longest common prefix, less a space that ends it (the
    responses then open with it). Where one is a prefix of the other, TRL keeps their last shared item back
    as the start of both responses. Where the prefix is empty (they differ from the start, or share only a
    leading space) there is no prompt: ``ValueError`` naming the row, where TRL would train on an empty
    prompt (or, when ``chosen`` ends with a space, cut a "prompt" that is no prefix of ``rejected``).

    >>> split_common_prefix("The sky is blue.", "The sky is green.", row=0)
    ('The sky is', ' blue.', ' green.')
    >>> split_common_prefix("Go on", "Go on and on", row=0)
    ('Go o', 'n', 'n and on')
    """
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if len(value) == 0:
            raise ValueError(f"{_where(row, field)}: empty, so there is no response to take from it")
    shortest = min(len(chosen), len(rejected))
    differ = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if differ is None:  # one is a prefix of the other: TRL's loop ends on the last shared item
        cut = shortest - 1
    elif differ > 0 and isinstance(chosen, str) and chosen[differ - 1] == " ":
        cut = differ - 1  # TRL: "remove space before the prompt" (it opens the responses)
    else:
        cut = differ
    if cut == 0:
        text = isinstance(chosen, str)
        shared = "nothing" if differ == 0 else f"only {chosen[:1]!r}" if text else "only their first message"
        raise ValueError(
            f"row {row}: chosen and rejected share {shared} at their start, so no prompt can be taken from them "
            f"(TRL's rule for rows without a 'prompt' column{_NO_MARKER if text else ''}); give the prompt in a "
            "'prompt' column"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _implicit(row: Mapping, index: int, tokenizer) -> Example:
    chosen, rejected = _field(row, index, "chosen"), _field(row, index, "rejected")
    kind = _same_kind([("chosen", chosen), ("rejected", rejected)], index)
    if kind == "text" and (HH_ASSISTANT_MARKER in chosen or HH_ASSISTANT_MARKER in rejected):
        chosen_prompt, chosen_response = split_hh_transcript(chosen, row=index, field="chosen")
        rejected_prompt, rejected_response = split_hh_transcript(rejected, row=index, field="rejected")
        if chosen_prompt != rejected_prompt:
            raise ValueError(
                f"row {index}: prompts differ between chosen and rejected "
                f"(the text up to the last {HH_ASSISTANT_MARKER!r} must be identical)"
            )
        return Example(chosen_prompt, (chosen_response, rejected_response))
    prompt, chosen_rest, rejected_rest = split_common_prefix(
        list(chosen) if kind == "messages" else chosen,
        list(rejected) if kind == "messages" else rejected,
        row=index,
    )
    if kind == "text":
        return Example(prompt, (chosen_rest, rejected_rest))
    for field, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if rest[0]["role"] != "assistant":
            raise ValueError(
                f"{_where(index, field)}: the messages chosen and rejected share (the prompt, messages 0 to "
                f"{len(prompt) - 1}) must be followed by an assistant turn, got role {rest[0]['role']!r} at "
                f"message {len(prompt)}"
            )
    return _render(
        ("chosen", prompt), [("chosen", chosen_rest), ("rejected", rejected_rest)], index, row, tokenizer
    )


def _build(
    prompt: tuple[str, object], responses: list[tuple[str, object]], index: int, row: Mapping, tokenizer
) -> Example:
    """Check that the prompt and responses are all strings or all message lists, then build the Example."""
    if _same_kind([prompt, *responses], index) == "text":
        return Example(prompt[1], tuple(text for _, text in responses))
    return _render(prompt, responses, index, row, tokenizer)


def _render(
    prompt: tuple[str, list], responses: list[tuple[str, list]], index: int, row: Mapping, tokenizer
) -> Example:
    """Render a conversation with the chat template; each response is the text the full render adds.

    The full render keeps whatever the template writes after the assistant's reply (``<|im_end|>\\n``,
    ``<|eot_id|>``, ``<end_of_turn>\\n``, ``</s>``): that is how the turn ends at inference.
    """
    prompt_field, prompt_messages = prompt
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{_where(index, prompt_field)}: message lists (conversational data) need a tokenizer with a chat_template"
        )
    for field, messages in responses:
        _require_assistant_last(messages, index, field)
    kwargs = _template_kwargs(row, index)
    prompt_messages = [dict(m) for m in prompt_messages]
    prompt_text = _apply_template(
        tokenizer, prompt_messages, index, prompt_field, add_generation_prompt=True, **kwargs
    )
    texts = []
    for field, messages in responses:
        full = _apply_template(
            tokenizer, prompt_messages + [dict(m) for m in messages], index, field, **kwargs
        )
        if not full.startswith(prompt_text):
            raise ValueError(
                f"{_where(index, field)}: the chat template renders the prompt differently on its own (with "
                "add_generation_prompt=True) than at the start of the full conversation, so the response "
                f"cannot be cut from it; prompt renders as {prompt_text!r}, full conversation as {full!r}. "
                "Training on the shared start only would teach a context never seen at inference; make the "
                "row agree with the template (e.g. no reasoning in a reply when enable_thinking is False)"
            )
        texts.append(full[len(prompt_text) :])
    return Example(prompt_text, tuple(texts), templated=True)


def _require_assistant_last(messages: Sequence, index: int, field: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{_where(index, field)}: the last message must be an assistant turn, got role "
            f"{messages[-1]['role']!r}"
        )


def _apply_template(tokenizer, messages: list[dict], index: int, field: str, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as error:  # jinja's raise_exception, or a template tripping over this row's values
        raise ValueError(
            f"{_where(index, field)}: the chat template cannot render this conversation: "
            f"{type(error).__name__}: {error}"
        ) from error


def _template_kwargs(row: Mapping, index: int) -> dict:
    """The row's ``tools`` and ``chat_template_kwargs`` as keyword arguments of ``apply_chat_template``."""
    kwargs = {}
    tools = row.get("tools")
    if isinstance(tools, str):  # TRL accepts tools as a JSON string, which Arrow stores without reshaping
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"{_where(index, 'tools')}: not valid JSON ({error})") from error
    if tools is not None:
        if not isinstance(tools, Sequence) or isinstance(tools, str):
            raise TypeError(
                f"{_where(index, 'tools')}: expected a list of tool schemas (or its JSON string), "
                f"got {type(tools).__name__}"
            )
        kwargs["tools"] = list(tools)
    extra = row.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(
                f"{_where(index, 'chat_template_kwargs')}: expected a dict, got {type(extra).__name__}"
            )
        reserved = sorted(set(extra) & set(_RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise ValueError(
                f"{_where(index, 'chat_template_kwargs')}: {reserved} are set by the trainer, not per row"
            )
        kwargs.update(extra)
    return kwargs


def _same_kind(fields: list[tuple[str, object]], index: int) -> str:
    """Return "text" or "messages" when every field holds that kind; raise on a mix or a bad value."""
    kinds = [(field, _kind(value, index, field)) for field, value in fields]
    first_field, first_kind = kinds[0]
    for field, kind in kinds[1:]:
        if kind != first_kind:
            raise ValueError(
                f"{_where(index, field)}: holds {_KIND_NAMES[kind]} but field {first_field!r} holds "
                f"{_KIND_NAMES[first_kind]}; a row must use strings throughout or message lists throughout"
            )
    return first_kind


_KIND_NAMES = {"text": "a string", "messages": "a message list"}


def _kind(value, index: int, field: str) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        _check_messages(value, index, field)
        return "messages"
    raise TypeError(
        f"{_where(index, field)}: expected a string or a list of messages, got {type(value).__name__}"
    )


def _check_messages(messages: Sequence, index: int, field: str) -> None:
    if len(messages) == 0:
        raise ValueError(f"{_where(index, field)}: empty message list")
    for position, message in enumerate(messages):
        where = f"{_where(index, field)}, message {position}"
        if not isinstance(message, Mapping):
            raise TypeError(
                f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role is None:
            raise ValueError(f"{where}: missing 'role'")
        if not isinstance(role, str):
            raise TypeError(f"{where}: 'role' must be a string, got {type(role).__name__}")
        if role not in KNOWN_ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {list(KNOWN_ROLES)}")
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue  # a tool-calling turn: the template renders the calls
            raise ValueError(f"{where}: missing 'content'")
        if not isinstance(content, str):
            raise TypeError(f"{where}: 'content' must be a string, got {type(content).__name__}")


def _check_text(value, where: str, *, allow_bytes: bool) -> None:
    """Walk ``value`` (nested dicts and lists); raise on bytes (unless allowed) and lone surrogates."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{where}: lone surrogate U+{ord(value[error.start]):04X} at character {error.start}, which "
                "is not valid Unicode text (a string decoded with errors='surrogatepass' or a JSON "
                "'\\ud800' escape?); fix or drop the row"
            ) from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        if not allow_bytes:
            raise TypeError(f"{where}: a bytes value; decode it to str first, e.g. value.decode('utf-8')")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_text(item, f"{where}[{key!r}]", allow_bytes=allow_bytes)
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            _check_text(item, f"{where}[{position}]", allow_bytes=allow_bytes)


def _field(row: Mapping, index: int, field: str):
    if field not in row:
        raise ValueError(f"{_where(index, field)}: missing column value (row has {sorted(row)})")
    if row[field] is None:
        raise ValueError(f"{_where(index, field)}: value is None")
    return row[field]


def _require_text(value, index: int, field: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{_where(index, field)}: expected a string, got {type(value).__name__}")


def _where(index: int, field: str) -> str:
    return f"row {index}, field {field!r}"
