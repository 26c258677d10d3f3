"""Preference rows of any supported format → :class:`Example` (prompt, responses best first).

Formats (see :func:`detect_format`):

- ``standard``: ``prompt``, ``chosen``, ``rejected``. Strings, or lists of ``{"role", "content"}``
  messages (conversational), which are rendered with the tokenizer's chat template.
- ``implicit``: ``chosen`` and ``rejected`` only. Strings are Anthropic-HH transcripts, split at the
  last ``"\\n\\nAssistant:"`` as the paper's reference implementation does; message lists share every
  message but the final assistant turn, which is the response.
- ``ranked``: ``prompt`` and ``responses`` (two or more, best first), strings or message lists.

Every bad row raises ``ValueError`` (``TypeError`` for a value of the wrong type) naming the row and field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HH_ASSISTANT_MARKER = "\n\nAssistant:"

FORMAT_COLUMNS = {
    "standard": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
}
MIN_RESPONSES = 2


@dataclass(frozen=True)
class Example:
    """One preference example, ready for tokenization.

    Attributes:
        prompt: the text the model sees before each response.
        responses: the responses, best first; at least two (pairs are ``(chosen, rejected)``).
        templated: True when a chat template rendered the text, which then already holds any special
            tokens: tokenize it without adding special tokens.
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


def to_example(row: Mapping, index: int, fmt: str, tokenizer=None) -> Example:
    """Turn one dataset row of format ``fmt`` into an :class:`Example`.

    ``index`` is the row's position, used in error messages. ``tokenizer`` (with a ``chat_template``)
    is needed only for message lists.

    >>> to_example({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, 0, "standard")
    Example(prompt='Q:', responses=(' yes', ' no'), templated=False)
    """
    if fmt == "standard":
        prompt = _field(row, index, "prompt")
        responses = [("chosen", _field(row, index, "chosen")), ("rejected", _field(row, index, "rejected"))]
        return _build(("prompt", prompt), responses, index, tokenizer)
    if fmt == "implicit":
        return _implicit(row, index, tokenizer)
    if fmt == "ranked":
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
        return _build(("prompt", prompt), named, index, tokenizer)
    raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMAT_COLUMNS)}")


def _implicit(row: Mapping, index: int, tokenizer) -> Example:
    chosen, rejected = _field(row, index, "chosen"), _field(row, index, "rejected")
    kind = _same_kind([("chosen", chosen), ("rejected", rejected)], index)
    if kind == "text":
        chosen_prompt, chosen_response = split_hh_transcript(chosen, row=index, field="chosen")
        rejected_prompt, rejected_response = split_hh_transcript(rejected, row=index, field="rejected")
        if chosen_prompt != rejected_prompt:
            raise ValueError(
                f"row {index}: prompts differ between chosen and rejected "
                f"(the text up to the last {HH_ASSISTANT_MARKER!r} must be identical)"
            )
        return Example(chosen_prompt, (chosen_response, rejected_response))
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{_where(index, field)}: the last message must be an assistant turn, got role {messages[-1]['role']!r}"
            )
        if len(messages) < 2:
            raise ValueError(
                f"{_where(index, field)}: no messages before the final assistant turn to use as the prompt"
            )
    if list(chosen[:-1]) != list(rejected[:-1]):
        raise ValueError(
            f"row {index}: prompts differ between chosen and rejected (all messages but the last must match)"
        )
    return _render(
        ("chosen", chosen[:-1]), [("chosen", chosen[-1:]), ("rejected", rejected[-1:])], index, tokenizer
    )


def _build(prompt: tuple[str, object], responses: list[tuple[str, object]], index: int, tokenizer) -> Example:
    """Check that the prompt and responses are all strings or all message lists, then build the Example."""
    if _same_kind([prompt, *responses], index) == "text":
        return Example(prompt[1], tuple(text for _, text in responses))
    return _render(prompt, responses, index, tokenizer)


def _render(prompt: tuple[str, list], responses: list[tuple[str, list]], index: int, tokenizer) -> Example:
    """Render a conversation with the chat template; each response is the text the full render adds."""
    prompt_field, prompt_messages = prompt
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{_where(index, prompt_field)}: message lists (conversational data) need a tokenizer with a chat_template"
        )
    prompt_messages = [dict(m) for m in prompt_messages]
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    texts = []
    for field, messages in responses:
        full = tokenizer.apply_chat_template(prompt_messages + [dict(m) for m in messages], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                f"{_where(index, field)}: the chat template renders the prompt differently on its own (with "
                "add_generation_prompt=True) than at the start of the full conversation, so the response "
                f"cannot be cut from it; prompt renders as {prompt_text!r}, full conversation as {full!r}"
            )
        texts.append(full[len(prompt_text) :])
    return Example(prompt_text, tuple(texts), templated=True)


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
    if isinstance(value, Sequence):
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
        for key in ("role", "content"):
            if message.get(key) is None:
                raise ValueError(f"{where}: missing {key!r}")
            if not isinstance(message[key], str):
                raise TypeError(f"{where}: {key!r} must be a string, got {type(message[key]).__name__}")


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
