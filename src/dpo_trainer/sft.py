"""Supervised fine-tuning on the preferred responses: the paper's Preferred-FT baseline and DPO's start.

The paper (Sec. 6) fine-tunes the base model on the chosen responses before DPO, so that the reference
model is close to the distribution the preferences were collected on. This module reuses the preference
data pipeline (same formats, tokenization and truncation) and trains on response 0 of every row with a
`transformers.Trainer` (resuming as `DPOTrainer` does); the loss covers response tokens only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainingArguments

from .checkpoints import StopsAtTheEnd, resolve_resume
from .data.prepare import prepare_dataset
from .models import is_peft_model, pad_token_id, unwrap_to_peft

IGNORE_INDEX = -100  # label value the causal-LM loss skips


@dataclass
class SFTCollator:
    """Right-padded `prompt + chosen` rows with labels on the chosen tokens only.

    >>> batch = SFTCollator(pad_token_id=0)([
    ...     {"prompt_ids": [5, 6], "response_ids": [[7, 2], [8, 2]]},
    ...     {"prompt_ids": [9], "response_ids": [[3, 4, 2], [2]]},
    ... ])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[5, 6, 7, 2], [9, 3, 4, 2]], [[-100, -100, 7, 2], [-100, 3, 4, 2]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [list(f["prompt_ids"]) + list(f["response_ids"][0]) for f in features]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, feature) in enumerate(zip(rows, features)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            start = len(feature["prompt_ids"])
            labels[i, start : len(row)] = input_ids[i, start : len(row)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prepare_rows(train_dataset, eval_dataset, tokenizer, max_length, max_prompt_length):
    """(train, eval) tokenized by `data.prepare_dataset`; a long prompt keeps the turns nearest the reply, as
    in the paper's code."""
    settings = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": "keep_end",
        "warn_identical": False,  # SFT rows may repeat chosen as rejected (examples/sentiment.py does)
    }
    train = prepare_dataset(train_dataset, tokenizer, **settings, name="train_dataset")
    return train, prepare_dataset(eval_dataset, tokenizer, **settings, name="eval_dataset")


def keeping_columns(args: TrainingArguments) -> TrainingArguments:
    """A copy of `args` with `remove_unused_columns=False` (the collators read prompt_ids / response_ids, which
    Trainer would drop); the caller's `args` is not changed."""
    args = copy.copy(args)
    args.remove_unused_columns = False
    return args


class PreferredFTTrainer(StopsAtTheEnd, Trainer):
    """`transformers.Trainer` that resumes as `DPOTrainer` does: `resume_from_checkpoint=True` takes the newest
    complete checkpoint, a checkpoint of the other kind of run (full fine-tuning or a PEFT adapter) is refused,
    and a run already at its last step trains nothing (`checkpoints.resolve_resume`, `checkpoints.StopsAtTheEnd`)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        adapter = is_peft_model(unwrap_to_peft(self.model))
        checkpoint = resolve_resume(
            resume_from_checkpoint, self.args.output_dir, self.accelerator, adapter=adapter
        )
        return super().train(checkpoint, trial, ignore_keys_for_eval)


def sft_trainer(
    model,
    tokenizer,
    args: TrainingArguments,
    train_dataset,
    eval_dataset=None,
    *,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    callbacks=None,
) -> Trainer:
    """A `transformers.Trainer` (`PreferredFTTrainer`) that fine-tunes `model` on the preferred response of each
    preference row.

    Rows may be in any format `DPOTrainer` accepts (`data.prepare_dataset`); a long prompt keeps its end.
    `args` is not changed: Trainer gets a copy with `remove_unused_columns=False`.
    """
    train, evaluation = prepare_rows(train_dataset, eval_dataset, tokenizer, max_length, max_prompt_length)
    args = keeping_columns(args)
    return PreferredFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=SFTCollator(pad_token_id(tokenizer)),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
