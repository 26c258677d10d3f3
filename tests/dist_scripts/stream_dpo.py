"""Train on a streamed dataset (`datasets.IterableDataset`) in one or several processes; rank 0 saves the weights.

    python stream_dpo.py OUT BATCH                          # one process
    torchrun --standalone --nproc_per_node 2 stream_dpo.py OUT BATCH

Plain SGD without clipping: a global batch of the same rows gives the same update in either launch.
"""

import os
import sys

import torch
from datasets import Dataset

from dpo_trainer import DPOConfig, DPOTrainer
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer
from process_group import process_group_closed

from conftest import preference_rows


def main(out: str, per_device_batch: int) -> None:
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in preference_rows(300, seed=123)]
    texts += ["\n\nHuman: hello\n\nAssistant: hi there"] * 3
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    rows = Dataset.from_list(preference_rows(32, seed=0)).to_iterable_dataset()
    args = DPOConfig(
        output_dir=os.path.join(out, "run"),
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=per_device_batch,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        layout="padded",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        use_cpu=True,
    )
    trainer = DPOTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        torch.save(
            {"params": dict(trainer.model.named_parameters()), "losses": losses},
            os.path.join(out, "result.pt"),
        )


if __name__ == "__main__":
    with process_group_closed():
        main(sys.argv[1], int(sys.argv[2]))
