"""Padding-free batch layouts: `packed` and `shared_prompt`.

Both place whole *groups* of tokens end to end in rows (first-fit decreasing, rows no longer than the
longest group, so no row is longer than in the `padded` layout) and describe attention with two
per-token tensors instead of a mask; `dpo_trainer.attention` builds the mask in the form each model's
attention takes (a 4D tensor for SDPA/eager, a FlexAttention `BlockMask`; one per sliding window):

* ``doc_ids`` (rows, T): which group of the row the token belongs to (-1: padding at the row's end);
* ``branch_ids`` (rows, T): -1 for tokens every branch of the group sees (the prompt), k for a token
  of response k, which only tokens of the same branch see.

Token i may attend token j  iff  doc[i] == doc[j] and j <= i and branch[j] in (-1, branch[i])
(and, on a sliding-window layer, pos[i] - pos[j] < window).

* ``packed``: one group per sequence ``prompt + response_k`` (no branches); position ids restart at 0.
* ``shared_prompt``: one group per example ``[prompt | response_0 | ... | response_{K-1}]``; each
  response's positions continue the prompt's, and the prompt is run once for all K responses.

The scoring plan is the one of `PaddedCollator` (``score_index`` into the flattened rows,
``score_target``, ``score_seq`` = k*B + b), so log-probs are computed the same way for every layout. The
first token of every response is predicted from the last prompt position, shared under `shared_prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collate import PaddedCollator

LAYOUTS = ("padded", "packed", "shared_prompt")
PAD_DOC = -1
SHARED_BRANCH = -1


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group indices into bins of total length <= capacity (each length <= capacity), largest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


@dataclass
class GroupedCollator:
    """Collate tokenized examples into the `packed` or `shared_prompt` layout (see the module docstring).

    >>> batch = GroupedCollator(pad_token_id=0, layout="shared_prompt")([
    ...     {"prompt_ids": [5, 6], "response_ids": [[7, 2], [8, 9, 2]]},
    ...     {"prompt_ids": [10], "response_ids": [[11, 2], [2]]},
    ... ])
    >>> batch["input_ids"].tolist()
    [[5, 6, 7, 2, 8, 9, 2], [10, 11, 2, 2, 0, 0, 0]]
    >>> batch["position_ids"].tolist()
    [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 1, 0, 0, 0]]
    >>> batch["doc_ids"].tolist()
    [[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, -1, -1, -1]]
    >>> batch["branch_ids"].tolist()
    [[-1, -1, 0, 0, 1, 1, 1], [-1, 0, 0, 1, -1, -1, -1]]
    >>> batch["score_index"].tolist(), batch["score_target"].tolist(), batch["score_seq"].tolist()
    ([1, 2, 7, 8, 1, 4, 5, 7], [7, 2, 11, 2, 8, 9, 2, 2], [0, 0, 1, 1, 2, 2, 2, 3])
    """

    pad_token_id: int
    layout: str = "shared_prompt"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.layout not in ("packed", "shared_prompt"):
            raise ValueError(f"layout must be 'packed' or 'shared_prompt', got {self.layout!r}")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        num_responses = PaddedCollator._check(features)
        batch_size = len(features)
        # A group: (prompt, [(sequence index k*B + b, response), ...]).
        if self.layout == "shared_prompt":
            groups = [
                (
                    list(f["prompt_ids"]),
                    [(k * batch_size + b, list(f["response_ids"][k])) for k in range(num_responses)],
                )
                for b, f in enumerate(features)
            ]
        else:
            groups = [
                (list(f["prompt_ids"]), [(k * batch_size + b, list(f["response_ids"][k]))])
                for k in range(num_responses)
                for b, f in enumerate(features)
            ]
        lengths = [len(prompt) + sum(len(r) for _, r in responses) for prompt, responses in groups]
        rows = _first_fit_decreasing(lengths, max(lengths))
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        doc_ids = torch.full(shape, PAD_DOC, dtype=torch.long)
        branch_ids = torch.full(shape, SHARED_BRANCH, dtype=torch.long)
        plan = []  # (sequence, flat predicting position, target)
        for r, members in enumerate(rows):
            offset = 0
            for doc, g in enumerate(sorted(members)):
                prompt, responses = groups[g]
                base = r * width + offset
                n = len(prompt)
                input_ids[r, offset : offset + n] = torch.tensor(prompt)
                position_ids[r, offset : offset + n] = torch.arange(n)
                doc_ids[r, offset : offset + n] = doc
                cursor = offset + n
                for branch, (sequence, response) in enumerate(responses):
                    m = len(response)
                    if m:
                        input_ids[r, cursor : cursor + m] = torch.tensor(response)
                        position_ids[r, cursor : cursor + m] = torch.arange(n, n + m)
                        doc_ids[r, cursor : cursor + m] = doc
                        branch_ids[r, cursor : cursor + m] = branch if len(responses) > 1 else SHARED_BRANCH
                    # token 0 is predicted by the last prompt token, token j > 0 by response token j - 1
                    predictors = [base + n - 1] + [r * width + cursor + j for j in range(m - 1)]
                    plan.extend((sequence, p, t) for p, t in zip(predictors, response))
                    cursor += m
                offset = cursor
        plan.sort(key=lambda entry: entry[0])  # sequence-major, like PaddedCollator
        response_lengths = torch.tensor(
            [[len(f["response_ids"][k]) for k in range(num_responses)] for f in features], dtype=torch.long
        )
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "doc_ids": doc_ids,
            "branch_ids": branch_ids,
            "score_index": torch.tensor([p for _, p, _ in plan], dtype=torch.long),
            "score_target": torch.tensor([t for _, _, t in plan], dtype=torch.long),
            "score_seq": torch.tensor([s for s, _, _ in plan], dtype=torch.long),
            "response_lengths": response_lengths,
        }
        if "ref_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([list(f["ref_logps"]) for f in features], dtype=torch.float32)
        return batch


@dataclass
class WithPaddedView:
    """A collator that adds TRL's padded rows to another layout's batch, for `compute_metrics`.

    Adds ``padded_input_ids`` and ``padded_attention_mask`` (K*B, T), the ``input_ids`` /
    ``attention_mask`` of `PaddedCollator` (chosen rows, then rejected rows, right-padded).
    """

    collator: object
    padded: PaddedCollator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        view = self.padded(features)
        batch["padded_input_ids"], batch["padded_attention_mask"] = view["input_ids"], view["attention_mask"]
        return batch


def default_collator(
    layout: str, pad_token_id: int, pad_to_multiple_of: int | None = None, padded_view: bool = False
):
    """The collator of `layout`; `padded_view` adds TRL's padded rows to a grouped layout's batches."""
    if layout == "padded":
        return PaddedCollator(pad_token_id, pad_to_multiple_of)
    collator = GroupedCollator(pad_token_id, layout, pad_to_multiple_of)
    return (
        WithPaddedView(collator, PaddedCollator(pad_token_id, pad_to_multiple_of))
        if padded_view
        else collator
    )
