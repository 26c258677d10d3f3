"""The paper's Anthropic-HH pipeline (Rafailov et al. 2023, Sec. 6, App. B-D): SFT, DPO, judged win rates.

    python examples/hh.py                        # offline: tiny model, bundled hh_tiny data, a few minutes on CPU
    accelerate launch examples/hh.py             # the same under accelerate (one or several processes)
    accelerate launch examples/hh.py --model EleutherAI/pythia-2.8b --dataset Anthropic/hh-rlhf \\
        --beta 0.1 --learning_rate 1e-6 --bf16 --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 16 --judge llm --judge_url http://localhost:8000/v1 \\
        --judge_model my-judge --output_dir runs/pythia-2.8b

Stages, each resumable (run the same command again: finished stages are skipped, an interrupted one
resumes from its last checkpoint) and skippable (`--skip_sft`, `--skip_dpo`, `--skip_eval`):

1. **sft**: fine-tune on the chosen responses (the paper's Preferred-FT baseline and DPO's start).
2. **dpo**: DPO against the SFT model (LoRA by default; `--full` trains every weight, `--qlora` a 4-bit base),
   on the dataset's pairs, or with `--sft_samples_per_prompt N` on pairs of the SFT model's own samples
   (N per training prompt, best against worst by the judge, as in the paper's Sec. 6.1 experiment;
   stage `pairs`). `--rounds R` (iterative DPO): R rounds instead, round r on pairs of round r-1's samples
   (stages `round{r}_pairs`, `round{r}`; `--round_reference`), each round's win rate against SFT in `rounds`.
3. **eval**: sample held-out prompts at several temperatures from the DPO policy, the SFT model and
   Best-of-N over SFT samples (App. D.1); judge them against the data set's chosen response and DPO
   against SFT; write `summary.json`, a table, and plots. `--bon_n 1,4,16,64,128` draws once at the
   largest N and scores every smaller N on the first N samples of that draw (no resampling), with the
   win rate against N in `plots/best_of_n.png` (the paper's Fig. 4).

`--dataset` is a hub id or a local folder with `train` / `test` files (`.jsonl`, `.json`, `.parquet`), or
one local file (5% held out). Rows are raw HH transcripts `{"chosen", "rejected"}`, whose prompt runs to
the last "\\n\\nAssistant:", or rows with an explicit `prompt` (TL;DR summarization: `prompt` = the post,
`chosen` / `rejected` = the summaries; a hub set without a test split is evaluated on its validation
split). The paper's TL;DR settings (App. B, C.2): β 0.5, and the GPT-4 summarization prompt,

    accelerate launch examples/hh.py --model EleutherAI/pythia-2.8b --dataset trl-lib/tldr-preference \\
        --beta 0.5 --learning_rate 1e-6 --bf16 --judge llm --judge_task summarization \\
        --judge_url http://localhost:8000/v1 --judge_model my-judge --output_dir runs/tldr
 Every `DPOConfig` flag applies to the DPO stage (`--beta`, `--learning_rate`, ...).
With no `--model`, a tiny Llama is built from a config with a tokenizer trained on the data, and the
defaults below suit it; flags given on the command line win.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace

from datasets import load_dataset

import pipeline
from dpo_trainer import DPOConfig
from dpo_trainer.data import split_hh_transcript
from hh_data import rule_score  # noqa: F401 (the rule judge, read as hh.rule_score)
from hh_judges import judge_rounds, make_judge, scoring_judge, validate_flags
from pipeline import Run, StageSettings, arg, head

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hh_tiny")


@dataclass(frozen=True)
class PaperDefaults:
    """The paper's reference implementation truncates HH at 512 tokens, prompts at 256, keeping a long prompt's
    end (the turns nearest the reply); DPOConfig's own defaults follow TRL (1024, no prompt cap, keep_start).
    Applied unless given on the command line."""

    max_length: int = 512
    max_prompt_length: int = 256
    truncation_mode: str = "keep_end"


@dataclass(frozen=True)
class OfflineDefaults:
    """The offline default run, without --model: a tiny model trained from scratch on the bundled data, fully
    fine-tuned (SFT then DPO). Applied unless given on the command line."""

    max_steps: int = 250
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 128
    learning_rate: float = 1e-4
    beta: float = 2.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 10
    logging_steps: int = 10
    max_length: int = 192
    max_prompt_length: int = 128
    save_steps: int = 50
    seed: int = 0
    sft_max_steps: int = 700
    sft_learning_rate: float = 3e-3
    full: bool = True
    eval_prompts: int = 100
    # a tiny model on the CPU: float32 and no recomputation (DPOConfig's defaults are TRL's: bf16 autocast and
    # activation checkpointing, which a run with --model gets)
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class ScriptArguments:
    dataset: str = arg(BUNDLED_DATA, "Hub id, local folder or local file.")
    model: str | None = arg(None, "Base model (hub id or path); none: a tiny model.")
    full: bool = arg(False, "DPO on every weight instead of a LoRA adapter.")
    qlora: bool = arg(False, "LoRA on a 4-bit NF4 base (needs bitsandbytes).")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int | None = arg(None, "LoRA alpha (default 2 * rank).")
    sft_max_steps: int = arg(1000, "SFT optimizer steps.")
    sft_learning_rate: float = arg(1e-5, "SFT learning rate.")
    sft_model: str | None = arg(None, "Use this SFT model instead of training one.")
    sft_samples_per_prompt: int = arg(0, "0: DPO trains on the dataset's pairs. N >= 2: on pairs of the SFT "
        "model's own samples, N per training prompt, best against worst by the judge (the paper's Sec. 6.1 recipe; "
        "needs a scoring judge).")  # fmt: skip
    pair_prompts: int | None = arg(None, "Training prompts sampled for those pairs (default: all).")
    pair_temperature: float = arg(1.0, "Sampling temperature for those pairs.")
    skip_sft: bool = arg(False, "DPO straight from --model (no SFT stage).")
    skip_dpo: bool = arg(False, "Skip the DPO stage.")
    skip_eval: bool = arg(False, "Skip sampling and judging.")
    max_train_rows: int | None = arg(None, "Use at most this many training rows.")
    max_eval_rows: int | None = arg(200, "Use at most this many test rows.")
    eval_prompts: int = arg(256, "Held-out prompts sampled and judged.")
    temperatures: str = arg("0.25,0.5,0.75,1.0", "Sampling temperatures.")
    max_new_tokens: int = arg(64, "Longest sampled response.")
    bon_n: str = arg("16", "Best-of-N: N, or several N (1,4,16) scored from one draw (0: skip).")
    bon_temperatures: str = arg("1.0", "Best-of-N sampling temperatures.")
    judge: str = arg("rule", "rule (bundled data), llm or reward.")
    judge_url: str | None = arg(None, "OpenAI-compatible base URL (judge llm).")
    judge_model: str | None = arg(None, "Judge model name (judge llm).")
    judge_task: str = arg("dialogue", "The paper's judge prompt: dialogue or summarization.")
    reward_model: str | None = arg(None, "Sequence classifier (judge reward).")
    tiny_hidden_size: int = arg(128, "Width of the offline tiny model.")
    tiny_layers: int = arg(3, "Layers of the offline tiny model.")
    restart_stale: bool = arg(
        False, "Start over the stages of --output_dir whose settings changed (kept aside)."
    )
    rounds: int = arg(
        1,
        "Iterative DPO: R rounds on R disjoint parts of the pair prompts, each on pairs of the round "
        "before's samples (--sft_samples_per_prompt, default 4) trained from it for max_steps / R steps.",
    )
    round_reference: str = arg("sft", pipeline.ROUND_REFERENCE_HELP)


# What decides each stage's result, besides the stages it builds on (chained through their fingerprints).
JUDGE = ("judge", "judge_url", "judge_model", "judge_task", "reward_model")
SFT_SETTINGS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "lr_scheduler_type", "warmup_steps", "logging_steps", "save_steps", "bf16", "fp16", "seed",
                "report_to", "use_cpu", "disable_tqdm", "gradient_checkpointing")  # fmt: skip
STAGES = (
    StageSettings("sft", ("dataset", "model", "max_train_rows", "max_eval_rows", "sft_max_steps", "sft_learning_rate",
                          "sft_model", "skip_sft", "tiny_hidden_size", "tiny_layers"),
                  ("per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                   "bf16", "fp16", "seed", "max_length", "max_prompt_length", "model_init_kwargs")),
    StageSettings("pairs", ("sft_samples_per_prompt", "pair_prompts", "pair_temperature", "max_new_tokens") + JUDGE,
                  ("seed", "bf16", "fp16"), after=("sft",)),
    StageSettings("dpo", ("full", "qlora", "lora_r", "lora_alpha"), ("beta",) + pipeline.DPO_SETTINGS, after=("sft", "pairs")),
    StageSettings("eval", ("eval_prompts", "temperatures", "max_new_tokens", "bon_n", "bon_temperatures") + JUDGE,
                  ("seed", "bf16", "fp16", "per_device_eval_batch_size"), after=("sft", "dpo")),
)  # fmt: skip


def stage_settings(script_args: ScriptArguments) -> list[StageSettings]:
    """`STAGES`, and with --rounds R > 1 the rounds instead of `pairs` and `dpo`, the evaluation after the last."""
    if script_args.rounds < 2:
        return list(STAGES)
    pairs, dpo, evaluation = STAGES[1:]
    rounds = pipeline.round_stages(script_args.rounds, pairs.script_keys, pairs.config_keys + ("per_device_eval_batch_size",),
                                   dpo.script_keys, dpo.config_keys, after=("sft",))  # fmt: skip
    return [STAGES[0], *rounds, replace(evaluation, after=("sft", rounds[-1].name))]


def parse_args(argv: list[str]) -> tuple[ScriptArguments, DPOConfig]:
    # no --output_dir: rerunning the same command continues the last default run, other settings start a new one
    def output_dir(script_args, config):
        return pipeline.default_output_dir(
            pipeline.run_manifest(stage_settings(script_args), script_args, config), "hh"
        )

    script_args, config = pipeline.parse_args(argv, ScriptArguments, OfflineDefaults(), output_dir,
                                              **asdict(PaperDefaults()))  # fmt: skip
    if script_args.rounds < 1 or script_args.round_reference not in pipeline.ROUND_REFERENCES:
        raise SystemExit("--rounds must be >= 1 and --round_reference sft or previous.")
    if script_args.judge not in ("rule", "llm", "reward"):
        raise SystemExit(f"--judge must be rule, llm or reward, got {script_args.judge!r}.")
    return script_args, config


# ---------------------------------------------------------------- data


def load_hh(dataset: str, max_train_rows: int | None, max_eval_rows: int | None):
    """Train and test splits of raw HH rows from a hub id, a local folder or a local file."""
    splits = pipeline.load_splits(dataset, check_file=pipeline.check_preference_file)
    train, test = splits["train"], splits["test" if "test" in splits else "validation"]
    train, test = head(train, max_train_rows), head(test, max_eval_rows)
    columns = ["prompt", "chosen", "rejected"] if "prompt" in train.column_names else ["chosen", "rejected"]
    return train.select_columns(columns), test.select_columns(columns)


def prompt_and_reply(row: dict, index: int) -> tuple[str, str]:
    """A row's prompt and chosen reply: its `prompt` column (TL;DR rows), else split from the HH transcript."""
    if row.get("prompt") is not None:
        return row["prompt"], row["chosen"]
    return split_hh_transcript(row["chosen"], row=index, field="chosen")


# ---------------------------------------------------------------- the pairs stage


def pair_prompts(script_args: ScriptArguments, train) -> list[str]:
    rows = head(train, script_args.pair_prompts or len(train))
    return list(dict.fromkeys(prompt_and_reply(row, i)[0] for i, row in enumerate(rows)))


def as_replies(rows: list[dict]) -> list[dict]:
    """Sampled pairs as the pairs stage writes them (`preference_pairs`): stripped, one leading space, none equal."""
    rows = [
        dict(row, chosen=" " + row["chosen"].strip(), rejected=" " + row["rejected"].strip()) for row in rows
    ]
    return [row for row in rows if row["chosen"] != row["rejected"]]


def run_pairs(run: Run, script_args: ScriptArguments, sft: str, train):
    """Preference pairs over the SFT model's own samples, labelled by the judge; returns them as a Dataset.

    N samples per training prompt at `--pair_temperature`; the best and the worst by the judge's score
    make a (chosen, rejected) row; prompts whose samples all score alike are dropped. Written to
    `pairs/train.jsonl` (with the scores) by the main process; a finished stage is read back.
    """
    from dpo_trainer.evaluation import sampled_preference_pairs

    stage, config = run.stage("pairs"), run.config
    path = os.path.join(stage.folder, "train.jsonl")
    if not stage.finished(outputs=("train.jsonl",)):
        stage.start()
        judge = scoring_judge(script_args)
        prompts, n = pair_prompts(script_args, train), script_args.sft_samples_per_prompt
        pairs = sampled_preference_pairs(  # every process samples a share; each gets all the pairs
            pipeline.load_for_sampling(sft, config), pipeline.load_tokenizer(sft), prompts, judge, n=n,
            temperature=script_args.pair_temperature, max_new_tokens=script_args.max_new_tokens,
            batch_size=config.per_device_eval_batch_size, seed=config.seed, across_processes=True,
        )  # fmt: skip
        if not pairs:
            raise SystemExit("[pairs] every prompt's samples scored alike: no preference pair to train on.")
        stats = {}
        if run.is_main:
            pipeline.write_jsonl(path, pairs)
            gaps = [pair["chosen_score"] - pair["rejected_score"] for pair in pairs]
            stats = {"prompts": len(prompts), "pairs": len(pairs), "mean_score_gap": sum(gaps) / len(gaps)}
            print(f"[pairs] {len(pairs)} pairs from {len(prompts)} prompts x {n} SFT samples in "
                  f"{time.time() - stage.started:.0f}s (mean score gap {stats['mean_score_gap']:.2f}): {path}")  # fmt: skip
        stage.finish(record=stats)
    return load_dataset("json", data_files=path)["train"].select_columns(["prompt", "chosen", "rejected"])


# ---------------------------------------------------------------- the eval stage


def run_eval(run: Run, script_args: ScriptArguments, sft: str, policy: str | None, test) -> dict | None:
    """Sample, judge and plot; returns the summary's `eval` part. Every process samples its share of every batch
    list on its own accelerator (`across_processes=True`: the same samples as one process); the main process
    judges, plots and returns the summary, the others return None."""
    from dpo_trainer.evaluation import best_of_n_prefixes, sample_and_score, sample_responses, win_rate
    from dpo_trainer.evaluation.plots import plot_training_curves, plot_win_rate_vs_n, plot_win_rates

    started, config = time.time(), run.config
    # samples are keyed by the fingerprint of the stages and settings that produced them: a retrained
    # policy or another sampling setting never reads an earlier run's samples
    folder = run.path("eval", run.fingerprint("eval"))
    split = [prompt_and_reply(row, i) for i, row in enumerate(head(test, script_args.eval_prompts))]
    prompts, chosen = [p for p, _ in split], [r.strip() for _, r in split]
    tokenizer = pipeline.load_tokenizer(sft)
    judge = make_judge(script_args, cache_dir=run.path("eval"))
    models = {"SFT": pipeline.load_for_sampling(sft, config)}
    if policy is not None:
        models["DPO"] = pipeline.load_policy(policy, sft, config)
    sampling = dict(max_new_tokens=script_args.max_new_tokens, batch_size=config.per_device_eval_batch_size,
                    seed=config.seed, across_processes=True, disable_progress=config.disable_tqdm)  # fmt: skip

    def cached(
        method: str, temperature: float, compute
    ) -> list:  # every process samples, the main one writes
        path = os.path.join(folder, f"samples-{method.replace(' ', '-').lower()}-t{temperature}.json")
        return pipeline.cached_json(path, compute, say=f"[eval] {method}, T={temperature}")

    def sample(model, temperature):
        samples = sample_responses(model, tokenizer, prompts, temperature=temperature, **sampling)
        return [s[0].strip() for s in samples]

    temperatures = [float(t) for t in script_args.temperatures.split(",")]
    bon_temperatures = [float(t) for t in script_args.bon_temperatures.split(",")]
    bon_ns = sorted({int(n) for n in script_args.bon_n.split(",") if int(n) > 0})
    samples = {}  # (method, temperature) -> responses, cached on disk so a rerun skips finished sampling
    for method, model in models.items():
        for t in temperatures:
            samples[method, t] = cached(method, t, lambda model=model, t=t: sample(model, t))
    if bon_ns and hasattr(judge, "score"):
        for t in bon_temperatures:  # one draw at the largest N; every smaller N reads its first samples
            draw = lambda t=t: list(sample_and_score(models["SFT"], tokenizer, prompts, judge, n=max(bon_ns),  # noqa: E731
                                                     temperature=t, **sampling))  # fmt: skip
            drawn, scores = cached(f"Best of {max(bon_ns)} draw", t, draw)
            for n, (responses, _, _) in best_of_n_prefixes(drawn, scores, bon_ns).items():
                samples[f"Best of {n}", t] = [r.strip() for r in responses]
    if not run.is_main:  # the other processes only helped to sample
        return None

    vs_chosen, dpo_vs_sft = {}, {}
    for (method, t), responses in samples.items():
        vs_chosen.setdefault(method, {})[t] = win_rate(judge.compare(prompts, responses, chosen))
    if policy is not None:
        for t in temperatures:
            dpo_vs_sft[t] = win_rate(judge.compare(prompts, samples["DPO", t], samples["SFT", t]))
    plots, judged = {}, f"{script_args.judge} judge"
    read_only = pipeline.unwritable(run.path("plots"))
    if read_only:  # a finished run on read-only storage: summarised again, its plots kept as they were
        print(f"[eval] plots not drawn: {run.path('plots')} cannot be written ({read_only}).")
    else:
        plots["win_rates"] = plot_win_rates(vs_chosen, run.path("plots", "win_rates.png"),
                                            title=f"Win rate against the chosen response ({judged})")  # fmt: skip
        by_n = {f"T={t}": {n: vs_chosen[f"Best of {n}"][t] for n in bon_ns} for t in bon_temperatures
                if len(bon_ns) > 1 and (f"Best of {bon_ns[0]}", t) in samples}  # fmt: skip
        if by_n:
            title = f"Best-of-N over SFT samples against the chosen response ({judged})"
            plots["best_of_n"] = plot_win_rate_vs_n(by_n, run.path("plots", "best_of_n.png"), title=title)
        history = pipeline.read_json(run.path("dpo", "log_history.json"), "no training curves drawn.")
        if history is not None:
            plots["training_curves"] = plot_training_curves(history, run.path("plots", "training_curves.png"))

    columns = sorted({t for by_t in vs_chosen.values() for t in by_t})
    rows = [
        [method] + [str(by_t[t]) if t in by_t else "-" for t in columns] for method, by_t in vs_chosen.items()
    ]
    if dpo_vs_sft:
        rows.append(["DPO vs SFT"] + [str(dpo_vs_sft.get(t, "-")) for t in columns])
    title = f"\n[eval] win rate against the data set's chosen response ({judged}, {len(prompts)} held-out prompts)"
    pipeline.print_table(["method"] + [f"T={t}" for t in columns], rows, [14] + [28] * len(columns), title)
    as_json = lambda by_t: {str(t): asdict(rate) for t, rate in by_t.items()}  # noqa: E731
    return {
        "judge": script_args.judge,
        "prompts": len(prompts),
        "win_rate_vs_chosen": {method: as_json(by_t) for method, by_t in vs_chosen.items()},
        "dpo_vs_sft": as_json(dpo_vs_sft),
        "plots": {name: str(path) for name, path in plots.items()},
        "seconds": time.time() - started,
    }


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict:
    script_args, config = parse_args(sys.argv[1:] if argv is None else argv)
    validate_flags(script_args)
    run = Run.open(script_args, config, stage_settings(script_args), restart_stale=script_args.restart_stale)
    train, test = load_hh(script_args.dataset, script_args.max_train_rows, script_args.max_eval_rows)
    texts = (row["chosen"] + row["rejected"] for row in train)
    base = pipeline.base_model(run, script_args.model, texts, vocab_size=2000,
                               hidden_size=script_args.tiny_hidden_size, layers=script_args.tiny_layers)  # fmt: skip
    sft = script_args.sft_model or base
    if not (script_args.skip_sft or script_args.sft_model):  # SFT: only the settings its fingerprint names
        sft = pipeline.sft_stage(run, base, train, test, max_steps=script_args.sft_max_steps,
                                 learning_rate=script_args.sft_learning_rate, only=SFT_SETTINGS)  # fmt: skip
    earlier = run.path("dpo", "final")  # with --skip_dpo, an earlier run's policy
    policy, rounds = (earlier if os.path.exists(earlier) else None), []
    if (
        script_args.rounds > 1 and not script_args.skip_dpo
    ):  # iterative DPO on the judge's pairs, best against worst
        sampling = dict(n=script_args.sft_samples_per_prompt or 4, rule="best_worst", seed=config.seed,
                        temperature=script_args.pair_temperature, max_new_tokens=script_args.max_new_tokens,
                        batch_size=config.per_device_eval_batch_size)  # fmt: skip
        rounds = pipeline.run_rounds(run, script_args.rounds, pair_prompts(script_args, train), sft, scoring_judge(script_args),
                                     sampling=sampling, reference=script_args.round_reference, eval_dataset=test,
                                     postprocess=as_replies, peft_config=pipeline.lora_config(script_args),
                                     quantize=script_args.qlora, max_steps=-(-config.max_steps // script_args.rounds))  # fmt: skip
        policy = rounds[-1]["policy"]
    elif not script_args.skip_dpo:
        if script_args.sft_samples_per_prompt:
            train = run_pairs(run, script_args, sft, train)
        policy = pipeline.dpo_stage(run, "dpo", sft, train, test, peft_config=pipeline.lora_config(script_args),
                                    quantize=script_args.qlora, record={"sft": sft})  # fmt: skip
    summary = {"output_dir": run.out, "sft_model": sft, "dpo_policy": policy}
    if not script_args.skip_eval:  # every process samples; run_eval returns None off the main process
        summary["eval"] = run_eval(run, script_args, sft, policy, test)
    if rounds and not script_args.skip_eval and run.is_main:  # each round's win rate against SFT, T=1
        prompts = [prompt_and_reply(row, i)[0] for i, row in enumerate(head(test, script_args.eval_prompts))]
        judge_rounds(run, script_args, sft, rounds, prompts)
    summary.update({"rounds": rounds} if rounds else {})
    if run.is_main:
        summary.update(
            run.done(["sft", "dpo"] + [f"round{e['round']}{part}" for e in rounds for part in ("_pairs", "")])
        )
        run.write_summary(summary)
    return summary


if __name__ == "__main__":
    pipeline.run_script(main)
