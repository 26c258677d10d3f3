"""The paper's controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1, App. C.1): the reward/KL frontier.

    python examples/sentiment.py                 # offline: tiny model, bundled reviews_tiny data, VADER reward
    accelerate launch examples/sentiment.py      # the same under accelerate
    python examples/sentiment.py --model "$(python -c 'from dpo_trainer.testing import smollm2_path; print(smollm2_path())')" \\
        --sft_max_steps 10 --sft_learning_rate 1e-4 --max_steps 10 --per_device_train_batch_size 4 \\
        --learning_rate 5e-4 --betas 0.5 --methods dpo,preferred_ft --pair_prompts 16 --eval_prompts 24 \\
        --bon_n 1,2,4 --max_new_tokens 32 --max_length 96 --max_prompt_length 32 \\
        --per_device_eval_batch_size 32 --output_dir runs/smollm2   # SmolLM2-135M-Instruct (LoRA), CPU smoke run
    accelerate launch examples/sentiment.py --model gpt2-large --dataset imdb \\
        --reward_model siebert/sentiment-roberta-large-english --betas 0.05,0.1,0.5,1,5 \\
        --learning_rate 1e-6 --bf16 --output_dir runs/imdb-gpt2-large

Stages, each resumable (run the same command again: finished stages are skipped, an interrupted training
run resumes from its last complete checkpoint) and skippable (`--skip_sft`, `--skip_train`, `--skip_eval`):

1. **sft**: fine-tune the base model on the reviews (each review's first 2-8 words are the prompt, the
   rest the response).
2. **pairs**: N completions (`--samples_per_prompt`, 4 in the paper) of each training prefix from the SFT
   model at temperature 1; every pair of them whose ground-truth rewards differ is a preference pair
   (the paper's 6 pairs per prefix), the higher-scoring completion chosen.
3. **train**: on those pairs, from the SFT model: DPO at each β of `--betas` (the SFT model as π_ref),
   Preferred-FT (SFT on each prefix's best completion) and Unlikelihood (`dpo_trainer.unlikelihood`).
4. **eval**: held-out prefixes sampled at temperature 1 from the SFT model, each trained policy and
   Best-of-N over the SFT model (every N of `--bon_n` from one draw); the mean ground-truth reward and
   KL(π‖π_ref) = mean of log π(y|x) - log π_ref(y|x) over the samples, each with its standard error
   (Best-of-N: log N - (N-1)/N); a table, `plots/frontier.png` and `summary.json`, with whether DPO's
   reward is at least each baseline's at the baseline's KL.

**rounds** (`--rounds R` > 1, iterative DPO at `--beta`): the pair prefixes split into R disjoint parts;
round r samples its part from round r-1's policy (round 0: the SFT model), pairs as in **pairs**, and trains
DPO from that policy for max_steps / R steps (stages `round{r}_pairs`, `round{r}`), against `--round_reference`
sft or previous; `summary.json`'s `rounds` and `plots/rounds.png` place each round beside the single-round curve.

The ground truth (`--reward_model`) is `vader` (the vaderSentiment lexicon, offline; compound score in
[-1, 1]) or a sequence-classification model: the probability of its `--reward_label` class (the paper's
classifier: siebert/sentiment-roberta-large-english, class POSITIVE), or a reward model's one output.
`--dataset` is a hub id with train and test splits (`imdb`), a local folder with `train` / `test` files
(`.jsonl`, `.json`, `.parquet`), or one local file (5% held out); the review is the `--text_column`.
Every `DPOConfig` flag applies to the DPO runs (`--learning_rate`, `--max_steps`, ...). With no `--model`
a tiny Llama is built from a config with a tokenizer trained on the reviews, and the defaults below suit
it; flags given on the command line win. Each response gets EOS appended in training (as every response
does in this library), so keep `--max_new_tokens` long enough for completions to end on their own.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import frontier
import pipeline
from dpo_trainer import DPOConfig
from pipeline import Run, StageSettings, arg
from reviews import load_reviews, make_scorer, pair_prefixes, review_rows, split_review

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reviews_tiny")
METHODS = ("dpo", "preferred_ft", "unlikelihood")
BASELINES = {"preferred_ft": "Preferred-FT", "unlikelihood": "Unlikelihood"}  # method -> its name in results


@dataclass(frozen=True)
class OfflineDefaults:
    """The offline default run, without --model: a tiny model trained from scratch on the bundled reviews.
    Applied unless given on the command line."""

    max_steps: int = 120
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 128
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 10
    logging_steps: int = 10
    max_length: int = 96
    max_prompt_length: int = 32
    save_steps: int = 60
    seed: int = 0
    sft_max_steps: int = 400
    sft_learning_rate: float = 3e-3
    full: bool = True
    pair_prompts: int = 400
    eval_prompts: int = 200
    betas: str = "0.05,0.1,0.5,1,5"
    bon_n: str = "1,2,4,8,16"
    # a tiny model on the CPU: float32 and no recomputation (DPOConfig's defaults are TRL's: bf16 autocast and
    # activation checkpointing, which a run with --model gets)
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class ScriptArguments:
    dataset: str = arg(BUNDLED_DATA, "Hub id, local folder or local file.")
    text_column: str = arg("text", "The column holding the review.")
    model: str | None = arg(None, "Base model (hub id or path); none: a tiny model.")
    sft_model: str | None = arg(None, "Use this SFT model instead of training one.")
    full: bool = arg(False, "Train every weight instead of a LoRA adapter.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int | None = arg(None, "LoRA alpha (default 2 * rank).")
    sft_max_steps: int = arg(1000, "SFT optimizer steps.")
    sft_learning_rate: float = arg(1e-5, "SFT learning rate.")
    prefix_words: str = arg("2,8", "Prompt = the review's first k words, k in this range.")
    max_train_rows: int | None = arg(None, "Use at most this many training reviews.")
    max_eval_rows: int | None = arg(None, "Use at most this many test reviews.")
    pair_prompts: int | None = arg(None, "Training prefixes sampled (default: all).")
    samples_per_prompt: int = arg(4, "Completions per training prefix (paper: 4).")
    betas: str = arg("0.05,0.1,0.5,1,5", "DPO runs, one per β.")
    methods: str = arg("dpo,preferred_ft,unlikelihood", "What the train stage trains.")
    baseline_learning_rate: float | None = arg(
        None, "Preferred-FT and Unlikelihood learning rate (default: DPO's)."
    )
    unlikelihood_alpha: float = arg(1.0, "Weight of the unlikelihood term.")
    eval_prompts: int = arg(256, "Held-out prefixes sampled.")
    eval_samples_per_prompt: int = arg(1, "Samples per held-out prefix and policy.")
    max_new_tokens: int = arg(48, "Longest sampled completion.")
    bon_n: str = arg("1,4,16", "Best-of-N over the SFT model, these N (empty: none).")
    reward_model: str = arg("vader", "vader, or a classifier / reward model.")
    reward_label: str = arg("positive", "The classifier's class read as the reward.")
    reward_output: str = arg("probability", "probability or logit of that class.")
    skip_sft: bool = arg(False, "Use --model itself as the SFT model.")
    skip_train: bool = arg(False, "Skip the pairs and train stages.")
    skip_eval: bool = arg(False, "Skip sampling and scoring.")
    tiny_hidden_size: int = arg(64, "Width of the offline tiny model.")
    tiny_layers: int = arg(2, "Layers of the offline tiny model.")
    rounds: int = arg(
        1,
        "Iterative DPO at --beta: R rounds on R disjoint parts of the pair prefixes, each sampled "
        "from the round before (round 1: the SFT model) and trained from it for max_steps / R steps.",
    )
    round_reference: str = arg("sft", pipeline.ROUND_REFERENCE_HELP)
    restart_stale: bool = arg(False, "Start over the stages whose settings changed (kept aside).")

    def beta_values(self) -> list[float]:
        return [float(b) for b in self.betas.split(",") if b.strip()]

    def bon_values(self) -> list[int]:
        return [int(n) for n in self.bon_n.split(",") if n.strip()]

    def method_names(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


DATA = ("dataset", "text_column", "model", "max_train_rows", "max_eval_rows", "prefix_words", "tiny_hidden_size",
        "tiny_layers", "sft_model", "skip_sft")  # fmt: skip
REWARD = ("reward_model", "reward_label", "reward_output")
TRAIN = ("per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "seed",
         "weight_decay", "bf16", "fp16", "max_length", "max_prompt_length", "model_init_kwargs")  # fmt: skip
LORA, BASELINES_KEYS = ("full", "lora_r", "lora_alpha"), ("baseline_learning_rate", "unlikelihood_alpha")


def stage_settings(script_args: ScriptArguments) -> list[StageSettings]:
    """What decides each stage's result, chained through the stages it builds on (`pipeline.StageSettings`)."""
    dpo = [
        StageSettings(f"dpo-beta{b:g}", LORA, pipeline.DPO_SETTINGS, ("pairs",))
        for b in script_args.beta_values()
    ]
    baselines = [StageSettings(m, LORA + BASELINES_KEYS, TRAIN + ("learning_rate", "max_steps"), ("pairs",))
                 for m in ("preferred-ft", "unlikelihood")]  # fmt: skip
    rounds = pipeline.round_stages(script_args.rounds, ("pair_prompts", "samples_per_prompt", "max_new_tokens") + REWARD,
                                   ("seed", "per_device_eval_batch_size"), LORA, ("beta",) + pipeline.DPO_SETTINGS,
                                   after=("sft",))  # fmt: skip
    evaluation = ("eval_prompts", "eval_samples_per_prompt", "max_new_tokens", "bon_n") + REWARD
    return [StageSettings("sft", DATA + ("sft_max_steps", "sft_learning_rate"), TRAIN),
            StageSettings("pairs", ("pair_prompts", "samples_per_prompt", "max_new_tokens") + REWARD,
                          ("seed", "per_device_eval_batch_size"), ("sft",)),
            *dpo, *baselines, *rounds,
            StageSettings("eval", evaluation, ("seed", "per_device_eval_batch_size"), tuple(s.name for s in dpo + baselines))]  # fmt: skip


