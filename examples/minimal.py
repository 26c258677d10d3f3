"""DPO in one screen: load a model and a preference dataset, train a LoRA adapter, save it.

    python examples/minimal.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --output_dir runs/minimal

`--dataset` is a hub id or a local `.jsonl` / `.json` / `.parquet` file whose rows are in any format
`DPOTrainer` reads (prompt/chosen/rejected strings or chat messages, or HH transcripts).
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig

from dpo_trainer import DPOConfig, DPOTrainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
parser.add_argument("--dataset", required=True, help="hub id or local data file")
parser.add_argument("--output_dir", default="runs/minimal")
parser.add_argument("--max_steps", type=int, default=-1, help="-1: one epoch")
cli = parser.parse_args()

if cli.dataset.endswith((".jsonl", ".json", ".parquet")):
    kind = "parquet" if cli.dataset.endswith(".parquet") else "json"
    train = load_dataset(kind, data_files=cli.dataset, split="train")
else:
    train = load_dataset(cli.dataset, split="train")

args = DPOConfig(
    output_dir=cli.output_dir,
    beta=0.1,  # the paper's KL strength
    learning_rate=5e-6,
    per_device_train_batch_size=4,
    max_steps=cli.max_steps,
    report_to="none",
)
lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = DPOTrainer(cli.model, args=args, train_dataset=train, peft_config=lora)
trainer.train()
trainer.save_model(cli.output_dir)  # the adapter, the tokenizer and a model card
print(f"saved to {cli.output_dir}")
