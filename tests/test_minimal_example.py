"""examples/minimal.py, the copyable one-screen script: it trains an adapter from a local model and file."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import dist_env, preference_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = os.path.join(ROOT, "examples", "minimal.py")


def test_minimal_script_trains_and_saves_an_adapter(tmp_path, tokenizer, make_model):
    model_dir, data, out = tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "out"
    make_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(12, seed=3)))
    before = load_file(model_dir / "model.safetensors")

    command = [sys.executable, MINIMAL, "--model", str(model_dir), "--dataset", str(data)]
    command += ["--output_dir", str(out), "--max_steps", "2"]
    proc = subprocess.run(command, env=dist_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [value for name, value in adapter.items() if "lora_B" in name]
    assert lora_b, sorted(adapter)
    # LoRA's B matrices start at zero: any nonzero entry means the optimizer stepped the adapter.
    assert any(value.abs().max() > 0 for value in lora_b)
    assert (out / "tokenizer_config.json").exists() and (out / "README.md").exists()
    after = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)  # the base model is untouched
