"""TRL 1.16's `DPOTrainer` / `DPOConfig` surface: a TRL script or notebook runs with only its import changed.

TRL itself is the oracle where it can run the same code: the TRL-style script and notebook below run
under `trl` and under `dpo_trainer`, and the signature and config defaults are compared with TRL's.
"""

import dataclasses
import inspect
import json
import math
import runpy
import sys

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM

import dpo_trainer
from dpo_trainer import DPOConfig, DPOTrainer

from conftest import dpo_config, preference_rows

# TrainingArguments defaults TRL changes and we keep (README, "Differences from TRL"): float32 training
# without recomputation unless asked.


def default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as handle:
        for row in preference_rows(24, seed=5):
            handle.write(json.dumps(row) + "\n")
    return str(path)


# ---------------------------------------------------------------- signature and config


def test_init_signature_is_trls_in_order():
    ours = list(inspect.signature(DPOTrainer.__init__).parameters)
    theirs = list(inspect.signature(trl.DPOTrainer.__init__).parameters)
    assert ours == theirs


def test_every_trl_config_field_is_accepted_with_trls_default():
    ours = {field.name: field for field in dataclasses.fields(DPOConfig)}
    for field in dataclasses.fields(trl.DPOConfig):
        assert field.name in ours, f"DPOConfig lacks TRL's field {field.name!r}"
        assert default(ours[field.name]) == default(field), field.name


def test_trl_defaults_after_construction(tmp_path):
    ours = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    theirs = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for name in (
        "max_length",
        "truncation_mode",
        "logging_steps",
        "pad_to_multiple_of",
        "learning_rate",
        "beta",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.max_prompt_length is None


def test_a_short_max_length_alone_is_valid(tmp_path):
    # TRL has no max_prompt_length; ours validates it only when it is set
    assert DPOConfig(output_dir=str(tmp_path), max_length=128).max_length == 128
    with pytest.raises(ValueError, match="max_prompt_length"):
        DPOConfig(output_dir=str(tmp_path), max_length=128, max_prompt_length=128)


def test_command_line_strings_are_parsed(tmp_path):
    args = DPOConfig(
        output_dir=str(tmp_path), model_init_kwargs='{"dtype": "bfloat16"}', pad_to_multiple_of="8"
    )
    assert args.model_init_kwargs == {"dtype": "bfloat16"} and args.pad_to_multiple_of == 8
    assert DPOConfig(output_dir=str(tmp_path), pad_to_multiple_of="none").pad_to_multiple_of is None
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        DPOConfig(output_dir=str(tmp_path), pad_to_multiple_of="eight")


def test_positional_arguments_in_trls_order(tmp_path, make_model, tokenizer, pairs):
    args = dpo_config(tmp_path)
    trainer = DPOTrainer(make_model(), None, args, None, pairs, pairs[:4], tokenizer)
    assert (
        trainer.args is args and len(trainer.train_dataset) == len(pairs) and len(trainer.eval_dataset) == 4
    )
    assert trainer.processing_class is tokenizer


def test_train_dataset_is_required(tmp_path, make_model, tokenizer, pairs):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        DPOTrainer(make_model(), args=dpo_config(tmp_path), eval_dataset=pairs, processing_class=tokenizer)


@pytest.mark.parametrize("column", ["image", "images"])
def test_an_image_column_is_refused_for_a_text_model(tmp_path, make_model, tokenizer, pairs, column):
    rows = [{**row, column: "picture.png"} for row in pairs]
    with pytest.raises(ValueError, match=f"'{column}' column"):
        DPOTrainer(make_model(), args=dpo_config(tmp_path), train_dataset=rows, processing_class=tokenizer)


def test_pad_token_field(tmp_path, make_model, tokenizer, pairs):
    import copy

    tok = copy.deepcopy(tokenizer)
    args = dpo_config(tmp_path, pad_token=tok.bos_token, layout="padded")
    trainer = DPOTrainer(make_model(), args=args, train_dataset=pairs, processing_class=tok)
    assert trainer.pad_token_id == tokenizer.bos_token_id != tokenizer.pad_token_id
    assert tok.pad_token_id == tokenizer.pad_token_id  # the tokenizer itself is left as given
    rows = sorted(trainer.train_dataset, key=lambda row: len(row["prompt_ids"]) + len(row["response_ids"][0]))
    batch = trainer.data_collator([rows[0], rows[-1]])
    shortest = batch["input_ids"][0, batch["attention_mask"][0] == 0]
    assert len(shortest) > 0 and set(shortest.tolist()) == {tokenizer.bos_token_id}
    with pytest.raises(ValueError, match="pad_token"):
        DPOTrainer(
            make_model(),
            args=dpo_config(tmp_path, pad_token="<not-a-token>"),
            train_dataset=pairs,
            processing_class=copy.deepcopy(tokenizer),
        )


# ---------------------------------------------------------------- loading like TRL


def test_a_model_by_path_loads_in_float32_unless_told(tmp_path, make_model, tokenizer, pairs):
    path = tmp_path / "bf16-model"
    make_model().to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16  # transformers' own default

    def dtype(**overrides):
        trainer = DPOTrainer(str(path), args=dpo_config(tmp_path, **overrides), train_dataset=pairs[:4])
        return {p.dtype for p in trainer.model.parameters()}

    assert dtype() == {torch.float32}
    assert dtype(model_init_kwargs={"dtype": "auto"}) == {torch.bfloat16}
    assert dtype(model_init_kwargs={"dtype": "bfloat16"}) == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        dtype(model_init_kwargs={"dtype": "float8"})


def test_tokenizer_loaded_from_the_models_name_or_path(tmp_path, model_dir, tokenizer, pairs):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = DPOTrainer(model, args=dpo_config(tmp_path), train_dataset=pairs)
    loaded = trainer.processing_class
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.eos_token == tokenizer.eos_token
    expected = tokenizer(pairs[0]["prompt"])["input_ids"]
    assert trainer.train_dataset[0]["prompt_ids"] == expected


def test_no_tokenizer_to_load_is_a_clear_error(tmp_path, make_model, pairs):
    with pytest.raises(ValueError, match="processing_class"):
        DPOTrainer(make_model(), args=dpo_config(tmp_path), train_dataset=pairs)  # built from a config
    weights_only = tmp_path / "weights-only"
    make_model().save_pretrained(weights_only)
    model = AutoModelForCausalLM.from_pretrained(weights_only)
    with pytest.raises(ValueError, match="weights-only"):
        DPOTrainer(model, args=dpo_config(tmp_path), train_dataset=pairs)


def test_model_tags_on_the_model_and_in_the_card(tmp_path, make_model, tokenizer, pairs):
    trainer = DPOTrainer(
        make_model(), args=dpo_config(tmp_path), train_dataset=pairs, processing_class=tokenizer
    )
    assert {"dpo", "dpo_trainer"} <= set(trainer.model.model_tags)
    trainer.save_model()
    card = open(f"{trainer.args.output_dir}/README.md").read()
    assert "tags: [dpo_trainer, dpo]" in card


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_compute_metrics_gets_trls_logits_and_labels(tmp_path, make_model, tokenizer, pairs, layout):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"seen_rows": float(prediction.label_ids.shape[0])}

    model = make_model()
    args = dpo_config(tmp_path, layout=layout, per_device_eval_batch_size=3)
    rows = pairs[:5]
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=pairs,
        eval_dataset=rows,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_seen_rows"] == 10 and metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    (prediction,) = seen
    logits, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    assert logits.shape[:2] == labels.shape and logits.shape[2] == model.config.vocab_size
    # TRL's rows: the chosen rows, then the rejected rows (here over batches of 3 and 2 pairs, none lost)
    tokenized = list(trainer.eval_dataset)
    order = [(b, k) for k in (0, 1) for b in range(len(rows))]
    for row, (b, k) in enumerate(order):
        ids = tokenized[b]["prompt_ids"] + tokenized[b]["response_ids"][k]
        assert labels[row, : len(ids)].tolist() == ids
        with torch.no_grad():  # the oracle: the model's own logits on this row alone
            expected = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[row, : len(ids)].float(), expected, atol=1e-4, rtol=1e-4)


def test_evaluate_tokenizes_what_it_is_given(tmp_path, make_model, tokenizer, pairs):
    held_out = preference_rows(6, seed=77)
    trainer = DPOTrainer(
        make_model(), args=dpo_config(tmp_path, max_steps=2), train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train()
    reference = DPOTrainer(
        trainer.model,
        ref_model=trainer.ref_model,
        args=dpo_config(tmp_path / "again"),
        train_dataset=pairs,
        eval_dataset=held_out,
        processing_class=tokenizer,
    ).evaluate()
    for given in (held_out, Dataset.from_list(held_out)):
        metrics = trainer.evaluate(eval_dataset=given)
        assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-6)
        assert metrics["eval_rewards/margins"] == pytest.approx(reference["eval_rewards/margins"], abs=1e-6)
    split = trainer.evaluate(eval_dataset={"a": held_out[:3], "b": Dataset.from_list(held_out[3:])})
    assert {"eval_a_loss", "eval_b_loss", "eval_a_rewards/accuracies"} <= set(split)


def test_evaluate_raw_rows_with_precomputed_reference(tmp_path, make_model, tokenizer, pairs):
    args = dpo_config(tmp_path, precompute_ref_log_probs=True, max_steps=1)
    trainer = DPOTrainer(make_model(), args=args, train_dataset=pairs, processing_class=tokenizer)
    # before training the policy is its own reference: every pair's loss is ln 2
    assert trainer.evaluate(eval_dataset=pairs[:5])["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    trainer.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(eval_dataset=pairs[:5])


# ---------------------------------------------------------------- activation offloading


def test_activation_offloading_keeps_the_step_and_saves_on_cpu(
    tmp_path, make_model, tokenizer, pairs, monkeypatch
):
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def recording(*args, **kwargs):
        entered.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording)

    def run(offload: bool):
        args = dpo_config(tmp_path / str(offload), max_steps=2, activation_offloading=offload)
        trainer = DPOTrainer(make_model(seed=2), args=args, train_dataset=pairs, processing_class=tokenizer)
        trainer.train()
        return trainer

    plain, offloaded = run(False), run(True)
    assert len(entered) == 2  # one per training step, only when asked
    for a, b in zip(plain.model.parameters(), offloaded.model.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- TRL's documented examples, import changed

TRL_SCRIPT = """\
import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
{import_line}

model_path, data_file, output_dir = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_path)
tokenizer = AutoTokenizer.from_pretrained(model_path)
train_dataset = load_dataset("json", data_files=data_file, split="train")

training_args = DPOConfig(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none",
    use_cpu=True,
)
trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
trainer.train()
trainer.save_model(output_dir)
"""

NOTEBOOK_CELLS = [
    """
from datasets import load_dataset
from peft import LoraConfig
{import_line}
""",
    """
dataset = load_dataset("json", data_files=DATA_FILE, split="train")
dataset = dataset.train_test_split(test_size=0.25, seed=0)
""",
    """
training_args = DPOConfig(output_dir=OUTPUT_DIR, max_steps=2, learning_rate=1e-3, per_device_train_batch_size=4,
                          per_device_eval_batch_size=4, max_length=128, report_to="none", use_cpu=True)
peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
trainer = DPOTrainer(
    model=MODEL_PATH,
    args=training_args,
    train_dataset=dataset["train"],
    eval_dataset=dataset["test"],
    peft_config=peft_config,
)
""",
    "before = trainer.evaluate()",
    "trainer.train()",
    "after = trainer.evaluate()\ntrainer.save_model()",
]

IMPORTS = {
    "trl": "from trl import DPOConfig, DPOTrainer",
    "dpo_trainer": "from dpo_trainer import DPOConfig, DPOTrainer",
}


def conversational_file(path) -> str:
    with open(path, "w") as handle:
        for row in preference_rows(16, seed=9):
            handle.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": row["prompt"]}],
                        "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}],
                    }
                )
                + "\n"
            )
    return str(path)


