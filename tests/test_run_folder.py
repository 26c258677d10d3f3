"""examples/pipeline.py, the run-folder machinery of examples/hh.py and examples/sentiment.py: damaged files are
named and their stage done again, an output path that cannot be a run folder is refused with what to do, and
half-written checkpoints are removed before a stage resumes or starts over (issue 20)."""

import json
import os
import re
from dataclasses import dataclass

import pytest

import pipeline  # examples/, on the path through conftest
from dpo_trainer.testing import tiny_causal_lm


@dataclass
class Args:
    dataset: str = "data"


def test_a_damaged_done_json_is_named_and_the_stage_counts_as_unfinished(tmp_path, capsys):
    stage = tmp_path / "dpo"
    stage.mkdir()
    pipeline.write_json(str(stage / "done.json"), {"seconds": 1.0})
    assert pipeline.stage_finished(str(stage)) and pipeline.stage_done(str(stage))["seconds"] == 1.0
    text = (stage / "done.json").read_text()
    (stage / "done.json").write_text(text[: len(text) // 2])  # truncated
    assert not pipeline.stage_finished(str(stage))
    err = capsys.readouterr().err
    assert f"{stage / 'done.json'} is damaged (JSONDecodeError: " in err
    assert "the stage is treated as unfinished and done again." in err


def test_a_stage_whose_outputs_are_damaged_or_missing_is_unfinished(tmp_path, capsys):
    stage = tmp_path / "pairs"
    stage.mkdir()
    pipeline.write_json(str(stage / "done.json"), {})
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3
    pipeline.write_jsonl(str(stage / "train.jsonl"), rows)
    assert pipeline.stage_finished(str(stage), outputs=("train.jsonl",))
    assert pipeline.read_json(str(stage / "train.jsonl"), "", lines=True) == rows
    with open(stage / "train.jsonl", "a") as handle:
        handle.write('{"prompt": "half')  # a line cut short
    assert not pipeline.stage_finished(str(stage), outputs=("train.jsonl",))
    assert f"{stage / 'train.jsonl'} is damaged" in capsys.readouterr().err
    assert not pipeline.stage_finished(str(stage), outputs=("samples.jsonl",))
    assert f"{stage / 'samples.jsonl'} is missing" in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_with_what_to_do(tmp_path):
    taken = tmp_path / "results"
    taken.write_text("precious")
    with pytest.raises(
        SystemExit, match=re.escape(f"--output_dir {taken} is a file, not a folder: choose another")
    ):
        pipeline.prepare_run_dir(str(taken), Args())
    with pytest.raises(
        SystemExit, match=r"cannot be written \(Not a directory: .*choose another --output_dir"
    ):
        pipeline.prepare_run_dir(str(taken / "run"), Args())
    assert taken.read_text() == "precious"


def test_an_earlier_run_is_resumed_without_writing_to_it(tmp_path):
    out = tmp_path / "run"
    pipeline.prepare_run_dir(str(out), Args())
    marker = out / pipeline.RUN_MARKER
    assert json.loads(marker.read_text())["script_args"] == {"dataset": "data"}
    stamp = os.stat(marker).st_mtime_ns
    pipeline.prepare_run_dir(str(out), Args(dataset="other"))
    assert os.stat(marker).st_mtime_ns == stamp and sorted(os.listdir(out)) == [pipeline.RUN_MARKER]


def test_a_folder_that_cannot_be_written_is_said_before_a_stage_works(tmp_path, monkeypatch):
    """`unwritable` makes and removes a file (root ignores permission bits; a read-only mount does not), so its
    failure is simulated here; tests/test_examples.py runs hh.py on a real read-only mount."""
    assert pipeline.unwritable(str(tmp_path / "new" / "stage")) is None
    assert os.listdir(tmp_path / "new" / "stage") == []  # made, and the probe removed

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pipeline.tempfile, "mkstemp", refuse)
    assert pipeline.unwritable(str(tmp_path)) == "Read-only file system"
    expected = f"[dpo] {tmp_path / 'dpo'} cannot be written (Read-only file system), and this stage has work"
    with pytest.raises(SystemExit, match=re.escape(expected)):
        pipeline.start_stage(str(tmp_path / "dpo"), "dpo")
    with pytest.raises(SystemExit, match=r"\[eval\] .* cannot be written \(Read-only file system\)"):
        pipeline.require_writable(str(tmp_path), "eval")
    assert not pipeline.write_summary(str(tmp_path), {"a": 1})
    assert not (tmp_path / "summary.json").exists()


def make_checkpoint(folder, step: int, tokenizer) -> str:
    """A complete checkpoint-N as Trainer writes it (weights, then trainer_state.json last)."""
    path = os.path.join(folder, f"checkpoint-{step}")
    tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as handle:
        json.dump({"global_step": step}, handle)
    return path


def test_half_written_checkpoints_are_removed_and_the_stage_resumes_or_starts_over(
    tmp_path, tokenizer, capsys
):
    folder = str(tmp_path / "dpo")
    half = os.path.join(folder, "checkpoint-2")
    os.makedirs(half)
    with open(os.path.join(half, "rng_state_1.pth"), "wb") as handle:
        handle.write(b"from the killed run")
    # a kill in the first checkpoint write: nothing to resume; the stage starts over, without the old files
    assert pipeline.start_stage(folder, "dpo") is None
    err = capsys.readouterr().err
    assert f"[dpo] incomplete checkpoint folders in {folder}" in err
    assert "removed: checkpoint-2 (no trainer_state.json (the checkpoint was not finished))" in err
    assert "no complete checkpoint: the stage starts over." in err
    assert not os.path.exists(half)

    complete = make_checkpoint(folder, 2, tokenizer)
    os.makedirs(os.path.join(folder, "checkpoint-4"))  # a later kill, while writing checkpoint-4
    assert pipeline.start_stage(folder, "dpo") == complete
    err = capsys.readouterr().err
    assert "removed: checkpoint-4 (empty folder); resuming from checkpoint-2." in err
    assert sorted(os.listdir(folder)) == ["checkpoint-2"]
    assert pipeline.start_stage(folder, "dpo") == complete and capsys.readouterr().err == ""


def test_writes_are_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "samples.json")
    pipeline.write_json(path, [1, 2])

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        pipeline.write_json(path, [Unserialisable()])
    assert json.loads(open(path).read()) == [1, 2] and os.listdir(tmp_path) == ["samples.json"]


