"""Resuming ends where an uninterrupted run ends: a finished run resumes to nothing, a run killed and resumed any
number of times stops at exactly its last step with the weights of a run never killed, and a checkpoint of the
other kind of run (full fine-tuning or a PEFT adapter) is refused before anything is loaded.

transformers' Trainer resumed at global step g with E optimizer steps per epoch restarts its epoch loop at epoch
g // E and checks for the last step only after a step: a finished run whose last step is not a multiple of E
takes one more step (and writes one more checkpoint) on every resume. The kills here are exceptions raised by a
callback: after an optimizer step (before its checkpoint), or right after a checkpoint is written.
"""

import hashlib
import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from dpo_trainer import DPOTrainer
from dpo_trainer.checkpoints import checkpoint_kind
from dpo_trainer.testing import tiny_causal_lm

from conftest import dpo_config, preference_rows

ROWS = preference_rows(16, seed=11)  # batch 2: 8 optimizer steps per epoch
STEPS = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
# 1.5 epochs of ceil(8 batches / 3) = 3 optimizer steps (the last of 2 batches): 5 steps, a fractional epoch
EPOCHS = dict(
    max_steps=-1,
    num_train_epochs=1.5,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=3,
    save_strategy="steps",
    save_steps=2,
)


class Killed(Exception):
    """What a kill -9 does to a run, as far as the files it leaves are concerned."""


class Kill(TrainerCallback):
    """Stops the run after the optimizer step `after_step` (before that step's checkpoint is written), or right
    after the checkpoint of step `after_save` is written."""

    def __init__(self, after_step=None, after_save=None):
        self.after_step, self.after_save = after_step, after_save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.after_step:
            raise Killed(f"after step {state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.after_save:
            raise Killed(f"after checkpoint-{state.global_step}")


def trainer(tmp_path, tokenizer, seed=5, callbacks=None, out="out", peft_config=None, **settings):
    """A DPOTrainer of a tiny Llama (initial weights `seed`) writing to tmp_path/out."""
    return DPOTrainer(
        tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=seed),
        args=dpo_config(tmp_path, output_dir=str(tmp_path / out), **settings),
        train_dataset=ROWS,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )


def files(folder) -> dict[str, tuple]:
    """Every file under `folder`: (size, modification time, sha256), by relative path."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            found[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns, digest)
    return found


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def checkpoint_steps(folder) -> list[int]:
    return sorted(int(name.split("-")[1]) for name in os.listdir(folder) if name.startswith("checkpoint-"))


# ---------------------------------------------------------------- a finished run resumes to nothing


@pytest.mark.parametrize(
    "settings, last, saved",
    [(STEPS, 4, [2, 4]), (EPOCHS, 5, [2, 4, 5])],
    ids=["max_steps not a multiple of the epoch", "fractional epochs with accumulation"],
)
def test_resuming_a_finished_run_trains_nothing_and_says_so(
    tmp_path, tokenizer, caplog, settings, last, saved
):
    assert trainer(tmp_path, tokenizer, **settings).train().global_step == last
    out = tmp_path / "out"
    assert checkpoint_steps(out) == saved
    before = files(out)
    final = load_file(str(out / f"checkpoint-{last}" / "model.safetensors"))
    for _ in range(2):  # the run went to step 5, then 6
        # other initial weights: the model holds the checkpoint's weights only if they were loaded
        resumed = trainer(tmp_path, tokenizer, seed=99, **settings)
        with caplog.at_level(logging.WARNING, logger="dpo_trainer.checkpoints"):
            output = resumed.train(resume_from_checkpoint=True)
        assert output.global_step == resumed.state.global_step == last
        assert files(out) == before  # no checkpoint-(last + 1), nothing rewritten
        assert_same_weights(weights(resumed.model), final)
    message = f"checkpoint-{last}: the run already reached its last step, {last} of {last}"
    assert message in caplog.text and "nothing to train" in caplog.text


def test_resuming_past_the_last_step_trains_nothing_and_says_so(tmp_path, tokenizer, caplog):
    trainer(tmp_path, tokenizer, **STEPS).train()
    before = files(tmp_path / "out")
    resumed = trainer(tmp_path, tokenizer, **{**STEPS, "max_steps": 3})
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.checkpoints"):
        assert resumed.train(resume_from_checkpoint=True).global_step == 4
    assert files(tmp_path / "out") == before
    assert "is at step 4, past its last step 3 (max_steps=3)" in caplog.text


def test_the_preferred_ft_baseline_resumes_a_finished_run_to_nothing(tmp_path, tokenizer, caplog):
    from dpo_trainer.sft import sft_trainer

    def build():
        args = TrainingArguments(
            output_dir=str(tmp_path / "sft"),
            **STEPS,
            learning_rate=1e-3,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=5)
        return sft_trainer(model, tokenizer, args, ROWS, max_length=64, max_prompt_length=32)

    assert build().train().global_step == 4
    before = files(tmp_path / "sft")
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.checkpoints"):
        assert build().train(resume_from_checkpoint=True).global_step == 4
    assert files(tmp_path / "sft") == before
    assert "nothing to train" in caplog.text


# ---------------------------------------------------------------- killed and resumed, again and again


@pytest.mark.parametrize(
    "settings, last, kills",
    [
        # 12 steps, 8 per epoch, a checkpoint every 3: killed between checkpoints (resumed from 3), right after
        # checkpoint-9 (resumed in the second epoch), right after the last checkpoint (resumed: finished)
        (
            {**STEPS, "max_steps": 12, "save_steps": 3},
            12,
            [Kill(after_step=5), Kill(after_save=9), Kill(after_save=12)],
        ),
        # 2.5 epochs of 3 accumulated steps, 8 steps: resumed mid-epoch (from 2, then 4), at an epoch's start
        # (from 6), and finished (from 8)
        (
            {**EPOCHS, "num_train_epochs": 2.5},
            8,
            [Kill(after_step=3), Kill(after_save=4), Kill(after_step=7), Kill(after_save=8)],
        ),
    ],
    ids=["max_steps", "epochs with accumulation"],
)
def test_a_kill_and_resume_loop_ends_at_the_last_step_with_the_weights_of_an_unkilled_run(
    tmp_path, tokenizer, settings, last, kills
):
    straight = trainer(tmp_path, tokenizer, out="straight", **settings)
    assert straight.train().global_step == last
    expected = weights(straight.model)

    resume = False
    for kill in kills:
        with pytest.raises(Killed):
            trainer(tmp_path, tokenizer, callbacks=[kill], **settings).train(resume_from_checkpoint=resume)
        resume = True
    for _ in range(2):  # the restart loop keeps restarting a finished run
        resumed = trainer(tmp_path, tokenizer, **settings)
        assert resumed.train(resume_from_checkpoint=True).global_step == last
        assert_same_weights(weights(resumed.model), expected)
    assert checkpoint_steps(tmp_path / "out") == checkpoint_steps(tmp_path / "straight")
    assert_same_weights(
        load_file(str(tmp_path / "out" / f"checkpoint-{last}" / "model.safetensors")),
        load_file(str(tmp_path / "straight" / f"checkpoint-{last}" / "model.safetensors")),
    )


# ---------------------------------------------------------------- full fine-tuning and PEFT adapters


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("written_by", ["full", "adapter"])
def test_a_checkpoint_of_the_other_kind_of_run_is_refused_naming_both(tmp_path, tokenizer, written_by):
    settings = {**STEPS, "max_steps": 2}
    writer_peft, resumer_peft = (None, lora()) if written_by == "full" else (lora(), None)
    trainer(tmp_path, tokenizer, peft_config=writer_peft, **settings).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint_kind(str(checkpoint))[0] == written_by
    before = files(tmp_path / "out")
    resumed = trainer(tmp_path, tokenizer, peft_config=resumer_peft, **settings)
    expected = (
        r"written by a full fine-tuning run .* this run trains a PEFT adapter .* without peft_config"
        if written_by == "full"
        else r"written by a PEFT adapter run .* this run is full fine-tuning .* with the same peft_config"
    )
    with pytest.raises(ValueError, match=rf"Cannot resume from .*checkpoint-2: it was {expected}"):
        resumed.train(resume_from_checkpoint=True)
    assert files(tmp_path / "out") == before
    # the same kind resumes (a finished run: to nothing)
    assert trainer(tmp_path, tokenizer, peft_config=writer_peft, **settings).train(True).global_step == 2


def test_checkpoint_kind_reads_the_weight_files(tmp_path):
    for name, files_there, kind in [
        ("full", ["model.safetensors"], "full"),
        ("sharded", ["model.safetensors.index.json"], "full"),
        ("adapter", ["adapter_model.safetensors", "adapter_config.json"], "adapter"),
        ("engine only", ["global_step4/state.pt"], None),
    ]:
        folder = tmp_path / name
        for file in files_there:
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_bytes(b"")
        found = checkpoint_kind(str(folder))
        assert (found and found[0]) == kind, name