@pytest.mark.parametrize("library", ["trl", "dpo_trainer"])
def test_trl_style_script_runs_with_the_import_changed(tmp_path, model_dir, data_file, library, monkeypatch):
    script = tmp_path / "train_dpo.py"
    script.write_text(TRL_SCRIPT.format(import_line=IMPORTS[library]))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(script), model_dir, data_file, str(out)])
    namespace = runpy.run_path(str(script), run_name="__main__")
    trainer = namespace["trainer"]
    assert type(trainer).__module__.split(".")[0] == library
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert (out / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    moved = any(not torch.equal(a, b) for a, b in zip(reloaded.parameters(), before.parameters()))
    assert moved


@pytest.mark.parametrize("library", ["trl", "dpo_trainer"])
def test_trl_style_notebook_runs_with_the_import_changed(tmp_path, model_dir, library):
    namespace = {
        "MODEL_PATH": model_dir,
        "DATA_FILE": conversational_file(tmp_path / "chat.jsonl"),
        "OUTPUT_DIR": str(tmp_path / "notebook-out"),
    }
    for cell in NOTEBOOK_CELLS:
        exec(cell.format(import_line=IMPORTS[library]), namespace)
    trainer, before, after = namespace["trainer"], namespace["before"], namespace["after"]
    assert type(trainer).__module__.split(".")[0] == library
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # a fresh adapter is the identity
    assert before["eval_rewards/accuracies"] == 0.0 and after["eval_loss"] != before["eval_loss"]
    assert (tmp_path / "notebook-out" / "adapter_model.safetensors").exists()
    assert dpo_trainer.__version__  # the package under test is importable alongside TRL


def test_trust_remote_code_reaches_model_and_tokenizer(tmp_path, model_dir, pairs, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    DPOTrainer(model_dir, args=dpo_config(tmp_path, trust_remote_code=True), train_dataset=pairs[:4])
    assert ("AutoModelForCausalLM", True) in seen and ("AutoTokenizer", True) in seen


def test_precompute_ref_batch_size_sets_the_batches_not_the_values(
    tmp_path, make_model, tokenizer, pairs, monkeypatch
):
    import dpo_trainer.reference.precompute as precompute_module

    totals = []
    real = precompute_module.compute_dataset_reference_logps

    def spy(batches, score, *, total, **kwargs):
        totals.append(total)
        return real(batches, score, total=total, **kwargs)

    monkeypatch.setattr(precompute_module, "compute_dataset_reference_logps", spy)

    def column(**overrides):
        args = dpo_config(tmp_path / str(overrides), precompute_ref_log_probs=True, **overrides)
        trainer = DPOTrainer(make_model(), args=args, train_dataset=pairs, processing_class=tokenizer)
        return torch.tensor(trainer.train_dataset["ref_logps"])

    default_values = column()
    batched = column(precompute_ref_batch_size=3)
    assert totals == [4, 6]  # 16 rows: batches of per_device_eval_batch_size=4, then of 3
    torch.testing.assert_close(batched, default_values, atol=1e-5, rtol=1e-5)


def test_without_args_the_output_folder_is_named_as_trls(tmp_path, model_dir, pairs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = DPOTrainer(model_dir, train_dataset=pairs[:4])
    assert trainer.args.output_dir.endswith("tiny-model-DPO")


def test_rows_tokenized_by_trl_are_taken_as_they_are(tmp_path, make_model, tokenizer, pairs):
    theirs = trl.DPOTrainer(
        make_model(),
        ref_model=make_model(),  # TRL would reload the reference from the model's (here empty) path
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none"),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    ).train_dataset
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(theirs.column_names)
    ours = DPOTrainer(
        make_model(), args=dpo_config(tmp_path), train_dataset=theirs, processing_class=tokenizer
    )
    streamed = DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path / "stream"),
        train_dataset=theirs.to_iterable_dataset(),
        processing_class=tokenizer,
    )
    for row, mine, read in zip(theirs, ours.train_dataset, streamed.train_dataset, strict=True):
        assert mine["prompt_ids"] == read["prompt_ids"] == row["prompt_ids"]
        assert mine["response_ids"] == read["response_ids"] == [row["chosen_ids"], row["rejected_ids"]]
    short = DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path, max_length=12),
        train_dataset=theirs,
        processing_class=tokenizer,
    )
    assert all(len(r["prompt_ids"]) + max(map(len, r["response_ids"])) <= 12 for r in short.train_dataset)


def test_default_truncation_cuts_as_trl_does(tmp_path, make_model, tokenizer):
    # keep_start at a max_length shorter than most rows: TRL cuts each sequence in its collator, drops rows
    # whose prompt alone fills max_length; the padded batches must hold the same token ids.
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpo_trainer.data import PaddedCollator

    rows = preference_rows(12, seed=8)
    rows[2]["prompt"] = "Tell me about the garden and the river and the lamp:" * 3  # longer than max_length
    theirs = trl.DPOTrainer(
        make_model(),
        ref_model=make_model(),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none", max_length=14
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train_dataset
    ours = DPOTrainer(
        make_model(), args=dpo_config(tmp_path, max_length=14), train_dataset=rows, processing_class=tokenizer
    ).train_dataset
    assert len(ours) == len(theirs) == len(rows) - 1
    pad = tokenizer.pad_token_id
    expected = DataCollatorForPreference(pad_token_id=pad, max_length=14)(list(theirs))
    got = PaddedCollator(pad)(list(ours))
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert got["attention_mask"].tolist() == expected["attention_mask"].tolist()