# ---------------------------------------------------------------- on-policy rounds (issue 23)


def test_the_rounds_split_the_prompts_into_disjoint_parts_in_order():
    prompts = [f"p{i}" for i in range(11)]
    parts = pipeline.split_rounds(prompts, 3)
    assert [len(part) for part in parts] == [4, 4, 3]
    assert [p for part in parts for p in part] == prompts  # disjoint, every prompt once, in order
    assert parts == pipeline.split_rounds(list(prompts), 3)  # deterministic
    assert pipeline.split_rounds(prompts, 1) == [prompts]
    with pytest.raises(SystemExit, match="--rounds 12 needs 1 to 11 rounds"):
        pipeline.split_rounds(prompts, 12)


def test_the_round_stages_chain_each_round_to_the_one_before():
    stages = pipeline.round_stages(3, ("n",), ("seed",), ("full",), ("beta",), after=("sft",))
    assert [s.name for s in stages] == [
        "round1_pairs",
        "round1",
        "round2_pairs",
        "round2",
        "round3_pairs",
        "round3",
    ]
    assert [s.after for s in stages] == [("sft",), ("round1_pairs",), ("round1",), ("round2_pairs",), ("round2",),
                                         ("round3_pairs",)]  # fmt: skip
    assert "round_reference" not in stages[1].script_keys and "round_reference" in stages[3].script_keys
    assert all("rounds" in s.script_keys for s in stages[::2])
    assert (
        pipeline.round_stages(1, ("n",), (), (), (), after=("sft",)) == []
    )  # one round: the existing stages


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_rounds_reference_is_the_sft_model_or_the_previous_round(tmp_path, tokenizer, pairs, lora):
    """Round 2 starts from round 1's policy. With reference `previous` policy and reference are equal at its first
    step (held-out loss ln 2); with `sft` its first held-out loss is round 1's last, against the same SFT model."""
    import math

    from peft import LoraConfig

    from dpo_trainer import DPOConfig

    sft = str(tmp_path / "sft")
    pipeline.save_pretrained_whole(
        sft, tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4), tokenizer
    )
    config = DPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, learning_rate=5e-2, per_device_train_batch_size=4,
                       per_device_eval_batch_size=8, save_steps=100, report_to="none", bf16=False, disable_tqdm=True,
                       gradient_checkpointing=False, beta=0.5)  # fmt: skip
    run = pipeline.Run.open(Args(), config)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    train, held_out = pairs[:12], pairs[12:]
    first = pipeline.dpo_stage(run, "round1", sft, train, held_out, peft_config=peft)
    assert os.path.exists(os.path.join(first, "adapter_config.json")) == lora
    round1 = pipeline.stage_done(run.path("round1"))
    assert round1["before"]["before_loss"] == pytest.approx(
        math.log(2), abs=1e-5
    )  # round 1: from π_SFT = π_ref
    assert abs(round1["after"]["eval_loss"] - math.log(2)) > 1e-3  # it moved
    for reference in ("previous", "sft"):
        pipeline.dpo_stage(run, f"round2-{reference}", sft, train, held_out, peft_config=peft, start=first,
                           reference=reference)  # fmt: skip
    previous = pipeline.stage_done(run.path("round2-previous"))["before"]["before_loss"]
    against_sft = pipeline.stage_done(run.path("round2-sft"))["before"]["before_loss"]
    assert previous == pytest.approx(math.log(2), abs=1e-5)
    assert against_sft == pytest.approx(round1["after"]["eval_loss"], abs=1e-4)
