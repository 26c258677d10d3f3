"""examples/hh.py end to end, shortened: every stage, resuming, skipping, local files, accelerate launch."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

import pipeline  # examples/, on the path through conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "examples", "hh.py")
SHORT = [
    "--sft_max_steps", "3", "--max_steps", "3", "--max_train_rows", "48", "--max_eval_rows", "8",
    "--logging_steps", "1", "--eval_prompts", "4", "--temperatures", "0.5,1.0", "--bon_n", "2",
    "--max_new_tokens", "8", "--save_steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def hh():
    spec = importlib.util.spec_from_file_location("hh_example", HH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finished_run(hh, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hh") / "run")
    return out, hh.main(["--output_dir", out, "--full", "false"] + SHORT)  # LoRA, the default for real models


def test_every_stage_runs_and_writes_the_run_folder(finished_run):
    out, summary = finished_run
    for path in (
        "sft/final/model.safetensors",
        "dpo/final/adapter_model.safetensors",
        "dpo/final/README.md",
        "dpo/log_history.json",
        "plots/win_rates.png",
        "plots/training_curves.png",
        "summary.json",
    ):
        assert os.path.exists(os.path.join(out, path)), path
    with open(os.path.join(out, "summary.json")) as handle:
        written = json.load(handle)
    assert written["dpo"]["before"]["before_loss"] == pytest.approx(
        0.6931, abs=1e-3
    )  # policy == SFT reference
    assert set(written["eval"]["win_rate_vs_chosen"]) == {"SFT", "DPO", "Best of 2"}
    for by_temperature in written["eval"]["win_rate_vs_chosen"].values():
        for rate in by_temperature.values():
            assert 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1 and rate["n"] == 4
    assert set(written["eval"]["dpo_vs_sft"]) == {"0.5", "1.0"}
    with open(os.path.join(out, "plots", "win_rates.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_resumes_instead_of_retraining(hh, finished_run, capsys):
    out, _ = finished_run
    adapter = os.path.join(out, "dpo", "final", "adapter_model.safetensors")
    stamps = [os.stat(path).st_mtime_ns for path in (adapter, os.path.join(out, "run.json"))]
    hh.main(["--output_dir", out, "--full", "false"] + SHORT)
    printed = capsys.readouterr().out
    assert "[sft] already done" in printed and "[dpo] already done" in printed
    # neither the model nor run.json (the same settings) is written again
    assert [os.stat(path).st_mtime_ns for path in (adapter, os.path.join(out, "run.json"))] == stamps


def test_a_changed_flag_is_refused_then_restarts_only_the_stale_stages(hh, finished_run, tmp_path, capsys):
    """The whole script, not only its manifest helpers: a changed DPO flag (the offline default beta is 2.0) is refused with the key named and
    nothing touched; with --restart_stale the DPO stage (and the evaluation after it) runs again, the earlier
    DPO folder is kept aside whole, and SFT is reused."""
    out = str(tmp_path / "run")
    shutil.copytree(finished_run[0], out)
    adapter = os.path.join(out, "dpo", "final", "adapter_model.safetensors")
    with open(adapter, "rb") as handle:
        old_adapter = handle.read()
    stamp = os.path.getmtime(adapter)
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"(?s)dpo:.*beta: 2\.0 -> 0\.5.*--restart_stale"):
        hh.main(["--output_dir", out, "--full", "false", "--beta", "0.5"] + SHORT)
    assert os.path.getmtime(adapter) == stamp and not glob.glob(os.path.join(out, "*.stale-*"))

    summary = hh.main(["--output_dir", out, "--full", "false", "--beta", "0.5", "--restart_stale"] + SHORT)
    printed = capsys.readouterr().out
    assert "[sft] already done" in printed and "[dpo] already done" not in printed
    (aside,) = glob.glob(os.path.join(out, "dpo.stale-*"))
    with open(os.path.join(aside, "final", "adapter_model.safetensors"), "rb") as handle:
        assert handle.read() == old_adapter  # the earlier result, kept whole
    with open(adapter, "rb") as handle:
        assert handle.read() != old_adapter  # trained again, with the new beta
    with open(os.path.join(out, "run.json")) as handle:
        assert json.load(handle)["stages"]["dpo"]["settings"]["beta"] == 0.5
    assert summary["dpo_policy"] == os.path.join(out, "dpo", "final")
    # now the same settings: resumes
    hh.main(["--output_dir", out, "--full", "false", "--beta", "0.5"] + SHORT)
    assert "[dpo] already done" in capsys.readouterr().out


def test_refuses_a_folder_holding_other_files(hh, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "weights.bin").write_text("precious")
    with pytest.raises(SystemExit, match="not a run of this script"):
        hh.main(["--output_dir", str(out)] + SHORT)
    assert (out / "weights.bin").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_an_output_dir_that_is_a_file_is_refused(hh, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("precious")
    with pytest.raises(SystemExit, match="is a file, not a folder: choose another --output_dir"):
        hh.main(["--output_dir", str(taken)] + SHORT)
    with pytest.raises(
        SystemExit, match=r"cannot be written \(Not a directory: .*choose another --output_dir"
    ):
        hh.main(["--output_dir", str(taken / "run")] + SHORT)
    assert taken.read_text() == "precious"


def truncate(path: str) -> None:
    with open(path) as handle:
        text = handle.read()
    with open(path, "w") as handle:
        handle.write(text[: len(text) // 2])


def test_a_damaged_done_json_or_samples_file_is_named_and_redone(hh, finished_run, tmp_path, capsys):
    """Truncated files of a finished run (a full disk, a copy cut short): named in a warning, their stage done
    again (DPO resumes from its last checkpoint, the samples are drawn again from the same seed)."""
    out = str(tmp_path / "run")
    shutil.copytree(finished_run[0], out)
    done = os.path.join(out, "dpo", "done.json")
    [samples] = glob.glob(os.path.join(out, "eval", "*", "samples-sft-t0.5.json"))
    with open(samples) as handle:
        drawn = json.load(handle)
    truncate(done)
    truncate(samples)
    capsys.readouterr()
    hh.main(["--output_dir", out, "--full", "false"] + SHORT)
    printed = capsys.readouterr()
    assert f"warning: {done} is damaged (JSONDecodeError: " in printed.err
    assert "the stage is treated as unfinished and done again." in printed.err
    assert (
        f"warning: {samples} is damaged (JSONDecodeError: " in printed.err and "sampled again." in printed.err
    )
    assert "[sft] already done" in printed.out and "[dpo] already done" not in printed.out
    with open(done) as handle:
        assert json.load(handle)["after"]["eval_loss"] > 0
    with open(samples) as handle:
        assert json.load(handle) == drawn


def test_a_damaged_run_json_counts_as_changed_settings(hh, tmp_path, capsys):
    """The settings a damaged run.json recorded are unknown: the stages there are refused as changed (kept
    aside and started over with --restart_stale), never reused as if made with this command's settings."""
    out = tmp_path / "run"
    (out / "sft").mkdir(parents=True)
    (out / "run.json").write_text('{"script_args": {"dataset": "da')
    script_args, config = hh.parse_args(["--output_dir", str(out)] + SHORT)
    manifest = pipeline.run_manifest(hh.STAGES, script_args, config)
    refused = r"(?s)sft: settings unknown \(.*run\.json is damaged\).*--restart_stale"
    with pytest.raises(SystemExit, match=refused):
        pipeline.check_run_manifest(str(out), manifest, restart_stale=False)
    assert f"warning: {out / 'run.json'} is damaged (JSONDecodeError: " in capsys.readouterr().err
    assert pipeline.check_run_manifest(str(out), manifest, restart_stale=True) == {}
    assert not (out / "sft").exists() and len(glob.glob(str(out / "sft.stale-*"))) == 1


