"""Run from outside the source tree in a fresh environment holding only the built wheel and its
dependencies: the package imports, and a tiny model trains a few DPO steps and saves."""

import os
import sys
import tempfile

import dpo_trainer
from dpo_trainer import DPOConfig, DPOTrainer
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

assert "site-packages" in dpo_trainer.__file__, f"imported from the source tree: {dpo_trainer.__file__}"
rows = [
    {"prompt": f"Question {i}:", "chosen": " a kind helpful answer.", "rejected": " go away now."}
    for i in range(8)
]
tokenizer = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=120)
model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2)
with tempfile.TemporaryDirectory() as folder:
    args = DPOConfig(
        output_dir=folder,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(folder)
    assert os.path.exists(os.path.join(folder, "model.safetensors")), os.listdir(folder)
print(
    f"wheel smoke test: dpo_trainer {dpo_trainer.__version__} trained 2 steps (loss {result.training_loss:.4f})"
)
sys.exit(0)
