"""Batched sampling of responses from a causal LM (or a `peft.PeftModel` around one).

`sample_responses` is what the win-rate and Best-of-N evaluations draw their responses with (paper §6:
responses sampled at temperatures 0 to 1). The model, the tokenizer and the caller's random number
generators are left as they were found.

Each sample has its own random stream, seeded by (seed, prompt position, sample number): a token is the
argmax of the warped logits plus Gumbel noise drawn from that stream (the Gumbel-max trick, an exact
draw from ``softmax(logits / temperature)`` within the nucleus). So what a prompt gets does not depend on
which other prompts share its batch, on the batch size, or on which process draws it, and the work can be
split across the processes of a distributed run (``across_processes=True``).

A model whose logits are not finite (NaN weights after a diverged run) would "answer" with empty strings or
junk and be judged as if it had said nothing: every step's logits are checked on the device
(`FiniteLogitsCheck`, no extra host sync) and sampling raises `NonFiniteError` naming the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from ..guards import NonFiniteError


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
    across_processes: bool = False,
) -> list[list[str]] | list[list[list[int]]]:
    """Generate ``num_samples`` continuations of each prompt; ``result[i]`` holds those of ``prompts[i]``.

    ``temperature == 0`` decodes greedily; otherwise tokens are sampled at ``temperature`` with nucleus
    ``top_p`` and no top-k cut (the model's own sampling defaults are overridden, not changed). Generation
    stops at the tokenizer's EOS (and any EOS the model's generation config names) or after
    ``max_new_tokens``. A result is the decoded continuation only: no prompt, no special tokens.

    Prompts go through the model ``batch_size`` rows at a time (a prompt sampled ``num_samples`` times
    takes ``num_samples`` rows), in order of length so that a batch wastes little padding; a decoder-only
    model gets the padding on the left. A tokenizer without a pad token pads with its EOS. Sample ``j`` of
    ``prompts[i]`` is drawn with its own generator seeded by ``(seed, i, j)`` (module docstring), so the
    same prompts, settings and ``seed`` give the same samples, whatever the batch size up to float rounding
    of a batched forward; the caller's torch RNG state, the model's train/eval mode and generation config,
    and the tokenizer are untouched.

    ``across_processes=True`` (every process of a `torch.distributed` / ``accelerate launch`` run calls
    it with the same arguments, its model on its own device): the batches are formed as one process forms
    them and dealt out round-robin, and every process returns the whole result, gathered in order. The
    result equals a single process's on the same hardware, in 1/N of the time.

    ``return_token_ids=True`` returns each continuation as the generated token ids instead of text, up
    to and including the first EOS (no EOS when ``max_new_tokens`` cut it short): the exact sequence
    whose probability a KL estimate needs (`dpo_trainer.evaluation.kl`).

    Raises `dpo_trainer.guards.NonFiniteError` naming the model if its logits hold a NaN or +inf, or a row
    of them is all -inf, at any generated token (e.g. a policy whose training diverged to NaN weights).
    """
    _check_arguments(prompts, tokenizer, temperature, top_p, max_new_tokens, batch_size, num_samples)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded, keys = _plan_rows(tokenizer, prompts, num_samples, add_special_tokens)
    rows = [index for index, _ in keys]
    batches = [
        list(range(start, min(start + batch_size, len(rows)))) for start in range(0, len(rows), batch_size)
    ]
    process_index, num_processes = _process_share() if across_processes else (0, 1)
    mine = range(process_index, len(batches), num_processes)
    draw = _BatchDraw(model, encoded, keys, eos_ids, pad_id, max_new_tokens, temperature, top_p, seed)
    drawn: dict[int, list[list[int]]] = {}  # batch number -> its rows' token ids
    was_training = model.training
    cuda_devices = list(range(torch.cuda.device_count())) if draw.device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            for number in tqdm(mine, desc="Sampling", disable=disable_progress or process_index != 0):
                drawn[number] = draw(batches[number], return_token_ids)
    finally:
        model.train(was_training)
    if num_processes > 1:
        from accelerate.utils import gather_object

        drawn = dict(gather_object(list(drawn.items())))
    completions: list[list[int]] = [None] * len(rows)  # type: ignore[list-item]
    for number, positions in enumerate(batches):
        for position, ids in zip(positions, drawn[number], strict=True):
            completions[position] = ids

    results: list[list[str]] = [[] for _ in prompts]
    for position, index in enumerate(rows):
        ids = completions[position]
        results[index].append(ids if return_token_ids else tokenizer.decode(ids, skip_special_tokens=True))
    return results


def _check_arguments(prompts, tokenizer, temperature, top_p, max_new_tokens, batch_size, num_samples) -> None:
    """`sample_responses`' arguments checked: a value error (a type error for one string) naming the first wrong."""
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