def parse_args(argv: list[str]) -> tuple[ScriptArguments, DPOConfig]:
    def output_dir(script_args, config):  # no --output_dir: a new folder, named by the main process's clock
        return os.path.join("runs", f"sentiment-{time.strftime('%Y%m%d-%H%M%S')}")

    script_args, config = pipeline.parse_args(argv, ScriptArguments, OfflineDefaults(), output_dir)
    unknown = set(script_args.method_names()) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods takes {', '.join(METHODS)}; unknown: {', '.join(sorted(unknown))}.")
    if script_args.samples_per_prompt < 2:
        raise SystemExit("--samples_per_prompt must be at least 2 to make a pair.")
    if script_args.rounds < 1 or script_args.round_reference not in pipeline.ROUND_REFERENCES:
        raise SystemExit("--rounds must be >= 1 and --round_reference sft or previous.")
    try:
        low, high = (int(k) for k in script_args.prefix_words.split(","))
        betas, ns = script_args.beta_values(), script_args.bon_values()
    except ValueError as error:
        raise SystemExit(
            f"--prefix_words, --betas and --bon_n take comma-separated numbers: {error}"
        ) from error
    if not 1 <= low <= high:
        raise SystemExit(f"--prefix_words must be 'low,high' with 1 <= low <= high, got {script_args.prefix_words!r}.")  # fmt: skip
    if any(b <= 0 for b in betas) or any(n < 1 for n in ns):
        raise SystemExit("every β must be > 0 and every Best-of-N n >= 1.")
    return script_args, config


# ---------------------------------------------------------------- the pairs and baseline stages


def run_pairs(run: Run, script_args: ScriptArguments, sft: str, train) -> list[dict]:
    """N completions per training prefix from the SFT model, scored, and every informative pair of them.

    Writes `pairs/samples.jsonl` (prefix, completions, rewards) and `pairs/train.jsonl` (one row per
    pair with both rewards); a finished stage is read back.
    """
    from dpo_trainer.evaluation.best_of_n import all_preference_pairs, sample_and_score

    stage, config, n = run.stage("pairs"), run.config, script_args.samples_per_prompt
    samples_path, pairs_path = run.path("pairs", "samples.jsonl"), run.path("pairs", "train.jsonl")
    if not stage.finished(outputs=("samples.jsonl", "train.jsonl")):
        stage.start()
        prompts = pair_prefixes(script_args, train, config.seed)
        stats = {}
        if run.is_main:
            samples, scores = sample_and_score(
                pipeline.load_causal_lm(sft, config), pipeline.load_tokenizer(sft), prompts, make_scorer(script_args),
                n=n, temperature=1.0, max_new_tokens=script_args.max_new_tokens,
                batch_size=config.per_device_eval_batch_size, seed=config.seed,
            )  # fmt: skip
            pairs = all_preference_pairs(prompts, samples, scores)
            if not pairs:
                raise SystemExit(
                    "[pairs] every prefix's completions scored alike: no preference pair to train on."
                )
            pipeline.write_jsonl(samples_path, [{"prompt": p, "samples": s, "rewards": r}
                                                for p, s, r in zip(prompts, samples, scores)])  # fmt: skip
            pipeline.write_jsonl(pairs_path, pairs)
            gaps = [pair["chosen_score"] - pair["rejected_score"] for pair in pairs]
            stats = {"prompts": len(prompts), "samples_per_prompt": n, "pairs": len(pairs),
                     "mean_reward_gap": sum(gaps) / len(gaps),
                     "mean_sample_reward": sum(map(sum, scores)) / sum(map(len, scores))}  # fmt: skip
            print(f"[pairs] {len(pairs)} pairs from {len(prompts)} prefixes x {n} SFT completions in "
                  f"{time.time() - stage.started:.0f}s (mean reward gap {stats['mean_reward_gap']:.3f}): {pairs_path}")  # fmt: skip
        stage.finish(record=stats)
    return pipeline.read_jsonl(pairs_path)


def best_completion_rows(run: Run) -> list[dict]:
    """Preferred-FT's data: per prefix, its highest-reward completion (the first among equals) as chosen."""
    rows = []
    for entry in pipeline.read_jsonl(run.path("pairs", "samples.jsonl")):
        rewards, samples = entry["rewards"], entry["samples"]
        best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
        rows.append({"prompt": entry["prompt"], "chosen": samples[best], "rejected": samples[worst]})
    return rows


def run_baseline(run: Run, script_args: ScriptArguments, sft: str, method: str, rows: list[dict]) -> str:
    """Preferred-FT (SFT on each prefix's best completion) or Unlikelihood (on the pairs `rows`) from the SFT
    model; returns the policy's folder."""
    from dpo_trainer.sft import sft_trainer
    from dpo_trainer.unlikelihood import unlikelihood_trainer

    config = run.config
    learning_rate = script_args.baseline_learning_rate or config.learning_rate
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length)

    def trainer(folder):
        args = pipeline.training_args(config, folder, max_steps=config.max_steps, learning_rate=learning_rate,
                                      save_total_limit=2)  # fmt: skip
        model = pipeline.load_causal_lm(sft, config, peft_config=pipeline.lora_config(script_args))
        tokenizer = pipeline.load_tokenizer(sft)
        if method == "preferred_ft":
            return sft_trainer(model, tokenizer, args, best_completion_rows(run), **lengths)
        return unlikelihood_trainer(
            model, tokenizer, args, rows, alpha=script_args.unlikelihood_alpha, **lengths
        )

    return pipeline.train_stage(run, method.replace("_", "-"), trainer, {"learning_rate": learning_rate})


# ---------------------------------------------------------------- the eval stage