def test_a_stage_killed_in_its_first_checkpoint_write_starts_over(hh, finished_run, tmp_path, capsys):
    """A DPO stage whose only checkpoint is half-written (killed while writing checkpoint-2): the rerun removes it,
    naming it, and trains the stage from the start, never mixing its checkpoint with the killed run's files."""
    out = str(tmp_path / "run")
    shutil.copytree(finished_run[0], out)
    dpo = os.path.join(out, "dpo")
    shutil.rmtree(dpo)
    os.makedirs(os.path.join(dpo, "checkpoint-2"))
    with open(os.path.join(dpo, "checkpoint-2", "rng_state_1.pth"), "wb") as handle:
        handle.write(b"a killed run's file")
    capsys.readouterr()
    hh.main(["--output_dir", out, "--full", "false", "--skip_eval"] + SHORT)
    printed = capsys.readouterr()
    assert f"[dpo] incomplete checkpoint folders in {dpo}" in printed.err
    assert "removed: checkpoint-2 (no trainer_state.json" in printed.err
    assert "no complete checkpoint: the stage starts over." in printed.err
    with open(os.path.join(dpo, "log_history.json")) as handle:
        assert [e["step"] for e in json.load(handle) if "loss" in e] == [1, 2, 3]
    assert "rng_state_1.pth" not in os.listdir(os.path.join(dpo, "checkpoint-2"))
    assert os.path.exists(os.path.join(dpo, "done.json"))


