"""The metrics the trainer logs, named as TRL 1.16 names them, and what `compute_metrics` receives.

`DPOMetrics` keeps per-mode sums on the device: no host sync per batch. Training sums stay per process and
are all-reduced once per log, so processes may hold batches of different sizes (`max_tokens_per_batch`).
Evaluation gathers each batch with `gather_for_metrics`, which drops the examples accelerate repeats to
even out the last batch, and keeps the per-example loss (Trainer's own eval loss averages batch means,
repeats included).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy
import torch
from transformers import EvalPrediction

from .data.layouts import PAD_DOC, SHARED_BRANCH

METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# TRL's per-token metrics: means over completion tokens (chosen and rejected for `entropy`), each divided by
# the token count named here; the counts are accumulated alongside and not logged.
TOKEN_METRICS = {
    "logits/chosen": "_tokens/chosen",
    "logits/rejected": "_tokens/rejected",
    "entropy": "_tokens/all",
    "mean_token_accuracy": "_tokens/chosen",
}
TOKEN_COUNTS = ("_tokens/chosen", "_tokens/rejected", "_tokens/all")


def padded_token_count(batch: Mapping[str, torch.Tensor], layout: str) -> torch.Tensor:
    """Prompt + completion tokens of the batch's pairs as padded rows (TRL's `attention_mask.sum()`), in any
    layout: `shared_prompt` holds each prompt once, where padded rows hold it once per response."""
    if "padded_attention_mask" in batch:
        return batch["padded_attention_mask"].sum()
    if "doc_ids" not in batch:
        return batch["attention_mask"].sum()
    real = batch["doc_ids"] != PAD_DOC
    count = real.sum()
    if layout == "shared_prompt":
        prompts = (real & (batch["branch_ids"] == SHARED_BRANCH)).sum()
        count = count + (batch["response_lengths"].shape[1] - 1) * prompts
    return count


class DPOMetrics:
    """Per-mode ("train" or an evaluation's prefix) sums of the logged metrics, and their means.

    Args:
        accelerator: gathers evaluation batches and all-reduces training sums.
        device: where empty sums are made.
        layout: the batches' layout (for TRL's `num_tokens`).
        aux_loss: whether the MoE router aux loss is logged.
    """

    def __init__(self, accelerator, device, layout: str, aux_loss: bool = False):
        self.accelerator, self.device, self.layout, self.aux_loss = accelerator, device, layout, aux_loss
        self.sums: dict[str, list] = {}  # mode -> [per-metric sums (a tensor on the device), examples]
        self.total_train_tokens = 0  # TRL's `num_tokens`: prompt + completion tokens trained on

    def names(self, mode: str) -> tuple[str, ...]:
        names = METRIC_NAMES + tuple(TOKEN_METRICS) + TOKEN_COUNTS
        names = names + ("num_tokens",) if mode == "train" else names + ("loss",)
        return names + ("aux_loss",) if self.aux_loss else names

    def reset(self, mode: str) -> None:
        self.sums.pop(mode, None)

    def record(
        self,
        mode: str,
        policy: torch.Tensor,
        rewards: torch.Tensor,
        losses: torch.Tensor,
        aux_loss: torch.Tensor | None = None,
        token_stats: torch.Tensor | None = None,
        batch: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a batch's per-example values to `mode`'s sums, on the device (no host sync).

        `policy` (B, K) log-probs, `rewards` (B, K), `losses` (B,); `token_stats` (B, K, 3) are
        `score_responses`'s per-response sums of the head's token statistics, divided by the completion token
        counts of `batch` in `means`. Rankings log best (response 0) against worst (the last).
        """
        chosen, rejected = rewards[:, 0], rewards[:, -1]
        values = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "rewards/margins": chosen - rejected,
            "logps/chosen": policy[:, 0],
            "logps/rejected": policy[:, -1],
            "loss": losses,
        }
        if token_stats is None or batch is None:  # no statistics kept: zero tokens, so no token metrics
            token_stats, lengths = policy.new_zeros(*policy.shape, 3), torch.zeros_like(policy)
        else:
            lengths = batch["response_lengths"].to(policy.device, policy.dtype)
        values["logits/chosen"], values["logits/rejected"] = token_stats[:, 0, 0], token_stats[:, -1, 0]
        values["entropy"] = token_stats[:, :, 1].sum(dim=1)
        values["mean_token_accuracy"] = token_stats[:, 0, 2]
        values["_tokens/chosen"], values["_tokens/rejected"] = lengths[:, 0], lengths[:, -1]
        values["_tokens/all"] = lengths.sum(dim=1)
        if mode == "train":  # the batch's count on its first example (training sums are not gathered)
            values["num_tokens"] = torch.zeros_like(losses)
            if batch is not None:
                values["num_tokens"][0] = padded_token_count(batch, self.layout)
        if aux_loss is not None:  # the batch's router aux loss, counted once per example like the others
            values["aux_loss"] = aux_loss.detach().to(losses.device, losses.dtype).expand(losses.shape[0])
        stacked = torch.stack([values[name] for name in self.names(mode)], dim=1)
        # float64 sums: exact enough over millions of examples (MPS has no float64)
        stacked = stacked.to(torch.float32 if stacked.device.type == "mps" else torch.float64)
        if mode != "train":
            stacked = self.accelerator.gather_for_metrics(stacked)
        entry = self.sums.setdefault(mode, [torch.zeros_like(stacked[0]), 0])
        entry[0] += stacked.sum(dim=0)
        entry[1] += stacked.shape[0]  # known on the host: no sync

    def means(self, mode: str, all_reduce: bool) -> dict[str, float]:
        """Means of `mode`'s sums, then reset; `all_reduce` sums over processes first (every process must
        call it then). One host sync."""
        names = self.names(mode)
        entry = self.sums.pop(mode, None)
        if entry is None:
            totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        else:
            totals = torch.cat([entry[0], entry[0].new_tensor([entry[1]])])
        if all_reduce and self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        *sums, count = totals.tolist()
        if not count:
            return {}
        sums = dict(zip(names, sums))
        if mode == "train":
            self.total_train_tokens += round(sums.pop("num_tokens"))
        means = {}
        for name, total in sums.items():
            if name in TOKEN_METRICS:  # per completion token, as TRL's
                if sums[TOKEN_METRICS[name]] > 0:
                    means[name] = total / sums[TOKEN_METRICS[name]]
            elif name not in TOKEN_COUNTS:
                means[name] = total / count
        means["num_tokens"] = float(self.total_train_tokens)  # as TRL's, in evaluation too: tokens trained on
        return means


