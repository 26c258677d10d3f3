"""Unlikelihood training on preference pairs: the baseline of Rafailov et al. 2023 (arXiv 2305.18290,
Sec. 6), after Welleck et al. 2019 (arXiv 1908.04319, Eq. 4).

The policy maximises the likelihood of the chosen response and, at each token of the rejected one,
the log-probability of *not* producing that token:

    L = -1/|y_w| Σ_t log π(y_w,t | x, y_w,<t)  -  α/|y_l| Σ_t log(1 - π(y_l,t | x, y_l,<t))

each sum averaged over the batch's response tokens. There is no reference model and no KL control,
which is why the paper finds it degenerate on harder tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer, TrainingArguments

from .models import pad_token_id
from .sft import IGNORE_INDEX, SFTCollator, keeping_columns, prepare_rows

MAX_PROBABILITY = 1 - 1e-5  # log(1 - p) is clamped here, as in Welleck et al.'s code


def unlikelihood_loss(
    chosen_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """The loss above from per-token log-probabilities.

    Args:
        chosen_logps, rejected_logps: (rows, T) log π of each target token (any value where masked).
        chosen_mask, rejected_mask: (rows, T) bool, True on the response tokens.
        alpha: weight of the unlikelihood term.

    Returns:
        A scalar: mean chosen-token NLL + alpha x mean rejected-token -log(1 - p).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    nll = -(chosen_logps * chosen_mask).sum() / chosen_mask.sum().clamp_min(1)
    p = rejected_logps.exp().clamp(max=MAX_PROBABILITY)
    unlikely = -(torch.log1p(-p) * rejected_mask).sum() / rejected_mask.sum().clamp_min(1)
    return nll + alpha * unlikely


@dataclass
class UnlikelihoodCollator:
    """`SFTCollator` rows for the chosen responses (rows 0..B-1), then for the rejected ones (B..2B-1).

    >>> batch = UnlikelihoodCollator(pad_token_id=0)([{"prompt_ids": [5], "response_ids": [[7, 2], [8, 9, 2]]}])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[5, 7, 2, 0], [5, 8, 9, 2]], [[-100, 7, 2, -100], [-100, 8, 9, 2]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rejected = [{"prompt_ids": f["prompt_ids"], "response_ids": [f["response_ids"][1]]} for f in features]
        return SFTCollator(self.pad_token_id)(list(features) + rejected)


class UnlikelihoodTrainer(Trainer):
    """A `transformers.Trainer` whose loss is `unlikelihood_loss` on `UnlikelihoodCollator` batches."""

    def __init__(self, *args, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's default reads .loss from the model; here the rejected half is pushed down instead.
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        labels = inputs["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logps = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
        token_logps = logps.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        half = token_logps.shape[0] // 2
        loss = unlikelihood_loss(
            token_logps[:half], mask[:half], token_logps[half:], mask[half:], alpha=self.alpha
        )
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Trainer's default would gather the (2B, T, vocab) logits; evaluation here is the loss alone.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def unlikelihood_trainer(
    model,
    tokenizer,
    args: TrainingArguments,
    train_dataset,
    eval_dataset=None,
    *,
    alpha: float = 1.0,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    callbacks=None,
) -> UnlikelihoodTrainer:
    """An `UnlikelihoodTrainer` on preference rows in any format `DPOTrainer` takes (pairs: K = 2);
    the rows are prepared exactly as `sft_trainer` prepares them (`sft.prepare_rows`)."""
    train, evaluation = prepare_rows(train_dataset, eval_dataset, tokenizer, max_length, max_prompt_length)
    return UnlikelihoodTrainer(
        model=model,
        args=keeping_columns(args),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=UnlikelihoodCollator(pad_token_id(tokenizer)),
        processing_class=tokenizer,
        callbacks=callbacks,
        alpha=alpha,
    )
