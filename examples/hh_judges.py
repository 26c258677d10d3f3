"""The judges of `hh.py`: the one its flags name (the bundled rule, an LLM judge, a reward model), the checks on
the judge and sampling flags, and the per-round evaluation of its on-policy rounds: each round's policy against
the SFT model on the held-out prompts."""

from __future__ import annotations

import os
from dataclasses import asdict

import frontier
import pipeline
from hh_data import rule_score


def validate_flags(script_args) -> None:
    """Check the judge and sampling flags before any training, not after hours of it."""
    from dpo_trainer.evaluation.judges import TASK_PROMPTS

    for name in ("temperatures", "bon_temperatures"):
        for text in getattr(script_args, name).split(","):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{name} must be comma-separated numbers, got {text!r}.") from None
            if not (value >= 0 and value != float("inf")):
                raise SystemExit(f"--{name}: a temperature must be a finite number >= 0, got {text!r}.")
    for text in script_args.bon_n.split(","):
        if not text.strip().isdigit():
            raise SystemExit(f"--bon_n must be comma-separated whole numbers >= 0, got {text!r}.")
    if script_args.judge_task not in TASK_PROMPTS:
        tasks = ", ".join(TASK_PROMPTS)
        raise SystemExit(f"--judge_task must be one of {tasks}, got {script_args.judge_task!r}.")
    if script_args.sft_samples_per_prompt == 1 or script_args.sft_samples_per_prompt < 0:
        raise SystemExit("--sft_samples_per_prompt must be 0 (the dataset's pairs) or at least 2.")
    needs_judge = not script_args.skip_eval or script_args.sft_samples_per_prompt or script_args.rounds > 1
    if needs_judge and script_args.judge == "llm":
        make_judge(script_args)  # checks the URL and model flags; sends nothing
    if needs_judge and script_args.judge == "reward" and not script_args.reward_model:
        raise SystemExit("--judge reward needs --reward_model.")


def make_judge(script_args, cache_dir: str | None = None):
    """The judge the flags name; an LLM judge keeps its replies in `cache_dir` (reused on a rerun)."""
    from dpo_trainer.evaluation import LLMJudge, RewardModelJudge, RuleJudge

    if script_args.judge == "llm":
        if not (script_args.judge_url and script_args.judge_model):
            raise SystemExit("--judge llm needs --judge_url and --judge_model.")
        cache_file = os.path.join(cache_dir, "llm_judge_replies.jsonl") if cache_dir else None
        try:
            return LLMJudge(script_args.judge_url, script_args.judge_model, task=script_args.judge_task,
                            cache_file=cache_file)  # fmt: skip
        except ValueError as error:
            raise SystemExit(f"--judge llm: {error}") from None
    if script_args.judge == "reward":
        if not script_args.reward_model:
            raise SystemExit("--judge reward needs --reward_model.")
        return RewardModelJudge.from_pretrained(script_args.reward_model, device=pipeline.sampling_device())
    return RuleJudge(rule_score)


def scoring_judge(script_args):
    judge = make_judge(script_args)
    if not hasattr(judge, "score"):
        raise SystemExit(
            "--sft_samples_per_prompt and --rounds need a judge that scores responses: --judge rule or reward."
        )
    return judge


def judge_rounds(run, script_args, sft: str, rounds: list[dict], prompts: list[str]) -> None:
    """Each round's policy against the SFT model (main process): one sample per held-out prompt from each at
    temperature 1, judged pairwise; fills in each entry of `rounds` with `reward` = the win rate against SFT
    (ties half), `reward_se` = its binomial standard error sqrt(p(1-p)/n), `win_rate` (with its interval),
    `kl` / `kl_se` = KL(π‖π_SFT) estimated on the same samples, and `score` / `score_se`, the judge's mean
    score (a scoring judge). Samples are kept under the eval stage's and each round's settings fingerprints."""
    from dpo_trainer.evaluation import win_rate

    config, folder = run.config, run.path("eval", run.fingerprint("eval"))
    tokenizer, judge, reference = (
        pipeline.load_tokenizer(sft),
        scoring_judge(script_args),
        pipeline.load_causal_lm(sft, config),
    )
    sampling = dict(samples_per_prompt=1, max_new_tokens=script_args.max_new_tokens, seed=config.seed,
                    batch_size=config.per_device_eval_batch_size)  # fmt: skip

    def sample(name: str, model, ref) -> tuple[dict, list[str]]:
        found = frontier.evaluate_policy(os.path.join(folder, f"{name}.json"), model, ref, tokenizer, prompts, judge,
                                         with_samples=True, **sampling)  # fmt: skip
        return found["result"], [row["completion"].strip() for row in found["samples"]]

    _, sft_samples = sample("round0-sft", reference, None)
    rows = []
    for entry in rounds:
        name = f"round{entry['round']}"
        model = pipeline.load_policy(entry["policy"], sft, config, for_sampling=False)
        result, samples = sample(f"{name}-{run.fingerprint(name)}", model, reference)
        rate = win_rate(judge.compare(prompts, samples, sft_samples))
        entry.update(reward=rate.rate, reward_se=(rate.rate * (1 - rate.rate) / max(rate.n, 1)) ** 0.5,
                     win_rate=asdict(rate), kl=result["kl"], kl_se=result["kl_stderr"], score=result["reward"],
                     score_se=result["reward_stderr"])  # fmt: skip
        rows.append([f"round {entry['round']}", f"{rate.rate:.3f} [{rate.low:.3f}, {rate.high:.3f}]",
                     f"{entry['kl']:.3f} ± {entry['kl_se']:.3f}", entry["pairs"]])  # fmt: skip
    title = (f"\n[eval] each round against the SFT model ({script_args.judge} judge, T=1, {len(prompts)} held-out "
             f"prompts; reference {script_args.round_reference})")  # fmt: skip
    pipeline.print_table(["round", "win rate vs SFT", "KL(π‖π_SFT)", "pairs"], rows, [10, 26, 20, 8], title)
