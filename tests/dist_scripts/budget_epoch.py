"""One epoch of token-budget batches (`max_tokens_per_batch`) on two processes, the budget chosen so that one
process would see an odd number of batches; launched by tests/test_batching.py.

Writes, from rank 0, ``<out>/budget_epoch.json``: the budget batches one process makes of the training set, and
for each process the training-set rows (indices) it collated in the epoch, in order.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

from accelerate.utils import gather_object  # noqa: E402

from dpo_trainer import DPOConfig, DPOTrainer  # noqa: E402
from dpo_trainer.data.batching import TokenBudgetBatchSampler, example_tokens  # noqa: E402
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer  # noqa: E402
from process_group import process_group_closed  # noqa: E402

from conftest import preference_rows  # noqa: E402


class RecordingCollator:
    """The trainer's collator, keeping the (prompt, responses) key of every example it collates."""

    def __init__(self, collate):
        self.collate, self.keys = collate, []

    def __call__(self, features):
        self.keys += [json.dumps([f["prompt_ids"], f["response_ids"]]) for f in features]
        return self.collate(features)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    opts = parser.parse_args()
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in preference_rows(300, seed=123)]
    tokenizer = train_tokenizer(texts + ["\n\nHuman: hello\n\nAssistant: hi there"] * 3, vocab_size=400)
    rows = list({json.dumps(row): row for row in preference_rows(21, seed=4)}.values())  # distinct rows
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=4, seed=3)
    args = DPOConfig(
        output_dir=os.path.join(opts.work, "out"),
        bf16=False,
        gradient_checkpointing=False,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
        max_tokens_per_batch=1,  # set below, once the rows' lengths are known
    )
    trainer = DPOTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer)
    data = trainer.train_dataset
    lengths = [
        example_tokens(len(prompt), [len(r) for r in responses], trainer.layout)
        for prompt, responses in zip(data["prompt_ids"], data["response_ids"])
    ]
    # the smallest budget of two rows or more whose batches (on one process) are odd in number
    budget = next(
        b
        for b in range(2 * max(lengths), 10 * max(lengths))
        if len(TokenBudgetBatchSampler(lengths, b, seed=0)) % 2
    )
    trainer.args.max_tokens_per_batch = budget
    recorder = RecordingCollator(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.train()
    index = {json.dumps([p, r]): i for i, (p, r) in enumerate(zip(data["prompt_ids"], data["response_ids"]))}
    trained = gather_object([[index[key] for key in recorder.keys]])
    if trainer.is_world_process_zero():
        result = {
            "world_size": trainer.args.world_size,
            "rows": len(data),
            "one_process_batches": [list(b) for b in TokenBudgetBatchSampler(lengths, budget, seed=0)],
            "trained": trained,
            "steps": trainer.state.global_step,
        }
        with open(os.path.join(opts.out, "budget_epoch.json"), "w") as handle:
            json.dump(result, handle)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    with process_group_closed():
        main()