def read_only_command(folder: str, command: list[str]) -> list[str]:
    """`command` run with `folder` read-only: a read-only bind mount of it for root (whom permission bits do not
    stop), else its write permissions taken away."""
    if os.geteuid() != 0:
        for root, _dirs, files in os.walk(folder):
            for name in [root] + [os.path.join(root, f) for f in files]:
                os.chmod(name, os.stat(name).st_mode & ~0o222)
        return command
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no read-only mount here (root without `unshare -m`)")
    mount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", mount, "sh", folder, *command]


@pytest.mark.slow
def test_read_only_storage(finished_run, tmp_path):
    """A finished run on read-only storage is summarised again (its results printed, exit 0, nothing written);
    a new run in a read-only folder is refused, naming the folder."""
    from conftest import dist_env

    out = str(tmp_path / "run")
    shutil.copytree(finished_run[0], out)
    with open(os.path.join(out, "run.json"), "rb") as handle:
        marker = handle.read()
    command = [sys.executable, HH, "--output_dir", out, "--full", "false"] + SHORT
    result = subprocess.run(read_only_command(out, command), env=dist_env(), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[sft] already done" in result.stdout and "[dpo] already done" in result.stdout
    assert "DPO vs SFT" in result.stdout  # the win-rate table
    assert f"summary: not written, {out} cannot be written (" in result.stdout
    assert "the results above are printed only." in result.stdout
    with open(os.path.join(out, "run.json"), "rb") as handle:
        assert handle.read() == marker

    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    command = [sys.executable, HH, "--output_dir", empty, "--skip_eval"] + SHORT
    result = subprocess.run(read_only_command(empty, command), env=dist_env(), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 1 and os.listdir(empty) == [], result.stderr[-3000:]
    expected = f"--output_dir {empty} cannot be written ("
    assert (
        expected in result.stderr and "make it writable, or choose another --output_dir." in result.stderr
    ), result.stderr[-3000:]


def test_single_local_file_full_finetuning_without_sft(hh, tmp_path):
    data = tmp_path / "hh.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "hh_tiny", "train.jsonl")) as source:
        data.write_text("".join(source.readlines()[:100]))
    out = str(tmp_path / "full")
    summary = hh.main(
        ["--dataset", str(data), "--output_dir", out, "--full", "--skip_sft", "--skip_eval"] + SHORT
    )
    assert summary["sft_model"] == os.path.join(out, "base")
    assert os.path.exists(os.path.join(out, "dpo", "final", "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "sft")) and "eval" not in summary


def test_missing_split_is_a_clear_error(hh, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        open(os.path.join(ROOT, "examples", "data", "hh_tiny", "test.jsonl")).read()
    )
    with pytest.raises(FileNotFoundError, match="no test"):
        hh.load_hh(str(tmp_path), None, None)


def test_judge_flags_are_checked(hh, tmp_path):
    with pytest.raises(SystemExit, match="judge"):
        hh.parse_args(["--judge", "oracle"])
    script_args, _ = hh.parse_args(["--judge", "llm", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="judge_url"):
        hh.make_judge(script_args)


def test_runs_under_accelerate_launch(tmp_path):
    out = str(tmp_path / "accel")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", HH,
               "--output_dir", out] + SHORT  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DPO vs SFT" in result.stdout
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_dpo_on_pairs_of_sft_samples(hh, tmp_path, capsys):
    out = str(tmp_path / "pairs")
    argv = ["--output_dir", out, "--sft_samples_per_prompt", "3", "--pair_prompts", "12", "--skip_eval"]
    hh.main(argv + SHORT)
    with open(os.path.join(out, "pairs", "train.jsonl")) as handle:
        pairs = [json.loads(line) for line in handle]
    rule = hh.rule_score
    assert 0 < len(pairs) <= 12
    for pair in pairs:
        assert pair["prompt"].endswith("\n\nAssistant:") and pair["chosen"].startswith(" ")
        assert rule(pair["prompt"], pair["chosen"]) == pair["chosen_score"]
        assert pair["chosen_score"] > pair["rejected_score"] == rule(pair["prompt"], pair["rejected"])
    with open(os.path.join(out, "pairs", "done.json")) as handle:
        assert json.load(handle)["pairs"] == len(pairs)
    assert os.path.exists(os.path.join(out, "dpo", "final", "model.safetensors"))
    capsys.readouterr()
    hh.main(argv + SHORT)  # resumes: the pairs are read back, not sampled again
    assert "[pairs] already done" in capsys.readouterr().out


def test_pairs_need_a_scoring_judge_and_two_samples(hh, tmp_path):
    base = ["--output_dir", str(tmp_path / "x"), "--skip_eval"] + SHORT
    with pytest.raises(SystemExit, match="at least 2"):
        hh.main(base + ["--sft_samples_per_prompt", "1", "--skip_sft"])
    with pytest.raises(SystemExit, match="scores responses"):
        hh.main(
            base
            + [
                "--sft_samples_per_prompt",
                "2",
                "--skip_sft",
                "--judge",
                "llm",
                "--judge_url",
                "http://127.0.0.1:9",
            ]
            + ["--judge_model", "m"]
        )


@pytest.mark.slow
def test_a_real_pretrained_model_trains_samples_and_is_judged(hh, tmp_path):
    """`--model` with SmolLM2-135M-Instruct (converted once by dpo_trainer.testing): LoRA DPO straight from
    the model, then sampling and judging on this process's device, the same samples as sample_responses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_trainer.evaluation import sample_responses
    from dpo_trainer.testing import smollm2_path

    model = smollm2_path()
    out = str(tmp_path / "smollm2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30-layer model on a small shared CPU
    try:
        summary = hh.main(
            ["--model", model, "--output_dir", out, "--skip_sft", "--max_steps", "2", "--max_train_rows", "8",
             "--max_eval_rows", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
             "--max_length", "128", "--max_prompt_length", "64", "--eval_prompts", "3", "--temperatures",
             "0.7", "--bon_n", "2", "--max_new_tokens", "6", "--use_cpu", "--save_strategy", "no",
             "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert summary["sft_model"] == model
    before = summary["dpo"]["before"]["before_loss"]
    assert before == pytest.approx(0.6931, abs=1e-3)  # the LoRA adapter starts as the identity
    with open(os.path.join(out, "dpo", "final", "adapter_config.json")) as handle:
        assert json.load(handle)["base_model_name_or_path"] == model
    rates = summary["eval"]["win_rate_vs_chosen"]
    assert set(rates) == {"SFT", "DPO", "Best of 2"}
    assert all(rate["n"] == 3 for by_t in rates.values() for rate in by_t.values())

    # The eval stage's SFT samples are sample_responses' on the base model with the same settings.
    [path] = glob.glob(os.path.join(out, "eval", "**", "samples-sft-t0.7.json"), recursive=True)
    with open(path) as handle:
        written = json.load(handle)
    _, test = hh.load_hh(hh.BUNDLED_DATA, None, 4)
    prompts = [hh.prompt_and_reply(row, i)[0] for i, row in enumerate(test.select(range(3)))]
    expected = sample_responses(
        AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model), prompts,
        temperature=0.7, max_new_tokens=6, batch_size=4, seed=0, disable_progress=True,
    )  # fmt: skip
    assert written == [samples[0].strip() for samples in expected]
    assert any(any(c.isalpha() for c in text) for text in written)  # a pretrained model writes words


@pytest.mark.slow
def test_the_gpu_script_runs_at_tiny_size_on_the_cpu(tmp_path):
    """benchmarks/gpu_hh.sh (Pythia-2.8B's shape on a GPU) with TINY=1: every stage runs and is timed."""
    from conftest import dist_env  # without the launcher and ACCELERATE_* variables of in-process runs

    out = tmp_path / "out"
    env = dict(dist_env(), TINY="1", OUT=str(out), RUN=str(tmp_path / "run"), PYTHON=sys.executable)
    script = os.path.join(ROOT, "benchmarks", "gpu_hh.sh")
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=900)
    log = (out / "hh.log").read_text()[-4000:] if (out / "hh.log").exists() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + log
    with open(out / "times.json") as handle:
        times = json.load(handle)
    assert times["exit"] == 0 and all(times[stage] > 0 for stage in ("sft", "dpo", "eval"))
    with open(out / "summary.json") as handle:
        summary = json.load(handle)
    assert set(summary["eval"]["win_rate_vs_chosen"]) == {"SFT", "DPO", "Best of 2"}
    assert "[eval] SFT, T=0.7: sampled in" in result.stdout


@pytest.mark.slow
def test_two_processes_sample_and_judge_what_one_process_does(hh, tmp_path):
    """The evaluation stage under torchrun with 2 processes (gloo): each samples a share, the main one
    judges; the sample files and win rates equal a single process's."""
    import torch

    from conftest import DIST_TIMEOUT_S, TORCHRUN_TWO_PROCESSES, dist_env

    flags = ["--skip_sft", "--skip_dpo", "--max_train_rows", "48", "--max_eval_rows", "8", "--eval_prompts", "6",
             "--temperatures", "0.7", "--bon_n", "2", "--max_new_tokens", "8", "--per_device_eval_batch_size", "2",
             "--use_cpu", "--disable_tqdm", "true"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: the same kernels, the same rounding
    try:
        one = hh.main(["--output_dir", str(tmp_path / "one")] + flags)
    finally:
        torch.set_num_threads(threads)
    command = [*TORCHRUN_TWO_PROCESSES, HH, "--output_dir", str(tmp_path / "two")] + flags
    result = subprocess.run(command, env=dist_env(), capture_output=True, text=True, timeout=DIST_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "by 2 process(es)" in result.stdout
    with open(tmp_path / "two" / "summary.json") as handle:
        two = json.load(handle)
    assert two["eval"]["win_rate_vs_chosen"] == json.loads(json.dumps(one["eval"]["win_rate_vs_chosen"]))
    files = {
        run: sorted(glob.glob(str(tmp_path / run / "eval" / "**" / "samples-*.json"), recursive=True))
        for run in ("one", "two")
    }
    assert len(files["one"]) == len(files["two"]) == 2  # SFT at T=0.7 and the Best-of-2 draw
    for mine, theirs in zip(files["one"], files["two"]):
        assert os.path.basename(mine) == os.path.basename(theirs)
        with open(mine) as a, open(theirs) as b:
            assert json.load(a) == json.load(b)


def test_a_bad_line_of_a_single_file_is_named_by_its_line(hh, tmp_path):
    rows = [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
        for i in range(40)
    ]
    rows[6] = {"chosen": "no marker here", "rejected": "\n\nHuman: q\n\nAssistant: no"}  # line 7
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"row 6 is line 7 .*row 6, field 'chosen'"):
        hh.load_hh(str(path), None, None)
    rows[6] = rows[5]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, test = hh.load_hh(str(path), None, None)
    assert len(train) + len(test) == 40


def test_rounds_sample_from_the_last_policy_resume_and_report(hh, tmp_path, capsys):
    """--rounds 2 (issue 23): each round on its own prompts, pairs as the pairs stage writes them, a rerun skips every
    finished round, and summary.json's rounds carry each round's win rate against SFT and its KL."""
    out = str(tmp_path / "rounds")
    argv = [
        "--output_dir",
        out,
        "--rounds",
        "2",
        "--pair_prompts",
        "12",
        "--bon_n",
        "0",
        "--temperatures",
        "1.0",
    ]
    summary = hh.main(argv + SHORT)
    assert [entry["round"] for entry in summary["rounds"]] == [1, 2]
    prompts = []
    for entry in summary["rounds"]:
        assert {"round", "reward", "reward_se", "kl", "kl_se", "pairs", "seconds", "win_rate"} <= set(entry)
        assert 0 <= entry["reward"] <= 1 and entry["win_rate"]["n"] == 4 and entry["seconds"] > 0
        with open(os.path.join(out, f"round{entry['round']}_pairs", "train.jsonl")) as handle:
            pairs = [json.loads(line) for line in handle]
        assert len(pairs) == entry["pairs"] > 0
        for pair in pairs:  # as the pairs stage writes them: one leading space, scored by the rule
            assert pair["chosen"].startswith(" ") and not pair["chosen"].startswith("  ")
            assert (
                hh.rule_score(pair["prompt"], pair["chosen"]) == pair["chosen_score"] > pair["rejected_score"]
            )
        prompts.append({pair["prompt"] for pair in pairs})
    assert not prompts[0] & prompts[1]
    assert summary["dpo_policy"] == summary["rounds"][1]["policy"]  # the evaluation's DPO is the last round
    with open(os.path.join(out, "summary.json")) as handle:
        assert json.load(handle)["rounds"][1]["kl"] == summary["rounds"][1]["kl"]
    capsys.readouterr()
    again = hh.main(argv + SHORT)  # nothing sampled or trained again
    printed = capsys.readouterr().out
    for stage in ("round1_pairs", "round1", "round2_pairs", "round2"):
        assert f"[{stage}] already done" in printed, stage
    assert " steps in " not in printed and [e["reward"] for e in again["rounds"]] == [
        e["reward"] for e in summary["rounds"]
    ]
