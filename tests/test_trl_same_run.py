"""Change the import, get the same run: what a TRL 1.16 user relies on without saying it, checked against TRL.

* A `PeftModel` that already carries a trained adapter (LoRA SFT, then DPO) is its own reference through a
  frozen copy of that adapter, as TRL's "ref" adapter: live, precomputed, saved with checkpoints, restored on
  resume, described so in the model card; `peft_reference="base"` asks for the base model instead.
* `DPOConfig()`'s defaults are TRL's (bf16 unless fp16, gradient checkpointing on), and a default run trains as
  TRL's default run; where TRL refuses to build its config (no bf16 and no `use_cpu`), ours falls back to float32.
* TRL's own `DPOConfig` (or a subclass, as scripts built on `TrlParser` pass) is accepted and trains alike.
"""

import copy
import dataclasses
import logging
import math

import pytest
import torch
import trl  # the oracle: a dev/test dependency (setup.cfg extras "dev")
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments

import dpo_trainer
from dpo_trainer.reference.sync import REFERENCE_ADAPTER
from dpo_trainer.testing import tiny_causal_lm

from conftest import dpo_config, preference_rows

ROWS = preference_rows(
    16, seed=0
)  # the prompt ends in ":" and responses start with a space: same ids in both
LN2 = math.log(2.0)
# the same optimizer, schedule and batches in both libraries; SGD so that a step moves the adapter measurably
COMMON = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    max_steps=3,
    learning_rate=0.5,
    optim="sgd",
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    logging_steps=1,
    beta=0.1,
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    save_strategy="no",
    seed=0,
)


@pytest.fixture(autouse=True)
def no_trl_telemetry(monkeypatch):
    monkeypatch.setattr("trl.trainer.base_trainer._BaseTrainer._send_telemetry", lambda self: None)


def sft_adapter(tokenizer, seed: int = 7):
    """A tiny Llama with a LoRA adapter whose weights are not its initialisation (B != 0), as after LoRA SFT."""
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft_model


def adapter_values(model, adapter: str) -> dict[str, torch.Tensor]:
    return {
        name.replace(f".{adapter}.", "."): param.detach().clone()
        for name, param in model.named_parameters()
        if adapter in name.split(".")
    }


def logged(trainer, key: str) -> list[float]:
    return [
        entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry
    ]


def trl_run(tmp_path, model, tokenizer, **overrides):
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        **{**COMMON, **overrides},
    )
    return trl.DPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        eval_dataset=Dataset.from_list(ROWS),
        processing_class=copy.deepcopy(tokenizer),
    )


def our_run(tmp_path, model, tokenizer, **overrides):
    args = dpo_trainer.DPOConfig(
        output_dir=str(tmp_path / "ours"),
        bf16=False,
        gradient_checkpointing=False,
        ref_logps_cache_dir=str(tmp_path / "cache"),
        **{**COMMON, **overrides},
    )
    return dpo_trainer.DPOTrainer(
        model, args=args, train_dataset=ROWS, eval_dataset=ROWS, processing_class=tokenizer
    )


# ---------------------------------------------------------------- a trained adapter is the reference


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_a_given_adapter_is_its_own_reference_as_in_trl(tmp_path, tokenizer, precompute):
    extra = {"precompute_ref_log_probs": precompute}
    theirs = trl_run(tmp_path, sft_adapter(tokenizer), tokenizer, **extra)
    ours = our_run(tmp_path, sft_adapter(tokenizer), tokenizer, **extra)
    before = {"trl": theirs.evaluate(), "ours": ours.evaluate()}
    for name, metrics in before.items():  # π = π_ref at the start: every margin 0, the loss ln 2
        assert metrics["eval_loss"] == pytest.approx(LN2, abs=1e-6), name
        assert metrics["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6), name
    theirs.train()
    ours.train()
    assert logged(ours, "loss")[0] == pytest.approx(LN2, abs=1e-6)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert logged(ours, key) == pytest.approx(logged(theirs, key), rel=1e-4, abs=1e-5), key
    # the reference adapter is frozen: it still holds the SFT adapter's values
    given = adapter_values(sft_adapter(tokenizer), "default")
    reference = adapter_values(ours.model, REFERENCE_ADAPTER)
    assert given.keys() == reference.keys()
    assert all(torch.equal(given[name], reference[name]) for name in given)
    assert not torch.equal(
        adapter_values(ours.model, "default")[next(iter(given))], next(iter(given.values()))
    )


def test_the_base_model_as_reference_is_asked_for_by_name(tmp_path, tokenizer):
    ours = our_run(tmp_path / "base", sft_adapter(tokenizer), tokenizer, peft_reference="base")
    assert REFERENCE_ADAPTER not in ours.model.peft_config
    # the same numbers as with the adapter-free base model (sft_adapter's base weights) given as ref_model
    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    explicit = dpo_trainer.DPOTrainer(
        sft_adapter(tokenizer),
        ref_model=base,
        args=ours.args,
        train_dataset=ROWS,
        eval_dataset=ROWS,
        processing_class=tokenizer,
    )
    loss = ours.evaluate()["eval_loss"]
    assert abs(loss - LN2) > 1e-3  # the adapter moved the policy away from the base model
    assert loss == pytest.approx(explicit.evaluate()["eval_loss"], abs=1e-6)


def test_the_reference_adapter_is_saved_and_restored_on_resume(tmp_path, tokenizer):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, save_only_model=False)
    whole = our_run(tmp_path / "whole", sft_adapter(tokenizer), tokenizer, **settings)
    whole.train()
    saved = load_file(
        tmp_path / "whole" / "ours" / "checkpoint-2" / REFERENCE_ADAPTER / "adapter_model.safetensors"
    )
    given = adapter_values(sft_adapter(tokenizer), "default")
    assert len(saved) == len(given)
    assert sorted(torch.cat([t.flatten() for t in saved.values()]).tolist()) == pytest.approx(
        sorted(torch.cat([t.flatten() for t in given.values()]).tolist())
    )
    # a resumed run built from another adapter gets the checkpoint's reference back, and ends as the whole run
    import shutil

    shutil.copytree(tmp_path / "whole" / "ours", tmp_path / "resumed" / "ours")
    shutil.rmtree(tmp_path / "resumed" / "ours" / "checkpoint-4")
    resumed = our_run(tmp_path / "resumed", sft_adapter(tokenizer, seed=99), tokenizer, **settings)
    resumed.train(resume_from_checkpoint=True)
    reference = adapter_values(resumed.model, REFERENCE_ADAPTER)
    assert all(torch.equal(reference[name], given[name]) for name in given)
    assert logged(resumed, "loss")[-1] == pytest.approx(logged(whole, "loss")[-1], rel=1e-5)


