"""Collate tokenized examples into the ``padded`` layout with its scoring plan."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PaddedCollator:
    """Pad B examples of K responses each into K*B right-padded rows: all rows of response 0
    (chosen) first, then all rows of response 1 (rejected), and so on; row ``k*B + b`` is
    ``prompt_b + response_{b,k}``.

    Returns, with N the total number of response tokens and T the longest row (rounded up to
    ``pad_to_multiple_of``):

    - ``input_ids`` (K*B, T) long, padded with ``pad_token_id``; ``attention_mask`` (K*B, T) long.
    - the scoring plan, one entry per response token, row-major: ``score_index`` (N,) long, the flat
      position in ``input_ids.view(-1)`` of the hidden state that predicts the token (for token j of a
      row r with prompt length P: ``r*T + P - 1 + j``); ``score_target`` (N,) long, the token id;
      ``score_seq`` (N,) long, the row r.
    - ``response_lengths`` (B, K) long, scored tokens per response (0 for a response emptied by truncation).
    - ``ref_logps`` (B, K) float32, when every feature carries ``"ref_logps"``.

    >>> collator = PaddedCollator(pad_token_id=0)
    >>> batch = collator([
    ...     {"prompt_ids": [5, 6], "response_ids": [[7, 2], [8, 9, 2]]},
    ...     {"prompt_ids": [10], "response_ids": [[11, 2], [2]]},
    ... ])
    >>> batch["input_ids"].tolist()
    [[5, 6, 7, 2, 0], [10, 11, 2, 0, 0], [5, 6, 8, 9, 2], [10, 2, 0, 0, 0]]
    >>> batch["attention_mask"].tolist()
    [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    >>> batch["score_index"].tolist()
    [1, 2, 5, 6, 11, 12, 13, 15]
    >>> batch["score_target"].tolist()
    [7, 2, 11, 2, 8, 9, 2, 2]
    >>> batch["score_seq"].tolist()
    [0, 0, 1, 1, 2, 2, 2, 3]
    >>> batch["response_lengths"].tolist()
    [[2, 3], [2, 1]]
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of}"
            )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        num_responses = self._check(features)
        batch_size = len(features)
        rows, prompt_lengths, response_lengths = [], [], []
        for k in range(num_responses):
            for feature in features:
                prompt, response = list(feature["prompt_ids"]), list(feature["response_ids"][k])
                rows.append(prompt + response)
                prompt_lengths.append(len(prompt))
                response_lengths.append(len(response))
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of is not None:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        score_index, score_target, score_seq = [], [], []
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, : len(row)] = 1
            start = (
                r * width + prompt_lengths[r] - 1
            )  # the last prompt position predicts the first response token
            score_index.extend(range(start, start + response_lengths[r]))
            score_target.extend(row[prompt_lengths[r] :])
            score_seq.extend([r] * response_lengths[r])

        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "score_index": torch.tensor(score_index, dtype=torch.long),
            "score_target": torch.tensor(score_target, dtype=torch.long),
            "score_seq": torch.tensor(score_seq, dtype=torch.long),
            # rows are response-major (k*B + b); transpose to (B, K)
            "response_lengths": torch.tensor(response_lengths, dtype=torch.long)
            .view(num_responses, batch_size)
            .T.contiguous(),
        }
        if "ref_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([list(f["ref_logps"]) for f in features], dtype=torch.float32)
        return batch

    @staticmethod
    def _check(features: list[dict]) -> int:
        """Validate the features and return K, the number of responses per example."""
        if not features:
            raise ValueError("cannot collate an empty list of features")
        num_responses = len(features[0]["response_ids"])
        if num_responses < 1:
            raise ValueError("feature at batch position 0 has no responses")
        with_ref = ["ref_logps" in feature for feature in features]
        for position, feature in enumerate(features):
            if len(feature["response_ids"]) != num_responses:
                raise ValueError(
                    f"feature at batch position {position} has {len(feature['response_ids'])} responses, "
                    f"but the feature at position 0 has {num_responses}; all features need the same number"
                )
            if len(feature["prompt_ids"]) == 0:
                raise ValueError(
                    f"feature at batch position {position} has empty prompt_ids: its first response token would have no context"
                )
            if any(with_ref) and not with_ref[position]:
                raise ValueError(
                    f"feature at batch position {position} lacks ref_logps, which other features carry"
                )
            if with_ref[position] and len(feature["ref_logps"]) != num_responses:
                raise ValueError(
                    f"feature at batch position {position} has {len(feature['ref_logps'])} ref_logps for {num_responses} responses"
                )
        return num_responses
