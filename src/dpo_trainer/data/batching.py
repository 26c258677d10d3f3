"""Batches that fill a token budget instead of holding a fixed number of examples."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)


def example_tokens(prompt_length: int, response_lengths: Sequence[int], layout: str) -> int:
    """Tokens one example occupies in `layout`: the prompt once under `shared_prompt`, else once per response."""
    copies = 1 if layout == "shared_prompt" else len(response_lengths)
    return copies * prompt_length + sum(response_lengths)


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Whole examples, in a seeded random order, grouped so each batch holds at most `max_tokens` tokens.

    The partition into batches is drawn once (from `seed`), so every epoch has the same number of batches
    and the same step cost profile; each epoch visits the batches in a new seeded order (`set_epoch`). An
    example longer than the budget forms a batch of its own.

    Under data parallelism accelerate deals the batches out to the `num_processes` processes in turn (the
    trainer prepares this loader with `even_batches=False`: accelerate's own completion of a last round would
    train the epoch's first batches twice, and accelerate 1.8 refuses it for a sampler without a batch size).
    So the number of batches is made a multiple of `num_processes` by halving the batches of the most examples
    (the budget still holds), and every pair trains once per epoch. Only where every batch is a single example
    and no split is left does the sampler itself repeat the epoch's first batches at its end, so that every
    process takes as many steps, with a warning naming how many.

    >>> sampler = TokenBudgetBatchSampler([5, 5, 9, 2, 3], max_tokens=10, seed=0, shuffle=False)
    >>> list(sampler)
    [[0, 1], [2], [3, 4]]
    >>> list(TokenBudgetBatchSampler([5, 5, 9, 2, 3], max_tokens=10, seed=0, shuffle=False, num_processes=2))
    [[0], [1], [2], [3, 4]]
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_processes: int = 1,
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if num_processes < 1:
            raise ValueError(f"num_processes must be positive, got {num_processes}")
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        order = list(range(len(lengths)))
        if shuffle:
            order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.batches: list[list[int]] = []
        current, used = [], 0
        for index in order:
            if current and used + lengths[index] > max_tokens:
                self.batches.append(current)
                current, used = [], 0
            current.append(index)
            used += lengths[index]
        if current:
            self.batches.append(current)
        self.repeated = _share_evenly(self.batches, num_processes)
        if self.repeated:
            logger.warning(
                "max_tokens_per_batch=%d: the %d batches (each a single example) cannot be shared evenly by %d "
                "processes, so %d of them are repeated at the end of each epoch: %d pair(s) train twice per "
                "epoch. Raise max_tokens_per_batch to let batches hold two examples or more.",
                max_tokens,
                len(self.batches),
                num_processes,
                self.repeated,
                self.repeated,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
            order = torch.randperm(len(self.batches), generator=generator).tolist()
        for position in order + order[: self.repeated]:  # every process takes as many steps
            yield self.batches[position]

    def __len__(self) -> int:
        return len(self.batches) + self.repeated


def _share_evenly(batches: list[list[int]], num_processes: int) -> int:
    """Split the batches of the most examples in two, in place, until `num_processes` divides their number;
    the batches still missing where only single examples are left (0 when none)."""
    while len(batches) % num_processes:
        position = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[position]
        if len(batch) < 2:
            return num_processes - len(batches) % num_processes
        half = len(batch) // 2
        batches[position : position + 1] = [batch[:half], batch[half:]]
    return 0


def token_budget_loader(dataset, layout: str, collate_fn, args) -> torch.utils.data.DataLoader:
    """A training loader whose batches are whole examples filling `args.max_tokens_per_batch` tokens of `layout`
    (`args`: the run's `DPOConfig`, for the budget, the seed, the number of processes and the loader settings);
    `accelerator.prepare` then deals its batches out to the processes, each pair once per epoch."""
    lengths = [
        example_tokens(len(prompt), [len(r) for r in responses], layout)
        for prompt, responses in zip(dataset["prompt_ids"], dataset["response_ids"])
    ]
    columns = [c for c in ("prompt_ids", "response_ids", "ref_logps") if c in dataset.column_names]
    return torch.utils.data.DataLoader(
        dataset.select_columns(columns),
        batch_sampler=TokenBudgetBatchSampler(
            lengths,
            args.max_tokens_per_batch,
            seed=args.data_seed or args.seed,
            num_processes=args.world_size,
        ),
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
    )
