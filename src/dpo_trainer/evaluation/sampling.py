"""Batched sampling of responses from a causal LM (or a `peft.PeftModel` around one).

`sample_responses` is what the win-rate and Best-of-N evaluations draw their responses with (paper §6:
responses sampled at temperatures 0 to 1). The model, the tokenizer and the caller's random number
generators are left as they were found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    num_samples: int = 1,
    top_p: float = 1.0,
    seed: int = 0,
    add_special_tokens: bool = True,
    disable_progress: bool = False,
    return_token_ids: bool = False,
) -> list[list[str]] | list[list[list[int]]]:
    """Generate ``num_samples`` continuations of each prompt; ``result[i]`` holds those of ``prompts[i]``.

    ``temperature == 0`` decodes greedily; otherwise tokens are sampled at ``temperature`` with nucleus
    ``top_p`` and no top-k cut (the model's own sampling defaults are overridden, not changed). Generation
    stops at the tokenizer's EOS (and any EOS the model's generation config names) or after
    ``max_new_tokens``. A result is the decoded continuation only: no prompt, no special tokens.

    Prompts go through the model ``batch_size`` rows at a time (a prompt sampled ``num_samples`` times
    takes ``num_samples`` rows), in order of length so that a batch wastes little padding; a decoder-only
    model gets the padding on the left. A tokenizer without a pad token pads with its EOS. The same
    prompts, settings (``batch_size`` included) and ``seed`` give the same samples; the caller's torch
    RNG state, the model's train/eval mode and generation config, and the tokenizer are untouched.

    ``return_token_ids=True`` returns each continuation as the generated token ids instead of text, up
    to and including the first EOS (no EOS when ``max_new_tokens`` cut it short): the exact sequence
    whose probability a KL estimate needs (`dpo_trainer.evaluation.kl`).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy decoding), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, value in [
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
        ("num_samples", num_samples),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so generation could never stop early")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))

    # Tokenizing each prompt alone and padding by hand leaves the tokenizer's padding side and pad token
    # alone (nothing to restore if generation fails) and lets the rows be sorted by length.
    encoded = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} is empty after tokenization; give it some text or a BOS token")
    rows = [index for index in range(len(prompts)) for _ in range(num_samples)]
    rows.sort(key=lambda index: -len(encoded[index]))  # stable: samples of a prompt stay together

    greedy = temperature == 0
    generation_kwargs = dict(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,  # 0 turns off the global default top_k=50; None would restore it
        max_new_tokens=max_new_tokens,
        num_return_sequences=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    # Keyword arguments to generate() apply to a copy of model.generation_config, never to the model's own.
    device = _input_device(model)
    completions: list[list[int]] = [None] * len(rows)  # type: ignore[list-item]
    was_training = model.training
    cuda_devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            torch.manual_seed(seed)
            starts = range(0, len(rows), batch_size)
            for start in tqdm(starts, desc="Sampling", disable=disable_progress):
                batch_rows = rows[start : start + batch_size]
                input_ids, attention_mask = _pad(
                    [encoded[i] for i in batch_rows], pad_id, left=not encoder_decoder
                )
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **generation_kwargs,
                )
                # A decoder-only model returns prompt + continuation; an encoder-decoder one returns the
                # decoder start token + continuation.
                continuation = output[:, 1:] if encoder_decoder else output[:, input_ids.shape[1] :]
                for offset, ids in enumerate(continuation.tolist()):
                    cut = _cut_at_eos(ids, eos_ids)
                    completions[start + offset] = ids[: len(cut) + 1] if return_token_ids else cut
    finally:
        model.train(was_training)

    results: list[list[str]] = [[] for _ in prompts]
    for position, index in enumerate(rows):
        ids = completions[position]
        results[index].append(ids if return_token_ids else tokenizer.decode(ids, skip_special_tokens=True))
    return results


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS first, then any other EOS the model's generation config names (chat models)."""
    eos_ids = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    model_eos = getattr(generation_config, "eos_token_id", None)
    if model_eos is not None:
        for eos_id in [model_eos] if isinstance(model_eos, int) else model_eos:
            if eos_id not in eos_ids:
                eos_ids.append(eos_id)
    return eos_ids


def _input_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _pad(sequences: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(sequences), longest)``, padded on the left or right."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        columns = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def _cut_at_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens before the first EOS (generate() pads finished rows, possibly with a non-special id)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids
