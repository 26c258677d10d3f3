"""The `dpo-trainer` command: `trl dpo`'s flags, a YAML config file, local or hub models and data."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_trainer import DPOConfig
from dpo_trainer.cli import main, parse_args, resume_from, run

from conftest import dist_env, preference_rows

COMMON = ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no"]


def write_rows(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def data_file(tmp_path):
    return write_rows(tmp_path / "pairs.jsonl", preference_rows(24, seed=5))


def weights(path) -> dict:
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def test_every_trl_dpo_flag_is_a_flag_here():
    from trl.scripts.dpo import make_parser as trl_parser

    from dpo_trainer.cli import make_parser

    ours = {action.dest for action in make_parser()._actions}
    theirs = {action.dest for action in trl_parser()._actions}
    # TRL's dataset mixtures (`--datasets`) are the one group left out: one data set per run here
    mixture = {"datasets", "streaming"}
    assert theirs - mixture <= ours, sorted(theirs - mixture - ours)
    assert {f.name for f in dataclasses.fields(DPOConfig)} <= ours


def test_yaml_values_are_defaults_that_flags_override(tmp_path, monkeypatch):
    config = tmp_path / "dpo.yaml"
    config.write_text(
        "model_name_or_path: some/model\n"
        "dataset_name: some/data\n"
        "beta: 0.3\n"
        "max_length: 256\n"
        "use_peft: true\n"
        "lora_r: 4\n"
        "lora_target_modules: [q_proj, v_proj]\n"
        "model_init_kwargs: {attn_implementation: eager}\n"
        "env:\n  DPO_TRAINER_CLI_TEST: from-yaml\n"
    )
    monkeypatch.delenv("DPO_TRAINER_CLI_TEST", raising=False)
    script, training, model = parse_args(
        ["--config", str(config), "--beta", "0.2", "--output_dir", str(tmp_path)]
    )
    assert training.beta == 0.2 and training.max_length == 256  # the flag wins; the file fills the rest
    assert model.use_peft and model.lora_r == 4 and model.lora_target_modules == ["q_proj", "v_proj"]
    assert training.model_init_kwargs == {"attn_implementation": "eager"}
    assert script.dataset_name == "some/data" and model.model_name_or_path == "some/model"
    assert os.environ["DPO_TRAINER_CLI_TEST"] == "from-yaml"


def test_bad_settings_are_clear_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: m\ndataset_name: d\nbetta: 0.3\n")
    with pytest.raises(SystemExit, match="unknown settings.*betta"):
        parse_args(["--config", str(config)])
    with pytest.raises(SystemExit, match="model_name_or_path"):
        parse_args(["--dataset_name", "d", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="beta"):
        parse_args(
            ["--model_name_or_path", "m", "--dataset_name", "d", "--beta", "0", "--output_dir", str(tmp_path)]
        )


def test_full_fine_tuning_from_a_local_folder_with_evaluation(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "train.jsonl", preference_rows(16, seed=1))
    write_rows(data / "test.jsonl", preference_rows(8, seed=2))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_strategy", "steps"]
    argv += ["--eval_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", *COMMON]
    trainer = run(*parse_args(argv))
    evaluated = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluated) == 1 and "eval_rewards/accuracies" in evaluated[0]
    assert trainer.train_dataset.num_rows == 16 and trainer.eval_dataset.num_rows == 8
    assert next(trainer.model.parameters()).dtype == torch.float32  # --dtype float32, TRL's default
    before, after = weights(model_dir), weights(out)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_missing_test_split_is_a_clear_error(tmp_path, model_dir, data_file):
    argv = [
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        data_file,
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit, match="no split 'test'"):
        main([*argv, "--eval_strategy", "steps", "--max_steps", "1", *COMMON])
    # --test_split_size holds a share of the one file out, as TRL's flag of that name does
    trainer = run(
        *parse_args(
            [*argv, "--eval_strategy", "steps", "--max_steps", "1", "--test_split_size", "0.25", *COMMON]
        )
    )
    assert trainer.train_dataset.num_rows == 18 and trainer.eval_dataset.num_rows == 6
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


def test_streaming_a_local_file(tmp_path, model_dir, data_file):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", model_dir, "--dataset_name", data_file, "--output_dir", str(out)]
    main([*argv, "--dataset_streaming", "--max_steps", "2", "--per_device_train_batch_size", "4", *COMMON])
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_the_console_script_trains_a_lora_adapter_from_a_yaml_file(tmp_path, model_dir, data_file):
    script = Path(sys.executable).parent / "dpo-trainer"
    assert script.exists(), "the dpo-trainer console script is not installed (pip install -e .)"
    out = tmp_path / "out"
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\n"
        f"dataset_name: {data_file}\n"
        "use_peft: true\n"
        "lora_r: 4\n"
        "lora_alpha: 8\n"
        "lora_target_modules: [q_proj, v_proj]\n"
        "max_steps: 2\n"
        "per_device_train_batch_size: 4\n"
        "learning_rate: 0.001\n"
        "beta: 0.3\n"
    )
    command = [str(script), "--config", str(config), "--beta", "0.25", "--output_dir", str(out), *COMMON]
    env = {**dist_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert "| beta | 0.25 |" in (out / "README.md").read_text()  # the flag over the file's 0.3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(word, True) for word in ("true", "True", "TRUE", "1", "yes", "Yes")],
        *[(word, None) for word in ("false", "False", "0", "no", "none", "None", "")],
        (True, True),  # YAML's true and false arrive as bools
        (False, None),
        (None, None),
        ("out/checkpoint-500", "out/checkpoint-500"),
        ("./true", "./true"),  # a folder named like a word
    ],
)
def test_resume_from_checkpoint_words(value, expected):
    assert resume_from(value) is expected or resume_from(value) == expected


def test_resume_from_checkpoint_true_resumes_from_the_newest_checkpoint(
    tmp_path, model_dir, data_file, monkeypatch
):
    from dpo_trainer.trainer import DPOTrainer

    steps = []
    training_step = DPOTrainer.training_step
    monkeypatch.setattr(
        DPOTrainer, "training_step", lambda self, *a, **k: steps.append(1) or training_step(self, *a, **k)
    )
    out = tmp_path / "out"
    argv = ["--model_name_or_path", model_dir, "--dataset_name", data_file, "--output_dir", str(out)]
    argv += ["--per_device_train_batch_size", "4", *COMMON[:5], "--max_steps"]
    run(*parse_args([*argv, "2", "--save_strategy", "steps", "--save_steps", "1"]))
    assert (out / "checkpoint-2").is_dir() and len(steps) == 2
    # "true" was taken as a folder named "true"; it means the newest checkpoint, as Trainer.train(True) does
    steps.clear()
    trainer = run(*parse_args([*argv, "3", "--save_strategy", "no", "--resume_from_checkpoint", "true"]))
    assert trainer.state.global_step == 3 and len(steps) == 1  # steps 1 and 2 came from checkpoint-2
    steps.clear()
    trainer = run(*parse_args([*argv, "3", "--save_strategy", "no", "--resume_from_checkpoint", "False"]))
    assert trainer.state.global_step == 3 and len(steps) == 3  # afresh
