"""Two processes whose batches differ in size (`max_tokens_per_batch`) and whose reference caches differ
(one folder per process, only rank 0's filled); launched by tests/test_metrics.py.

Writes, from rank 0, ``<out>/uneven.json``: the train logs, every example's rewards per step gathered from
both processes, each step's per-process batch sizes, and each process's precomputed reference log-probs.
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
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer  # noqa: E402
from process_group import process_group_closed  # noqa: E402

from conftest import preference_rows  # noqa: E402


class Recording(DPOTrainer):
    """Keeps each training step's per-example rewards and batch sizes, gathered from every process."""

    rewards: list
    batch_sizes: list

    def dpo_loss(self, policy_logps, reference_logps, *args, **kwargs):
        losses, rewards = super().dpo_loss(policy_logps, reference_logps, *args, **kwargs)
        if self.model.training:
            self.rewards.append(gather_object(rewards[:, [0, -1]].tolist()))
            self.batch_sizes.append(gather_object([rewards.shape[0]]))
        return losses, rewards


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    opts = parser.parse_args()
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in preference_rows(300, seed=123)]
    tokenizer = train_tokenizer(texts + ["\n\nHuman: hello\n\nAssistant: hi there"] * 3, vocab_size=400)
    rows = preference_rows(24, seed=8)
    rank = int(os.environ.get("RANK", "0"))

    def trainer(cache_dir, **extra):
        args = DPOConfig(
            output_dir=os.path.join(opts.work, "out"),
            bf16=False,
            gradient_checkpointing=False,
            ref_logps_cache_dir=cache_dir,
            precompute_ref_log_probs=True,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            ddp_backend="gloo",
            disable_tqdm=True,
            seed=0,
            **extra,
        )
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3)
        return Recording(model, args=args, train_dataset=rows, processing_class=tokenizer)

    # rank 0's folder gets a valid cache file (the first process of the node writes it); rank 1's stays empty
    trainer(os.path.join(opts.work, "cache-rank0"), max_steps=1)
    run = trainer(os.path.join(opts.work, f"cache-rank{rank}"), max_steps=4, max_tokens_per_batch=90)
    run.rewards, run.batch_sizes = [], []
    run.train()
    ref_logps = gather_object([list(run.train_dataset["ref_logps"])])
    if run.is_world_process_zero():
        result = {
            "world_size": run.args.world_size,
            "train_logs": [entry for entry in run.state.log_history if "loss" in entry],
            "rewards": run.rewards,
            "batch_sizes": run.batch_sizes,
            "ref_logps_rank0": ref_logps[0],
            "ref_logps_rank1": ref_logps[-1],
        }
        with open(os.path.join(opts.out, "uneven.json"), "w") as handle:
            json.dump(result, handle)
    run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    with process_group_closed():
        main()
