"""Tokenize one :class:`~dpo_trainer.data.formats.Example`: a pure per-example function.

The prompt is tokenized alone, as the model sees it at inference (with the tokenizer's special tokens,
unless a chat template already rendered them). Each response's ids are the ids that follow the prompt's
in ``prompt + response`` tokenized as one text (TRL 1.16's ids), so a response tokenizes as it does
after the prompt, not as a text of its own (no spurious leading-space token under SentencePiece). Where
tokens merge across the boundary, so that the prompt's ids are no prefix of the joint ids, the response
is tokenized on its own: the prompt stays exactly as inference sees it (TRL instead cuts the prompt back
to the common prefix).

How a response ends:

- plain text (standard and Anthropic-HH rows): EOS is appended, unless the response already ends with it;
- chat-template text: as the template ends the assistant turn (``<|im_end|>\n``, ``<|eot_id|>``,
  ``<end_of_turn>\n``, ``</s>``), nothing appended, as at inference and in TRL. Only a template that
  ends the turn with no special token at all gets EOS appended, so that the model still learns to stop
  (TRL leaves such responses without an end).

Truncation, in this order (the paper's reference implementation, with one deliberate difference):

1. If ``max_length`` is set and ``len(prompt) + len(longest response) > max_length``, cut the prompt
   to ``max_prompt_length`` tokens. ``truncation_mode="keep_end"`` (the reference implementation) keeps
   the END of the prompt, the text nearest the response; ``"keep_start"`` (the default, as in TRL) keeps
   its start. With ``max_prompt_length=None`` the prompt is cut only as far as ``max_length`` requires:
   under ``keep_end`` to what the longest response leaves (at least one token), so no row is lost;
   under ``keep_start`` to ``max_length``, as TRL cuts the whole sequence at its end.
2. If still too long, cut every response to ``max_length - len(prompt)`` tokens, keeping its start
   (a cut response loses its EOS). The reference implementation cuts responses to
   ``max_length - max_prompt_length`` even when the prompt is shorter than ``max_prompt_length``;
   we fill the budget the prompt leaves instead.

A response can end up empty (when the prompt alone fills ``max_length``); it is returned empty and
the trainer counts and drops such rows. ``max_prompt_length`` applies only together with ``max_length``.
"""

from __future__ import annotations

from transformers.utils import logging

from .formats import Example

logger = logging.get_logger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")


def tokenize_example(
    example: Example,
    tokenizer,
    *,
    index: int,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> dict:
    """Token ids of one example, truncated as the module docstring says.

    Args:
        example: the prompt and its K responses, best first.
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        index: the row's position, used in error messages.

    Returns:
        ``{"prompt_ids": list[int] (P,), "response_ids": list of K list[int] (R_k,)}``.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
    add_special_tokens = not example.templated
    prompt_ids = _encode(tokenizer, example.prompt, add_special_tokens)
    turn_ends = _special_token_texts(tokenizer) if example.templated else ()
    response_ids = []
    for response in example.responses:
        ids = _response_ids(tokenizer, example.prompt, prompt_ids, response, add_special_tokens)
        template_ends_turn = example.templated and response.rstrip().endswith(turn_ends)
        if not template_ends_turn and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        response_ids.append(ids)
    if not prompt_ids:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                f"row {index}, field 'prompt': prompt is empty after tokenization: the first response token "
                "would have no context (and the tokenizer has no BOS token to stand in)"
            )
        prompt_ids = [tokenizer.bos_token_id]
    prompt_ids, response_ids = truncate_ids(
        prompt_ids,
        response_ids,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
    )
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _response_ids(
    tokenizer, prompt: str, prompt_ids: list[int], response: str, add_special_tokens: bool
) -> list[int]:
    """The ids ``response`` adds after the prompt's in ``prompt + response`` tokenized as one text."""
    if prompt_ids:
        joint = _encode(tokenizer, prompt + response, add_special_tokens)
        if joint[: len(prompt_ids)] == prompt_ids:
            return joint[len(prompt_ids) :]
        logger.warning_once(
            "A prompt and its response tokenize differently together than apart (tokens merge across the "
            "boundary); such responses are tokenized on their own, so that the prompt keeps the ids the "
            "model sees at inference. End prompts on a token boundary (e.g. a newline) to avoid it."
        )
    return _encode(tokenizer, response, False)


def _special_token_texts(tokenizer) -> tuple[str, ...]:
    """Every special token's text: the named ones and the added tokens marked special."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return tuple(sorted(text for text in texts if text))


def truncate_ids(
    prompt_ids: list[int],
    response_ids: list[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], list[list[int]]]:
    """Apply the module's truncation order to a prompt (P,) and K responses (R_k,).

    >>> truncate_ids([1, 2, 3, 4], [[5, 9], [6, 7, 8, 9]], max_length=6, max_prompt_length=3)
    ([2, 3, 4], [[5, 9], [6, 7, 8]])
    >>> truncate_ids([1, 2, 3, 4], [[5, 9], [6, 7, 8, 9]], max_length=6, max_prompt_length=3,
    ...              truncation_mode="keep_start")
    ([1, 2, 3], [[5, 9], [6, 7, 8]])
    >>> truncate_ids([1, 2], [[5, 9], [6, 7, 8, 9]], max_length=5, max_prompt_length=3)
    ([1, 2], [[5, 9], [6, 7, 8]])

    Without ``max_prompt_length``, ``keep_end`` cuts the prompt to what the longest response leaves;
    ``keep_start`` cuts the sequence at ``max_length``, which here leaves the responses nothing:

    >>> truncate_ids([1, 2, 3, 4, 5, 6], [[7, 9], [8, 8, 9]], max_length=5, max_prompt_length=None)
    ([5, 6], [[7, 9], [8, 8, 9]])
    >>> truncate_ids([1, 2, 3, 4, 5, 6], [[7, 9], [8, 8, 9]], max_length=5, max_prompt_length=None,
    ...              truncation_mode="keep_start")
    ([1, 2, 3, 4, 5], [[], []])
    """
    check_truncation_settings(max_length, max_prompt_length, truncation_mode)
    longest = max((len(ids) for ids in response_ids), default=0)
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return list(prompt_ids), [list(ids) for ids in response_ids]
    # (1) Cut the prompt.
    if max_prompt_length is not None:
        cap = max_prompt_length
    elif truncation_mode == "keep_end":  # what the longest response leaves, keeping one token of context
        cap = max(max_length - longest, 1)
    else:
        cap = max_length
    if len(prompt_ids) > cap:
        prompt_ids = prompt_ids[-cap:] if truncation_mode == "keep_end" else prompt_ids[:cap]
    # (2) Cut the responses to the budget the prompt leaves (not to max_length - max_prompt_length).
    budget = max(max_length - len(prompt_ids), 0)
    return list(prompt_ids), [list(ids[:budget]) for ids in response_ids]


def check_truncation_settings(
    max_length: int | None, max_prompt_length: int | None, truncation_mode: str
) -> None:
    """Raise ``ValueError`` for settings the truncation order cannot honour."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of tokens or None, got {value}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}) "
            "to leave room for the responses"
        )