def run_eval(run: Run, script_args: ScriptArguments, sft: str, policies: dict[str, str], test,
             rounds: list[dict]) -> dict:  # fmt: skip
    """Sample, score and plot (main process); returns the summary's `eval` part (and fills in each of `rounds`)."""
    started, config, folder = time.time(), run.config, run.path("eval")
    low, high = (int(k) for k in script_args.prefix_words.split(","))
    splits = (split_review(text, index, low, high, config.seed) for index, text in enumerate(test["text"]))
    prompts = [split[0] for split in splits if split is not None][: script_args.eval_prompts]
    tokenizer, scorer = pipeline.load_tokenizer(sft), make_scorer(script_args)
    reference = pipeline.load_causal_lm(sft, config)
    sampling = dict(max_new_tokens=script_args.max_new_tokens, batch_size=config.per_device_eval_batch_size)

    def evaluate(name, path):  # a policy's folder, or None: the SFT model
        model = pipeline.load_policy(path, sft, config, for_sampling=False) if path else reference
        return frontier.evaluate_policy(os.path.join(folder, f"{name}.json"), model, path and reference, tokenizer,
                                        prompts, scorer, samples_per_prompt=script_args.eval_samples_per_prompt,
                                        seed=config.seed, **sampling)  # fmt: skip

    results = {"SFT": evaluate("sft", None)}
    print(f"[eval] SFT: reward {results['SFT']['reward']:.3f}")
    for name, path in policies.items():  # stage folders: dpo-beta0.1, preferred-ft, unlikelihood
        results[name] = evaluate(os.path.basename(os.path.dirname(path)), path)
        print(f"[eval] {name}: reward {results[name]['reward']:.3f}, KL {results[name]['kl']:.3f}")
    bon, ns = {}, script_args.bon_values()
    if ns:  # a draw of its own (seed + 1), not the SFT policy's samples again
        path = os.path.join(folder, f"best-of-{max(ns)}-samples.json")
        bon = frontier.evaluate_best_of_n(path, reference, tokenizer, prompts, scorer, ns, seed=config.seed + 1,
                                          **sampling)  # fmt: skip
    vader = script_args.reward_model == "vader"
    reward_label = "VADER compound" if vader else f"{script_args.reward_model} ({script_args.reward_output})"
    report = frontier.report(run, results, bon, list(BASELINES.values()), len(prompts), reward_label)
    dpo_points = report.pop("dpo_points")
    for entry in rounds:  # each round's samples kept under the fingerprint of the round that made the policy
        name = f"round{entry['round']}"
        entry.update(
            frontier.as_round(evaluate(f"{name}-{run.fingerprint(name)}", entry["policy"]), dpo_points)
        )
    if rounds:
        label = f"DPO rounds (β={config.beta:g}, reference {script_args.round_reference})"
        report["plots"].update(frontier.plot_rounds(run, rounds, results["SFT"], dpo_points, label,
                                                    len(prompts), reward_label))  # fmt: skip
    return {"reward": reward_label, "prompts": len(prompts), **report, "seconds": time.time() - started}


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    script_args, config = parse_args(sys.argv[1:] if argv is None else argv)
    run = Run.open(script_args, config, stage_settings(script_args), restart_stale=script_args.restart_stale)
    train, test = load_reviews(script_args.dataset, script_args.text_column, script_args.max_train_rows,
                               script_args.max_eval_rows)  # fmt: skip
    base = pipeline.base_model(run, script_args.model, train["text"], vocab_size=800,
                               hidden_size=script_args.tiny_hidden_size, layers=script_args.tiny_layers)  # fmt: skip
    sft = script_args.sft_model or base
    if not (script_args.sft_model or script_args.skip_sft):
        sft = pipeline.sft_stage(run, base, review_rows(train, script_args, config.seed),
                                 max_steps=script_args.sft_max_steps, learning_rate=script_args.sft_learning_rate)  # fmt: skip

    methods = script_args.method_names()
    betas = script_args.beta_values() if "dpo" in methods else []
    baselines = {name: method for method, name in BASELINES.items() if method in methods}
    policies = {}  # display name -> folder
    if not script_args.skip_train:
        pairs = run_pairs(run, script_args, sft, train)
        rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
        for beta in betas:  # DPO from the SFT model, also the reference
            policies[f"DPO β={beta:g}"] = pipeline.dpo_stage(run, f"dpo-beta{beta:g}", sft, rows, beta=beta,
                peft_config=pipeline.lora_config(script_args), record={"beta": beta})  # fmt: skip
        for name, method in baselines.items():
            policies[name] = run_baseline(run, script_args, sft, method, rows)
    else:  # an earlier run's policies
        stages = {f"DPO β={b:g}": f"dpo-beta{b:g}" for b in betas}
        stages.update({name: method.replace("_", "-") for name, method in baselines.items()})
        policies = {name: run.path(stage, "final") for name, stage in stages.items()
                    if os.path.exists(run.path(stage, "final"))}  # fmt: skip

    rounds = []  # iterative DPO at --beta, each round max_steps / R steps on its part of the pair prefixes
    if script_args.rounds > 1 and not script_args.skip_train:
        sampling = dict(n=script_args.samples_per_prompt, rule="margin", temperature=1.0, seed=config.seed,
                        max_new_tokens=script_args.max_new_tokens, batch_size=config.per_device_eval_batch_size)  # fmt: skip
        rounds = pipeline.run_rounds(run, script_args.rounds, pair_prefixes(script_args, train, config.seed), sft,
                                     make_scorer(script_args), sampling=sampling, reference=script_args.round_reference,
                                     peft_config=pipeline.lora_config(script_args),
                                     max_steps=-(-config.max_steps // script_args.rounds))  # fmt: skip
    summary = {"output_dir": run.out, "sft_model": sft, "policies": policies}
    if not script_args.skip_eval and run.is_main:
        summary["eval"] = run_eval(run, script_args, sft, policies, test, rounds)
    summary.update({"rounds": rounds} if rounds else {})
    if run.is_main:
        stages = run.done(["sft", "pairs"] + [os.path.basename(os.path.dirname(p)) for p in policies.values()]
                          + [f"round{r}{part}" for r in range(1, len(rounds) + 1) for part in ("_pairs", "")])  # fmt: skip
        summary.update({"stages": stages} if stages else {})
        summary["seconds"] = time.time() - started
        run.write_summary(summary, note=f" ({summary['seconds']:.0f}s)")
    return summary


if __name__ == "__main__":
    pipeline.run_script(main)
