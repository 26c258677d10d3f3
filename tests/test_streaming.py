"""Streamed `datasets.IterableDataset`s for training and evaluation: tokenized on the fly, as map-style data."""

import json

import pytest
import torch
from datasets import Dataset, IterableDataset, load_dataset

from dpo_trainer import DPOTrainer

from conftest import dpo_config, preference_rows


def streamed(rows):
    return Dataset.from_list(rows).to_iterable_dataset()


def test_a_streamed_step_equals_the_map_style_step(tmp_path, make_model, tokenizer, pairs):
    # one SGD step over all 16 rows: the same batch either way (in another order), so the same update
    def run(train, name):
        args = dpo_config(
            tmp_path / name, max_steps=1, per_device_train_batch_size=len(pairs), layout="padded", optim="sgd"
        )
        trainer = DPOTrainer(make_model(seed=4), args=args, train_dataset=train, processing_class=tokenizer)
        trainer.train()
        return trainer

    mapped, stream = run(pairs, "map"), run(streamed(pairs), "stream")
    assert isinstance(stream.train_dataset, IterableDataset)
    assert stream.state.global_step == 1
    for a, b in zip(mapped.model.parameters(), stream.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    moved = any(
        not torch.equal(a, b) for a, b in zip(stream.model.parameters(), make_model(seed=4).parameters())
    )
    assert moved


def test_streamed_evaluation_equals_map_style(tmp_path, make_model, tokenizer, pairs):
    held_out = preference_rows(7, seed=31)
    trainer = DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path, max_steps=2),
        train_dataset=streamed(pairs),
        eval_dataset={"map": held_out, "stream": streamed(held_out)},
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metrics[f"eval_stream_{name}"] == pytest.approx(metrics[f"eval_map_{name}"], abs=1e-5), name
    given = trainer.evaluate(eval_dataset=streamed(held_out))
    assert given["eval_loss"] == pytest.approx(metrics["eval_map_loss"], abs=1e-5)


def test_a_local_file_streamed_through_load_dataset(tmp_path, make_model, tokenizer, pairs):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    train = load_dataset("json", data_files=str(path), split="train", streaming=True)
    args = dpo_config(tmp_path, max_steps=2)
    trainer = DPOTrainer(make_model(), args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert trainer.args.accelerator_config.dispatch_batches is False  # as TRL, for batches of any shape


def test_rows_are_tokenized_as_they_are_read(tmp_path, make_model, tokenizer, pairs):
    read = []

    def rows():
        for index, row in enumerate(pairs):
            read.append(index)
            yield row

    train = IterableDataset.from_generator(rows)
    args = dpo_config(tmp_path, max_steps=1, per_device_train_batch_size=2)
    trainer = DPOTrainer(make_model(), args=args, train_dataset=train, processing_class=tokenizer)
    assert len(read) < len(pairs)  # building the trainer read the first row(s), not the data set
    first = next(iter(trainer.train_dataset))
    assert first["prompt_ids"] == tokenizer(pairs[0]["prompt"])["input_ids"]
    assert first["response_ids"][0][-1] == tokenizer.eos_token_id


def test_a_bad_row_deep_in_the_stream_names_its_index(tmp_path, make_model, tokenizer, pairs):
    rows = [dict(row) for row in pairs]
    rows[9]["chosen"] = None
    trainer = DPOTrainer(
        make_model(), args=dpo_config(tmp_path), train_dataset=streamed(rows), processing_class=tokenizer
    )
    with pytest.raises(ValueError, match="row 9"):
        list(trainer.train_dataset)


def test_rows_truncated_away_are_skipped_as_they_stream(tmp_path, make_model, tokenizer, pairs, caplog):
    rows = [dict(row) for row in pairs]
    rows[3]["prompt"] = "Tell me about the garden:" * 20
    args = dpo_config(tmp_path, max_length=24)
    with caplog.at_level("WARNING"):
        trainer = DPOTrainer(
            make_model(), args=args, train_dataset=streamed(rows), processing_class=tokenizer
        )
        kept = list(trainer.train_dataset)
    mapped = DPOTrainer(make_model(), args=args, train_dataset=rows, processing_class=tokenizer)
    assert [row["prompt_ids"] for row in kept] == mapped.train_dataset["prompt_ids"]  # the same 15 rows
    assert len(kept) == len(rows) - 1 and "skipping streamed rows" in caplog.text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(max_steps=-1), "max_steps"),
        (dict(precompute_ref_log_probs=True), "precompute_ref_log_probs"),
        (dict(max_tokens_per_batch=256), "max_tokens_per_batch"),
    ],
)
def test_what_cannot_stream_is_refused_early(tmp_path, make_model, tokenizer, pairs, overrides, message):
    args = dpo_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        DPOTrainer(make_model(), args=args, train_dataset=streamed(pairs), processing_class=tokenizer)


def test_a_streamed_eval_set_cannot_be_precomputed(tmp_path, make_model, tokenizer, pairs):
    args = dpo_config(tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=r"eval_dataset\['b'\]"):
        DPOTrainer(
            make_model(),
            args=args,
            train_dataset=pairs,
            eval_dataset={"a": pairs, "b": streamed(pairs)},
            processing_class=tokenizer,
        )


@pytest.mark.slow
def test_two_processes_stream_the_same_global_batches_as_one(tmp_path):
    import runpy
    import subprocess

    from conftest import TESTS, TORCHRUN_TWO_PROCESSES, dist_env

    script = str(TESTS / "dist_scripts" / "stream_dpo.py")
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    runpy.run_path(script)["main"](str(tmp_path / "one"), 8)  # one process, here
    command = [*TORCHRUN_TWO_PROCESSES, script, str(tmp_path / "two"), "4"]
    done = subprocess.run(command, env=dist_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = {name: torch.load(tmp_path / name / "result.pt") for name in ("one", "two")}
    one, two = results["one"], results["two"]
    # each process reads its own share of every global batch of 8 streamed rows: the same SGD steps
    assert len(one["losses"]) == len(two["losses"]) == 2
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert one["losses"][1] != pytest.approx(one["losses"][0], abs=1e-4)  # the first step changed the model
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, atol=1e-5, rtol=1e-4)