def test_the_model_card_says_what_the_reference_is(tmp_path, tokenizer, make_model):
    ours = our_run(tmp_path, sft_adapter(tokenizer), tokenizer, max_steps=1)
    ours.train()
    ours.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "a frozen copy of the given adapter" in card
    given_ref = dpo_trainer.DPOTrainer(
        make_model(seed=1),
        ref_model=make_model(seed=2),
        args=dpo_config(tmp_path / "ref", max_steps=1),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    given_ref.train()
    given_ref.save_model(str(tmp_path / "final-ref"))
    card = (tmp_path / "final-ref" / "README.md").read_text()
    assert "the model given as `ref_model`" in card and "a frozen copy" not in card


# ---------------------------------------------------------------- TRL's defaults


def test_the_defaults_are_trls_after_construction(tmp_path):
    ours = dpo_trainer.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    theirs = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    mine, trls = ours.to_dict(), theirs.to_dict()
    different = {key: (mine[key], trls[key]) for key in trls if mine.get(key) != trls[key]}
    assert different == {}
    assert ours.bf16 and not ours.fp16 and ours.mixed_precision == "bf16"
    assert ours.gradient_checkpointing and ours.activation_checkpointing
    fp16 = dpo_trainer.DPOConfig(output_dir=str(tmp_path), use_cpu=True, fp16=True)
    assert not fp16.bf16  # bf16 defaults to on only without fp16, as TRL's


def test_without_bf16_and_use_cpu_the_default_falls_back_to_float32_and_says_so(
    tmp_path, monkeypatch, caplog, tokenizer, make_model
):
    # a machine without a bf16 device (injected, so that the test means the same on a GPU machine)
    monkeypatch.setattr("transformers.utils.is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr("transformers.utils.is_torch_xla_available", lambda: False)
    monkeypatch.setattr("transformers.training_args.is_torch_xla_available", lambda: False)
    with pytest.raises(ValueError, match="doesn't support bf16"):
        trl.DPOConfig(output_dir=str(tmp_path))  # TRL refuses to be built
    ours = dpo_trainer.DPOConfig(output_dir=str(tmp_path), report_to="none")
    assert ours.bf16 is False and ours.mixed_precision == "no"
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.trainer"):  # said by the trainer that uses it
        trainer = dpo_trainer.DPOTrainer(
            make_model(), args=ours, train_dataset=ROWS, processing_class=tokenizer
        )
    assert "no bf16 support" in caplog.text and "float32" in caplog.text
    assert trainer.accelerator.mixed_precision == "no"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.trainer"):  # float32 asked for: nothing to say
        dpo_trainer.DPOTrainer(
            make_model(),
            args=dpo_trainer.DPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none"),
            train_dataset=ROWS,
            processing_class=tokenizer,
        )
    assert "no bf16 support" not in caplog.text
    with pytest.raises(ValueError, match="doesn't support bf16"):  # asked for explicitly: transformers' error
        dpo_trainer.DPOConfig(output_dir=str(tmp_path), bf16=True)


def test_a_default_run_trains_as_trls_default_run(tmp_path, tokenizer):
    """bf16 autocast and activation checkpointing on, in both libraries, on the same model and rows."""
    defaults = dict(COMMON)
    path = str(tmp_path / "base")  # by path: TRL reloads its reference from the policy's path
    tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    theirs = trl.DPOTrainer(
        path,
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), max_length=None, **defaults),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=copy.deepcopy(tokenizer),
    )
    ours = dpo_trainer.DPOTrainer(
        path,
        args=dpo_trainer.DPOConfig(output_dir=str(tmp_path / "ours"), **defaults),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    for trainer in (theirs, ours):
        assert trainer.accelerator.mixed_precision == "bf16"
    theirs.train()
    ours.train()
    for trainer in (theirs, ours):
        assert trainer.model.is_activation_checkpointing
    assert logged(ours, "loss")[0] == pytest.approx(LN2, abs=1e-6)  # π = π_ref at step 0, bf16 or not
    # later steps: both in bf16 autocast, which rounds the two libraries' logits alike but not identically
    assert logged(ours, "loss") == pytest.approx(logged(theirs, "loss"), rel=2e-3)
    assert logged(ours, "rewards/margins") == pytest.approx(
        logged(theirs, "rewards/margins"), rel=5e-2, abs=2e-3
    )


# ---------------------------------------------------------------- TRL's config object


class ScriptConfig(trl.DPOConfig):
    """A script's own config built on TRL's, as alignment-handbook's recipes and `TrlParser` scripts use."""

    __annotations__ = {"hub_model_revision": str, "chat_template": str}
    hub_model_revision: str = "main"
    chat_template: str = ""


ScriptConfig = dataclasses.dataclass(ScriptConfig)


def test_trls_config_is_accepted_and_trains_exactly_as_ours(tmp_path, tokenizer, make_model, caplog):
    settings = dict(
        {**COMMON, "learning_rate": 1e-2},
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.5],
        ref_model_sync_steps=7,
    )
    runs = {}
    for name, config in (
        ("ours", dpo_trainer.DPOConfig(output_dir=str(tmp_path / "ours"), **settings)),
        ("trl", trl.DPOConfig(output_dir=str(tmp_path / "trl"), **settings)),
        ("script", ScriptConfig(output_dir=str(tmp_path / "script"), chat_template="{{ x }}", **settings)),
    ):
        with caplog.at_level(logging.WARNING, logger="dpo_trainer.trl_config"):
            trainer = dpo_trainer.DPOTrainer(
                make_model(seed=4), args=config, train_dataset=ROWS, processing_class=tokenizer
            )
        assert isinstance(trainer.args, dpo_trainer.DPOConfig)
        trainer.train()
        runs[name] = trainer
    assert "chat_template='{{ x }}'" in caplog.text and "hub_model_revision" not in caplog.text
    for name in ("trl", "script"):
        assert runs[name].args.loss_weights == [1.0, 0.5] and runs[name].args.ref_model_sync_steps == 7
        assert logged(runs[name], "loss") == logged(runs["ours"], "loss"), name