class PairRowsMetrics:
    """Wraps a `compute_metrics` so it receives TRL's rows: predictions gathered per pair (N, T, K, V) and
    labels (N, T, K) become (K*N, T, V) and (K*N, T), every example's chosen row first, then the rejected rows."""

    def __init__(self, compute_metrics):
        self.compute_metrics = compute_metrics

    def __call__(self, prediction, **kwargs):
        def rows(array):
            if array is None:
                return None
            if isinstance(array, torch.Tensor):
                moved = array.movedim(2, 0)
            else:
                moved = numpy.moveaxis(numpy.asarray(array), 2, 0)
            return moved.reshape(-1, *moved.shape[2:])

        rows_prediction = EvalPrediction(
            predictions=rows(prediction.predictions),
            label_ids=rows(prediction.label_ids),
            inputs=prediction.inputs,
            losses=prediction.losses,
        )
        return self.compute_metrics(rows_prediction, **kwargs)


def padded_rows(inputs: Mapping[str, torch.Tensor], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the batch as TRL's padded rows, for `compute_metrics`."""
    input_ids = inputs.get("padded_input_ids", inputs["input_ids"] if layout == "padded" else None)
    if input_ids is None:
        raise ValueError(
            "compute_metrics needs the padded rows of each batch, which a custom data_collator for the "
            f"{layout!r} layout does not give; add 'padded_input_ids' / 'padded_attention_mask' "
            "(see dpo_trainer.data.layouts.WithPaddedView) or use DPOConfig(layout='padded')."
        )
    return input_ids, inputs.get("padded_attention_mask", inputs.get("attention_mask"))