def _plan_rows(
    tokenizer, prompts: Sequence[str], num_samples: int, add_special_tokens: bool
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The token ids of each prompt, and the rows to generate: (prompt position, sample number) of each row,
    longest prompts first (stable: the samples of a prompt stay together, numbered within the prompt)."""
    # Tokenizing each prompt alone and padding by hand leaves the tokenizer's padding side and pad token
    # alone (nothing to restore if generation fails) and lets the rows be sorted by length.
    encoded = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} is empty after tokenization; give it some text or a BOS token")
    keys = [(index, number) for index in range(len(prompts)) for number in range(num_samples)]
    keys.sort(key=lambda key: -len(encoded[key[0]]))
    return encoded, keys


class _BatchDraw:
    """Generates one batch of planned rows (`_plan_rows`): positions in the plan -> each row's continuation ids."""

    def __init__(self, model, encoded, keys, eos_ids, pad_id, max_new_tokens, temperature, top_p, seed):
        self.model, self.encoded, self.keys, self.eos_ids, self.pad_id = model, encoded, keys, eos_ids, pad_id
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.device = _input_device(model)
        # Sampling is done by the processors below on top of greedy decoding (argmax of logits + noise), so
        # generate() never touches the global RNG and none of the model's own sampling defaults apply.
        # Keyword arguments to generate() apply to a copy of model.generation_config, never to the model's own.
        self.generation_kwargs = dict(
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=1,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )

    def __call__(self, positions: list[int], return_token_ids: bool) -> list[list[int]]:
        """The continuations of the rows at `positions`: cut at the first EOS, which is kept with
        `return_token_ids`."""
        model, keys = self.model, self.keys
        input_ids, attention_mask = _pad(
            [self.encoded[keys[position][0]] for position in positions],
            self.pad_id,
            left=not self.encoder_decoder,
        )
        finite = FiniteLogitsCheck()  # first: it sees the model's logits before any warper
        processors = LogitsProcessorList([finite])
        if self.temperature != 0:
            seeds = [_row_seed(self.seed, *keys[position]) for position in positions]
            processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1:
                processors.append(TopPLogitsWarper(self.top_p))
            processors.append(GumbelNoise(seeds))
        output = model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            logits_processor=processors,
            **self.generation_kwargs,
        )
        finite.raise_if_seen(model, [keys[position][0] for position in positions])
        # A decoder-only model returns prompt + continuation; an encoder-decoder one returns the
        # decoder start token + continuation.
        continuation = output[:, 1:] if self.encoder_decoder else output[:, input_ids.shape[1] :]
        drawn = []
        for ids in continuation.tolist():
            cut = _cut_at_eos(ids, self.eos_ids)
            drawn.append(ids[: len(cut) + 1] if return_token_ids else cut)
        return drawn


class FiniteLogitsCheck(LogitsProcessor):
    """Records, on the device (no host sync per token), whether any step's ``scores`` ``(rows, vocab)`` hold a
    NaN or +inf or a row that is -inf throughout; `raise_if_seen` reads it once after generation. A -inf
    beside finite values is allowed: generation's own processors mask tokens with it."""

    def __init__(self):
        self.seen: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = torch.isnan(scores).any() | torch.isposinf(scores).any() | torch.isneginf(scores).all(-1).any()
        self.seen = bad if self.seen is None else self.seen | bad
        return scores

    def raise_if_seen(self, model, prompt_indices: list[int]) -> None:
        if self.seen is None or not bool(self.seen):
            return
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or "?"
        raise NonFiniteError(
            f"Sampling from {type(model).__name__} ({name!r}): its logits are not finite (NaN, +inf, or -inf "
            f"for every token) for prompts among {sorted(set(prompt_indices))}; its weights are probably NaN "
            "(a diverged training run). Its samples would be empty or junk and judged as real answers."
        )


class GumbelNoise(LogitsProcessor):
    """Adds standard Gumbel noise to each row's scores, row ``r`` drawing from a generator seeded with
    ``seeds[r]``: the argmax of the result (greedy decoding) is then a draw from ``softmax(scores)`` (the
    Gumbel-max trick); a score of ``-inf`` (outside the nucleus) stays ``-inf`` and is never drawn.

    ``scores``: ``(rows, vocab)``; the generators are made on the scores' device at the first call.
    """

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows of scores for {len(self.seeds)} seeds")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack(
            [
                torch.rand(scores.shape[-1], generator=generator, device=scores.device, dtype=torch.float32)
                for generator in self.generators
            ]
        )
        gumbel = -torch.log(-torch.log(uniform))  # uniform 0 gives -inf: that token is not drawn
        return scores.float() + gumbel


def _row_seed(seed: int, prompt_index: int, sample_number: int) -> int:
    """A 63-bit seed hashed from ``(seed, prompt_index, sample_number)``."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _process_share() -> tuple[int, int]:
    """(this process's index, number of processes) of the current distributed run; (0, 1) outside one."""
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


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
