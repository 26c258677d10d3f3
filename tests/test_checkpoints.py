"""Resume picks the newest complete checkpoint; folders a kill -9 left half-written are skipped and named.

A kill during `Trainer._save_checkpoint` leaves the newest `checkpoint-N` in one of these states, which the
tests write by hand: an empty folder, weights without `trainer_state.json` (Trainer writes it last), a
truncated safetensors file, a truncated `optimizer.pt`.
"""

import json
import logging
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

import pipeline  # examples/, on the path through conftest
from dpo_trainer import DPOTrainer
from dpo_trainer.checkpoints import (
    checkpoint_problem,
    last_complete_checkpoint,
    list_checkpoints,
    safetensors_problem,
)

from conftest import dpo_config, preference_rows

ROWS = preference_rows(16, seed=11)
SETTINGS = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    """A 4-step run that saved checkpoint-2 and checkpoint-4, and its per-step losses."""
    from dpo_trainer.testing import tiny_causal_lm

    tmp = tmp_path_factory.mktemp("run")
    trainer = DPOTrainer(
        tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=5),
        args=dpo_config(tmp, **SETTINGS),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer.args.output_dir, losses(trainer)


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A copy of the finished run's output folder, free to damage."""
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    return out


def truncate(path, keep_fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep_fraction))


def damage(run_dir, how: str) -> str:
    """Write checkpoint-6 as a kill during its save would leave it; returns its path."""
    partial = run_dir / "checkpoint-6"
    if how == "empty folder":
        partial.mkdir()
    elif how == "no trainer_state.json":
        partial.mkdir()
        shutil.copy(run_dir / "checkpoint-4" / "model.safetensors", partial / "model.safetensors")
    else:
        shutil.copytree(run_dir / "checkpoint-4", partial)
        if how == "truncated safetensors":
            truncate(partial / "model.safetensors")
        elif how == "truncated optimizer":
            truncate(partial / "optimizer.pt")
        elif how == "unreadable trainer_state.json":
            (partial / "trainer_state.json").write_text('{"global_step": ')
        else:
            raise AssertionError(how)
    return str(partial)


def test_a_finished_run_has_only_complete_checkpoints(finished_run):
    out, _ = finished_run
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-2"]
    assert [checkpoint_problem(p) for p in list_checkpoints(out)] == [None, None]
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-4")


@pytest.mark.parametrize(
    "how, reason",
    [
        ("empty folder", "empty folder"),
        ("no trainer_state.json", "no trainer_state.json"),
        ("unreadable trainer_state.json", "trainer_state.json cannot be read"),
        ("truncated safetensors", "model.safetensors"),
        ("truncated optimizer", "optimizer.pt"),
    ],
)
def test_half_written_checkpoints_are_skipped_and_named(run_dir, how, reason, caplog):
    partial = damage(run_dir, how)
    assert reason in checkpoint_problem(partial)
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.checkpoints"):
        assert last_complete_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-4")
    assert partial in caplog.text and reason in caplog.text


def test_the_newest_is_used_when_every_older_one_is_broken_too(run_dir):
    truncate(run_dir / "checkpoint-4" / "model.safetensors", 0.99)  # one byte short is enough
    assert last_complete_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-2")
    shutil.rmtree(run_dir / "checkpoint-2")
    (run_dir / "checkpoint-2").mkdir()
    assert last_complete_checkpoint(str(run_dir)) is None


def test_safetensors_check_compares_the_header_with_the_size(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.ones(10), "b": torch.zeros(3, 4)}, path)
    assert safetensors_problem(path) is None
    with open(path, "ab") as handle:  # extra bytes: not what the header describes either
        handle.write(b"\0" * 8)
    assert "header describes" in safetensors_problem(path)
    with open(path, "wb") as handle:
        handle.write(b"\x05")
    assert "truncated" in safetensors_problem(path)


