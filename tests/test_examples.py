"""examples/hh.py end to end, shortened: in process, from a local file, and under `accelerate launch`."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "examples", "hh.py")
SHORT = ["--max_steps", "3", "--max_train_rows", "64", "--max_eval_rows", "16", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def hh():
    spec = importlib.util.spec_from_file_location("hh_example", HH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_offline_default_trains_saves_and_reports(hh, tmp_path):
    out = str(tmp_path / "run")
    summary = hh.main(["--output_dir", out] + SHORT)
    assert summary["before_training"]["before_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert "eval_rewards/accuracies" in summary["after_training"]
    assert "before_rewards/margins" in summary["before_training"]
    for name in ("model.safetensors", "tokenizer.json", "README.md", "metrics.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "metrics.json")) as handle:
        assert json.load(handle)["after_training"]["eval_loss"] == summary["after_training"]["eval_loss"]


def test_refuses_to_write_into_a_folder_with_files(hh, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "weights.bin").write_text("precious")
    with pytest.raises(SystemExit, match="already holds files"):
        hh.main(["--output_dir", str(out)] + SHORT)
    assert (out / "weights.bin").read_text() == "precious"


def test_single_local_file_and_lora(hh, tmp_path):
    data = tmp_path / "hh.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "hh_tiny", "train.jsonl")) as source:
        data.write_text("".join(source.readlines()[:100]))
    out = str(tmp_path / "lora")
    hh.main(["--dataset", str(data), "--output_dir", out, "--lora_r", "4"] + SHORT)
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_missing_split_is_a_clear_error(hh, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        open(os.path.join(ROOT, "examples", "data", "hh_tiny", "test.jsonl")).read()
    )
    with pytest.raises(FileNotFoundError, match="no test"):
        hh.load_hh(str(tmp_path), None, None)


def test_runs_under_accelerate_launch(tmp_path):
    out = str(tmp_path / "accel")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        HH,
        "--output_dir",
        out,
    ] + SHORT
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rewards/accuracies" in result.stdout
    assert os.path.exists(os.path.join(out, "model.safetensors"))
