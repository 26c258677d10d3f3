"""`dpo-trainer` data-set mixtures: TRL 1.16's `datasets:` list (`DatasetMixtureConfig`) in the YAML file."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from dpo_trainer.cli import DatasetConfig, ScriptArguments, load_data, load_mixture, parse_args, run

from conftest import preference_rows

COMMON = ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no"]


def write_rows(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    """Two preference files with the same pair columns and one extra column each, of different names."""
    first = [{**row, "source": "a"} for row in preference_rows(12, seed=11)]
    second = [{**row, "score": i} for i, row in enumerate(preference_rows(8, seed=12))]
    return (
        write_rows(tmp_path / "first.jsonl", first),
        write_rows(tmp_path / "second.jsonl", second),
        first,
        second,
    )


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "dpo.yaml"
    path.write_text(text)
    return str(path)


PAIR_COLUMNS = "[prompt, chosen, rejected]"


def mixture_yaml(first, second, extra="", first_keys="", second_keys=""):
    return (
        "datasets:\n"
        f"  - path: {first}\n"
        f"    columns: {PAIR_COLUMNS}\n{first_keys}"
        f"  - path: {second}\n"
        f"    columns: {PAIR_COLUMNS}\n{second_keys}{extra}"
    )


def script_from_yaml(tmp_path, text: str) -> ScriptArguments:
    config = write_yaml(tmp_path, "model_name_or_path: m\n" + text)
    script, _, _ = parse_args(["--config", config, "--output_dir", str(tmp_path / "out")])
    return script


def test_the_mixture_flags_are_trls():
    from trl.scripts.dpo import make_parser as trl_parser
    from trl.scripts.utils import DatasetConfig as TRLDatasetConfig

    from dpo_trainer.cli import make_parser

    ours = {action.dest for action in make_parser()._actions}
    theirs = {action.dest for action in trl_parser()._actions}
    assert {"datasets", "streaming", "test_split_size"} <= ours and theirs <= ours
    fields = [(f.name, f.default) for f in dataclasses.fields(DatasetConfig)]
    assert fields == [(f.name, f.default) for f in dataclasses.fields(TRLDatasetConfig)]


def test_a_yaml_mixture_concatenates_the_selected_columns_in_order(tmp_path, two_files):
    first, second, first_rows, second_rows = two_files
    script = script_from_yaml(tmp_path, mixture_yaml(first, second))
    assert [entry.path for entry in script.datasets] == [first, second]
    assert (
        script.datasets[0].columns == ["prompt", "chosen", "rejected"] and script.datasets[0].split == "train"
    )
    data = load_data(script)
    assert list(data) == ["train"]
    train = data["train"]
    assert train.column_names == ["prompt", "chosen", "rejected"]
    keep = ("prompt", "chosen", "rejected")
    assert train.to_list() == [{k: row[k] for k in keep} for row in first_rows + second_rows]


def test_matches_trls_get_dataset(tmp_path, two_files):
    """TRL's own `get_dataset` on the same mixture (builder `json` with `data_files`, and `fraction`)."""
    from trl import DatasetMixtureConfig, get_dataset
    from trl.scripts.utils import DatasetConfig as TRLDatasetConfig

    first, second, _, _ = two_files
    for fractions in [(None, None), (0.5, 0.5), (3.0, 1.0)]:
        entries = [
            dict(path="json", data_files=path, columns=["prompt", "chosen", "rejected"], fraction=fraction)
            for path, fraction in zip((first, second), fractions)
        ]
        theirs = get_dataset(DatasetMixtureConfig(datasets=[TRLDatasetConfig(**e) for e in entries]))["train"]
        ours = load_mixture(ScriptArguments(datasets=entries))["train"]
        assert ours.to_list() == theirs.to_list(), fractions
    # 0.5 / 0.5 of 12 and 8 rows: 8 of each, none repeated; 3 / 1: 12 and 4
    assert (
        len(load_mixture(ScriptArguments(datasets=[dict(e, fraction=1.0) for e in entries]))["train"]) == 16
    )


def test_training_on_a_mixture_with_a_test_split(tmp_path, model_dir, two_files):
    first, second, first_rows, second_rows = two_files
    config = write_yaml(
        tmp_path,
        f"model_name_or_path: {model_dir}\n" + mixture_yaml(first, second, extra="test_split_size: 0.25\n"),
    )
    argv = ["--config", config, "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2"]
    trainer = run(*parse_args([*argv, "--learning_rate", "1e-3", *COMMON]))
    # 20 rows, 25% held out
    assert trainer.train_dataset.num_rows == 15 and trainer.eval_dataset.num_rows == 5
    assert trainer.state.global_step == 2 and any("eval_loss" in entry for entry in trainer.state.log_history)
    # every row of both files is in exactly one of the two splits
    data = load_data(script_from_yaml(tmp_path, mixture_yaml(first, second, extra="test_split_size: 0.25\n")))
    prompts = sorted(list(data["train"]["prompt"]) + list(data["test"]["prompt"]))
    assert prompts == sorted(row["prompt"] for row in first_rows + second_rows)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_dataset_name_is_ignored_beside_a_mixture_as_in_trl(tmp_path, two_files, caplog):
    first, second, first_rows, second_rows = two_files
    script = script_from_yaml(tmp_path, f"dataset_name: {first}\n" + mixture_yaml(first, second))
    with caplog.at_level(logging.WARNING, logger="dpo_trainer.cli"):
        data = load_data(script)
    assert data["train"].num_rows == len(first_rows) + len(second_rows)
    assert "dataset_name" in caplog.text and "ignored" in caplog.text