def test_other_args_are_refused_naming_both_modules(tmp_path, tokenizer, make_model):
    with pytest.raises(
        TypeError, match=r"dpo_trainer\.config\.DPOConfig.*transformers\.training_args\.TrainingArguments"
    ):
        dpo_trainer.DPOTrainer(
            make_model(),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
            train_dataset=ROWS,
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------- TRL's words in our refusals


def both(tmp_path, tokenizer, make_model, **kwargs):
    """Build TRL's trainer and ours from the same arguments; yield each library's construction."""
    config = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", max_steps=2)
    config.update(kwargs.pop("config", {}))
    yield lambda: trl.DPOTrainer(
        make_model(), args=trl.DPOConfig(**config), processing_class=copy.deepcopy(tokenizer), **kwargs
    )
    yield lambda: dpo_trainer.DPOTrainer(
        make_model(), args=dpo_trainer.DPOConfig(**config), processing_class=tokenizer, **kwargs
    )


@pytest.mark.parametrize(
    "case, words",
    [
        ("no train_dataset", "`train_dataset` is required"),
        ("streamed with precompute", "precompute_ref_log_probs.*not supported with IterableDataset"),
        ("image column", "vision-related.*vision-language model"),
    ],
)
def test_a_refusal_trl_shares_carries_trls_words(tmp_path, tokenizer, make_model, case, words):
    from datasets import IterableDataset

    rows = Dataset.from_list(ROWS)
    kwargs = {
        "no train_dataset": {"train_dataset": None},
        "streamed with precompute": {
            "train_dataset": IterableDataset.from_generator(lambda: iter(ROWS)),
            "config": {"precompute_ref_log_probs": True},
        },
        "image column": {"train_dataset": rows.add_column("images", [[None]] * len(rows))},
    }[case]
    for build in both(tmp_path, tokenizer, make_model, **kwargs):
        with pytest.raises(ValueError, match=words):
            build()


def test_evaluating_new_data_after_training_without_a_reference_carries_trls_words(
    tmp_path, tokenizer, make_model
):
    trainer = dpo_trainer.DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path, max_steps=1, precompute_ref_log_probs=True),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    trainer.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(ROWS[:4])