def test_sharded_weights_need_every_shard(run_dir):
    folder = run_dir / "checkpoint-4"
    os.replace(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors" in checkpoint_problem(str(folder))
    shutil.copy(folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors")
    assert checkpoint_problem(str(folder)) is None


@pytest.mark.parametrize("how", ["empty folder", "truncated safetensors"])
def test_train_resumes_from_the_newest_complete_checkpoint(finished_run, run_dir, how, tokenizer, make_model):
    # Trainer alone picks checkpoint-6 and fails ("Can't find a valid checkpoint" / a safetensors error).
    damage(run_dir, how)
    shutil.rmtree(run_dir / "checkpoint-4")  # resume from step 2: two steps to compare
    args = dpo_config(run_dir.parent, **SETTINGS)
    assert args.output_dir == str(run_dir)
    # other initial weights (same reference): steps 3-4 match only if checkpoint-2's weights were loaded
    trainer = DPOTrainer(
        make_model(seed=99), make_model(seed=5), args=args, train_dataset=ROWS, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=True)
    resumed, straight = losses(trainer), finished_run[1]
    assert sorted(resumed) == [1, 2, 3, 4]  # 1-2 from checkpoint-2's trainer_state.json
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_train_without_any_complete_checkpoint_names_those_skipped_and_how_to_start_afresh(
    run_dir, tokenizer, make_model
):
    # a restart loop whose first kill landed in the first checkpoint's write: every resume fails the same way
    damage(run_dir, "no trainer_state.json")
    (run_dir / "checkpoint-8").mkdir()
    for folder in ("checkpoint-2", "checkpoint-4"):
        shutil.rmtree(run_dir / folder)
    args = dpo_config(run_dir.parent, **SETTINGS)
    trainer = DPOTrainer(make_model(seed=5), args=args, train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=True)
    message = str(error.value)
    assert "holds no complete checkpoint-N folder" in message
    assert "[checkpoint-8: empty folder; checkpoint-6: no trainer_state.json" in message
    assert "delete them and pass resume_from_checkpoint=None (or False" in message
    # the way on that the message gives: the run starts afresh
    trainer = DPOTrainer(make_model(seed=5), args=args, train_dataset=ROWS, processing_class=tokenizer)
    assert trainer.train(resume_from_checkpoint=False).global_step == 4
    assert last_complete_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-4")


def test_train_resuming_a_folder_without_checkpoints_fails_as_in_transformers(
    tmp_path, tokenizer, make_model
):
    args = dpo_config(tmp_path, **SETTINGS)
    trainer = DPOTrainer(make_model(seed=5), args=args, train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(
        ValueError, match=r"No valid checkpoint found in output directory .*resume_from_checkpoint=None"
    ):
        trainer.train(resume_from_checkpoint=True)


# ---------------------------------------------------------------- resuming with changed settings


def resume(run_dir, tokenizer, make_model, rows=ROWS, **changes):
    args = dpo_config(run_dir.parent, **{**SETTINGS, **changes})
    trainer = DPOTrainer(make_model(seed=5), args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True)
    return trainer


def test_checkpoints_record_the_dpo_settings(finished_run):
    with open(os.path.join(finished_run[0], "checkpoint-4", "dpo_settings.json")) as handle:
        saved = json.load(handle)
    assert (
        saved["beta"] == 0.1 and saved["loss_type"] in ("sigmoid", ["sigmoid"]) and len(saved["data"]) == 24
    )


def test_resuming_with_the_same_settings_says_nothing(run_dir, tokenizer, make_model, caplog):
    shutil.rmtree(run_dir / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.trainer"):
        resume(run_dir, tokenizer, make_model)
    assert "changed settings" not in caplog.text


def test_resuming_with_another_beta_warns_naming_it(run_dir, tokenizer, make_model, caplog):
    shutil.rmtree(run_dir / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.trainer"):
        resume(run_dir, tokenizer, make_model, beta=0.25, max_length=300)
    assert "changed settings" in caplog.text
    assert "beta: 0.1 -> 0.25" in caplog.text and "max_length: " in caplog.text


@pytest.mark.parametrize("change", ["loss_type", "data"])
def test_resuming_with_another_loss_or_data_is_refused(run_dir, tokenizer, make_model, change):
    shutil.rmtree(run_dir / "checkpoint-4")
    kwargs = {"loss_type": "ipo"} if change == "loss_type" else {"rows": preference_rows(16, seed=12)}
    with pytest.raises(ValueError, match=rf"Cannot resume from .*checkpoint-2.*{change}: "):
        resume(run_dir, tokenizer, make_model, **kwargs)


# ---------------------------------------------------------------- examples/hh.py: the run manifest

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hh.py")


@pytest.fixture(scope="module")
def hh():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hh_manifest", HH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def manifest_of(hh, out, *flags):
    script_args, config = hh.parse_args(["--output_dir", str(out), *flags])
    return pipeline.run_manifest(hh.STAGES, script_args, config)


def finished_stages(hh, out, manifest, stages=("sft", "dpo", "eval")):
    """A run folder as an earlier run with `manifest` left it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"stages": manifest}))
    for stage in stages:
        (out / stage).mkdir()
        (out / stage / "done.json").write_text("{}")


def test_a_changed_dpo_setting_refuses_naming_it_and_what_it_invalidates(hh, tmp_path):
    out = tmp_path / "run"
    finished_stages(hh, out, manifest_of(hh, out))
    changed = manifest_of(hh, out, "--beta", "0.5")
    with pytest.raises(SystemExit) as error:
        pipeline.check_run_manifest(str(out), changed, restart_stale=False)
    message = str(error.value)
    assert "dpo: beta: 2.0 -> 0.5" in message
    assert "eval: after: " in message  # the samples of the old policy are stale too
    assert "sft:" not in message and "--restart_stale" in message
    pipeline.check_run_manifest(
        str(out), manifest_of(hh, out), restart_stale=False
    )  # the same settings: fine


def test_restart_stale_starts_the_changed_stages_over_and_keeps_the_old_ones(hh, tmp_path):
    out = tmp_path / "run"
    finished_stages(hh, out, manifest_of(hh, out))
    pipeline.check_run_manifest(
        str(out), manifest_of(hh, out, "--sft_learning_rate", "1e-3"), restart_stale=True
    )
    left = sorted(os.listdir(out))
    assert "sft" not in left and "dpo" not in left and "eval" not in left  # every stage after SFT too
    assert {name.split(".")[0] for name in left if ".stale-" in name} == {"sft", "dpo", "eval"}


def test_sampling_settings_invalidate_only_the_evaluation(hh, tmp_path):
    out = tmp_path / "run"
    old, new = manifest_of(hh, out), manifest_of(hh, out, "--temperatures", "0.5")
    changes = pipeline.manifest_changes(old, new)
    assert list(changes) == ["eval"] and changes["eval"] == ["temperatures: '0.25,0.5,0.75,1.0' -> '0.5'"]
    assert new["dpo"]["fingerprint"] == old["dpo"]["fingerprint"]


def test_the_readme_command_rerun_continues_the_last_default_run(hh, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script_args, config = hh.parse_args([])  # no earlier run: a new timestamped folder
    assert config.output_dir.startswith(os.path.join("runs", "hh-"))
    finished_stages(hh, tmp_path / config.output_dir, pipeline.run_manifest(hh.STAGES, script_args, config))
    assert hh.parse_args([])[1].output_dir == config.output_dir  # the same command: the same folder
    other = hh.parse_args(["--beta", "0.3"])[1].output_dir
    assert other != config.output_dir and other.startswith(os.path.join("runs", "hh-"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperatures", "0.5,hot"], "--temperatures must be comma-separated numbers"),
        (["--bon_temperatures", "-1"], "finite number >= 0"),
        (["--bon_n", "4,x"], "--bon_n"),
        (["--judge", "llm"], "--judge llm needs --judge_url"),
        (["--judge", "llm", "--judge_url", "localhost:1/v1", "--judge_model", "m"], "http"),
        (["--judge", "reward"], "--reward_model"),
    ],
)
def test_judge_and_sampling_flags_fail_before_any_training(hh, tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(message) if message.startswith("--") else message):
        hh.main(["--output_dir", str(out), *flags])
    assert not (out / "base").exists() and not (out / "sft").exists()  # nothing was built or trained


def test_an_explicit_half_written_checkpoint_is_refused_with_the_reason(run_dir, tokenizer, make_model):
    partial = damage(run_dir, "truncated safetensors")
    args = dpo_config(run_dir.parent, **SETTINGS)
    trainer = DPOTrainer(make_model(seed=5), args=args, train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-6: model.safetensors"):
        trainer.train(resume_from_checkpoint=partial)


# ---------------------------------------------------------------- every setting that decides the result is compared

# a valid other value of every DPOConfig field that decides the result: a new field must be added here, or the
# test below that walks the fields fails
OTHER_VALUES = {
    "beta": 0.2,
    "loss_type": ["hinge"],
    "label_smoothing": 0.1,
    "loss_weights": [2.0],
    "f_divergence_type": "forward_kl",
    "f_alpha_divergence_coef": 0.3,
    "discopop_tau": 0.1,
    "use_weighting": True,
    "ld_alpha": 0.5,
    "rpo_alpha": 0.5,
    "router_aux_loss_coef": 0.01,
    "max_length": 64,
    "max_prompt_length": 32,
    "truncation_mode": "keep_end",
    "precompute_ref_log_probs": True,
    "disable_dropout": False,
    "peft_reference": "base",
    "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.5,
    "ref_model_sync_steps": 8,
}
# settings a value of OTHER_VALUES needs, in the saved run and the changed one alike (sigmoid takes no
# label_smoothing)
NEEDS = {"label_smoothing": {"loss_type": "cdpo"}}


def test_every_dpo_field_is_either_a_result_setting_or_named_neutral():
    import dataclasses

    from transformers import TrainingArguments

    from dpo_trainer import DPOConfig
    from dpo_trainer.config import NEUTRAL_FIELDS, RESULT_FIELDS

    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    own = {field.name for field in dataclasses.fields(DPOConfig)} - inherited
    assert set(RESULT_FIELDS).isdisjoint(NEUTRAL_FIELDS)
    assert own == set(RESULT_FIELDS) | set(NEUTRAL_FIELDS)
    assert set(OTHER_VALUES) == set(RESULT_FIELDS)


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_a_changed_result_setting_is_refused_or_warned_on_resume(tmp_path, name, caplog):
    from dpo_trainer.checkpoints import check_resume_settings, run_settings, write_settings
    from dpo_trainer.config import LOSS_FIELDS, TRAINER_LOSS_FIELDS

    needs = NEEDS.get(name, {})
    saved = run_settings(dpo_config(tmp_path, **needs), "padded", "data-key")
    changed = run_settings(dpo_config(tmp_path, **needs, **{name: OTHER_VALUES[name]}), "padded", "data-key")
    assert changed[name] != saved[name]
    write_settings(str(tmp_path / "checkpoint-2"), saved)
    objective = name in LOSS_FIELDS + TRAINER_LOSS_FIELDS and name != "beta"
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.checkpoints"):
        if objective:  # another loss: another experiment
            with pytest.raises(ValueError, match=rf"Cannot resume .*{name}: "):
                check_resume_settings(str(tmp_path / "checkpoint-2"), changed)
        else:
            check_resume_settings(str(tmp_path / "checkpoint-2"), changed)
            assert f"{name}: " in caplog.text


def test_a_checkpoint_whose_loss_name_meant_the_papers_form_is_refused(tmp_path):
    from dpo_trainer.checkpoints import check_resume_settings, run_settings, write_settings

    current = run_settings(dpo_config(tmp_path, loss_type="ipo"), "padded", "data-key")
    older = {key: value for key, value in current.items() if key != "loss_names"}  # written before the rename
    write_settings(str(tmp_path / "old"), older)
    with pytest.raises(ValueError, match="ipo_paper"):
        check_resume_settings(str(tmp_path / "old"), current)
    write_settings(str(tmp_path / "new"), current)
    check_resume_settings(str(tmp_path / "new"), current)  # the same names, the same forms
    # the previous release's name of TRL's form is the same loss
    write_settings(str(tmp_path / "trl-name"), {**older, "loss_type": ["ipo_trl"]})
    check_resume_settings(str(tmp_path / "trl-name"), current)


def test_a_checkpoint_whose_sigmoid_was_conservative_dpo_is_refused_naming_cdpo(tmp_path):
    """Before `loss_names` 2, sigmoid with label_smoothing > 0 computed conservative DPO (now `cdpo`): refused, as
    the other renamed forms are. A sigmoid saved without label smoothing, or by this release, is TRL's sigmoid."""
    from dpo_trainer.checkpoints import check_resume_settings, run_settings, write_settings

    cdpo = run_settings(dpo_config(tmp_path, loss_type="cdpo", label_smoothing=0.1), "padded", "data-key")
    older = {key: value for key, value in cdpo.items() if key != "loss_names"}
    write_settings(str(tmp_path / "old"), {**older, "loss_type": ["sigmoid"]})
    with pytest.raises(
        ValueError, match=r"loss_type: \['sigmoid'\] -> \['cdpo'\].*sigmoid with label_smoothing: cdpo"
    ):
        check_resume_settings(str(tmp_path / "old"), cdpo)
    plain = run_settings(dpo_config(tmp_path), "padded", "data-key")
    write_settings(
        str(tmp_path / "old-plain"), {key: value for key, value in plain.items() if key != "loss_names"}
    )
    check_resume_settings(str(tmp_path / "old-plain"), plain)


@pytest.mark.parametrize(
    "flags, stale",
    [
        (["--rounds", "3"], {"round1_pairs", "round1", "round2_pairs", "round2", "eval"}),
        (
            ["--judge", "reward", "--reward_model", "some/rm"],
            {"round1_pairs", "round1", "round2_pairs", "round2", "eval"},
        ),
        (["--round_reference", "previous"], {"round2", "eval"}),
        (["--temperatures", "0.5"], {"eval"}),
    ],
)
def test_a_changed_rounds_or_judge_setting_makes_the_rounds_stale(hh, tmp_path, flags, stale):
    out = tmp_path / "run"

    def manifest(*more):
        script_args, config = hh.parse_args(["--output_dir", str(out), "--rounds", "2", *more])
        return pipeline.run_manifest(hh.stage_settings(script_args), script_args, config)

    old = manifest()
    assert list(old) == ["sft", "round1_pairs", "round1", "round2_pairs", "round2", "eval"]
    finished_stages(hh, out, old, stages=tuple(old))
    pipeline.check_run_manifest(str(out), manifest(), restart_stale=False)  # the same settings: fine
    new = manifest(*flags)
    assert set(pipeline.manifest_changes(old, new)) == stale
    with pytest.raises(SystemExit, match="--restart_stale"):
        pipeline.check_run_manifest(str(out), new, restart_stale=False)