def test_entries_from_the_command_line_a_folder_split_and_a_slice(tmp_path, two_files):
    first, second, first_rows, second_rows = two_files
    folder = tmp_path / "folder"
    folder.mkdir()
    held_out = preference_rows(6, seed=13)
    write_rows(folder / "train.jsonl", preference_rows(10, seed=14))
    write_rows(folder / "test.jsonl", held_out)
    plain = [write_rows(tmp_path / f"plain{i}.jsonl", preference_rows(5, seed=20 + i)) for i in range(2)]
    script, _, _ = parse_args(
        ["--model_name_or_path", "m", "--datasets", *plain, "--output_dir", str(tmp_path)]
    )
    assert [entry.path for entry in script.datasets] == plain and script.dataset_name is None
    assert load_data(script)["train"].to_list() == preference_rows(5, seed=20) + preference_rows(5, seed=21)
    script = ScriptArguments(
        datasets=[
            {"path": str(folder), "split": "test"},
            {"path": first, "split": "train[:4]", "columns": ["prompt", "chosen", "rejected"]},
        ]
    )
    rows = load_data(script)["train"].to_list()
    assert rows == held_out + [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in first_rows[:4]]


def test_a_streamed_mixture_trains(tmp_path, model_dir, two_files):
    first, second, _, _ = two_files
    config = write_yaml(
        tmp_path,
        f"model_name_or_path: {model_dir}\n" + mixture_yaml(first, second, extra="streaming: true\n"),
    )
    argv = ["--config", config, "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    trainer = run(*parse_args([*argv, "--per_device_train_batch_size", "4", *COMMON]))
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(
    ("first_keys", "second_keys", "columns", "message"),
    [
        (
            "",
            "    split: test\n",
            True,
            r"datasets\[1\] \(.*second.jsonl\) has no split 'test' \(splits: train\)",
        ),
        (
            "",
            "",
            False,
            r"do not have the same columns: datasets\[0\] \(.*first.jsonl\) has .*source.*datasets\[1\]",
        ),
        (
            "    fraction: 0.5\n",
            "",
            True,
            r"`fraction` must be set on every .*datasets\[1\] \(.*second.jsonl\)",
        ),
        ("    revision: main\n", "", True, r"datasets\[0\] \(.*first.jsonl\): unknown keys revision"),
    ],
)
def test_clear_errors_name_the_entry(tmp_path, two_files, first_keys, second_keys, columns, message):
    first, second, _, _ = two_files
    text = mixture_yaml(first, second, first_keys=first_keys, second_keys=second_keys)
    if not columns:
        text = text.replace(f"    columns: {PAIR_COLUMNS}\n", "")
    with pytest.raises(SystemExit, match=message):
        load_data(script_from_yaml(tmp_path, text))


def test_a_missing_column_and_mismatched_types_are_clear_errors(tmp_path, two_files):
    first, second, _, _ = two_files
    missing = mixture_yaml(first, second).replace(PAIR_COLUMNS, "[prompt, chosen, answer]", 1)
    with pytest.raises(
        SystemExit, match=r"datasets\[0\] \(.*first.jsonl\) has no column 'answer' \(columns: "
    ):
        load_data(script_from_yaml(tmp_path, missing))
    third = write_rows(
        tmp_path / "third.jsonl", [{**row, "source": 3} for row in preference_rows(4, seed=15)]
    )
    script = ScriptArguments(datasets=[{"path": first}, {"path": third}])
    with pytest.raises(
        SystemExit, match=r"column 'source' holds .*string.* in datasets\[0\].*but .*int64.*datasets\[1\]"
    ):
        load_data(script)


def test_neither_dataset_name_nor_datasets_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--dataset_name .* or a `datasets:` list"):
        parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path)])
    with pytest.raises(
        SystemExit, match="eval_strategy is 'steps' but the `datasets` mixture has no split 'test'"
    ):
        first = write_rows(tmp_path / "a.jsonl", preference_rows(4, seed=1))
        run(
            *parse_args(
                ["--model_name_or_path", "m", "--datasets", first, "--output_dir", str(tmp_path / "o")]
                + ["--eval_strategy", "steps", *COMMON]
            )
        )
