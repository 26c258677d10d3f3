"""The reward/KL frontier of `sentiment.py` (Rafailov et al. 2023, Fig. 2 left): a policy's mean reward and its
KL from the reference, each with its standard error, Best-of-N's points, and whether DPO's curve reaches a
baseline's reward at the baseline's KL. Results are cached as JSON files (a rerun reads them back)."""

from __future__ import annotations

from pipeline import cached_json, print_table, unwritable


def evaluate_policy(path: str, model, reference, tokenizer, prompts, scorer, *, samples_per_prompt: int,
                    max_new_tokens: int, batch_size: int, seed: int, with_samples: bool = False) -> dict:  # fmt: skip
    """Samples of ``model`` on ``prompts`` at temperature 1: mean reward and KL(model ‖ reference), each with its
    standard error (``reference=None``: the model is the reference, KL 0). Cached at ``path`` with the samples;
    ``with_samples``: ``{"result", "samples"}`` (each sample's prompt, completion, reward and log-ratio)."""
    from dpo_trainer.evaluation.kl import KLEstimate, mean_and_stderr, sequence_kl
    from dpo_trainer.evaluation.sampling import sample_responses

    def compute() -> dict:
        k = samples_per_prompt
        ids = sample_responses(
            model,
            tokenizer,
            prompts,
            temperature=1.0,  # the KL estimate needs samples from π itself
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            num_samples=k,
            seed=seed,
            return_token_ids=True,
        )
        flat_prompts = [prompt for prompt in prompts for _ in range(k)]
        flat_ids = [row for rows in ids for row in rows]
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in flat_ids]
        rewards = scorer.score(flat_prompts, texts)
        prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in flat_prompts]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if reference is None:
            kl = KLEstimate(mean=0.0, stderr=0.0, n=len(flat_ids), log_ratios=(0.0,) * len(flat_ids))
        else:
            kl = sequence_kl(model, reference, prompt_ids, flat_ids, batch_size=batch_size, pad_token_id=pad)
        reward, reward_se = mean_and_stderr(rewards)
        result = {"reward": reward, "reward_stderr": reward_se, "kl": kl.mean, "kl_stderr": kl.stderr,
                  "n": len(texts)}  # fmt: skip
        samples = [
            {"prompt": p, "completion": t, "reward": r, "log_ratio": lr}
            for p, t, r, lr in zip(flat_prompts, texts, rewards, kl.log_ratios)
        ]
        return {"result": result, "samples": samples}

    valid = lambda found: isinstance(found, dict) and "result" in found  # noqa: E731
    found = cached_json(path, compute, collective=False, valid=valid)
    return found if with_samples else found["result"]


def evaluate_best_of_n(path: str, model, tokenizer, prompts, scorer, ns: list[int], *, max_new_tokens: int,
                       batch_size: int, seed: int) -> dict[int, dict]:  # fmt: skip
    """Best-of-N over ``model`` (the reference) for every N of ``ns`` from one draw at the largest N (cached at
    ``path``): the best sample's mean reward, and KL's bound log N - (N-1)/N."""
    from dpo_trainer.evaluation.best_of_n import best_of_n_prefixes, sample_and_score
    from dpo_trainer.evaluation.kl import best_of_n_kl, mean_and_stderr

    def draw() -> list:
        return list(
            sample_and_score(
                model,
                tokenizer,
                prompts,
                scorer,
                n=max(ns),
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                seed=seed,
            )  # fmt: skip
        )

    valid = lambda found: isinstance(found, list) and len(found) == 2  # noqa: E731
    samples, scores = cached_json(path, draw, collective=False, valid=valid, indent=None)
    results = {}
    for n, (_, best_scores, _) in best_of_n_prefixes(samples, scores, ns).items():
        reward, reward_se = mean_and_stderr(best_scores)
        results[n] = {"reward": reward, "reward_stderr": reward_se, "kl": best_of_n_kl(n), "kl_stderr": 0.0,
                      "n": len(best_scores)}  # fmt: skip
    return results


def reward_at_kl(points: list[dict], kl: float) -> float | None:
    """The reward of the piecewise-linear curve through ``points`` (sorted by KL) at ``kl``; None outside it."""
    ordered = sorted(points, key=lambda p: p["kl"])
    for left, right in zip(ordered, ordered[1:]):
        if left["kl"] <= kl <= right["kl"]:
            if right["kl"] == left["kl"]:
                return max(left["reward"], right["reward"])
            t = (kl - left["kl"]) / (right["kl"] - left["kl"])
            return left["reward"] + t * (right["reward"] - left["reward"])
    if len(ordered) == 1 and ordered[0]["kl"] == kl:
        return ordered[0]["reward"]
    return None


def compare_at_matched_kl(dpo_points: list[dict], baseline: dict) -> dict:
    """Is DPO's reward at least ``baseline``'s at the baseline's KL?

    "yes" when the DPO curve (linear between its β points) reaches the baseline's reward at its KL, or a DPO
    point has no more KL and at least the reward (dominates); "no" when the curve is below it there, or the
    baseline dominates a DPO point; "inconclusive" otherwise (the baseline's KL is outside DPO's range).
    """
    at = reward_at_kl(dpo_points, baseline["kl"])
    verdict = None
    if at is not None:
        verdict = "yes" if at >= baseline["reward"] else "no"
    elif any(p["kl"] <= baseline["kl"] and p["reward"] >= baseline["reward"] for p in dpo_points):
        verdict = "yes"
    elif any(p["kl"] >= baseline["kl"] and p["reward"] <= baseline["reward"] for p in dpo_points):
        verdict = "no"
    return {"baseline_kl": baseline["kl"], "baseline_reward": baseline["reward"], "dpo_reward_at_kl": at,
            "dpo_at_least_baseline": verdict or "inconclusive"}  # fmt: skip


def print_results(results: dict, comparisons: dict, prompts: int, reward_label: str) -> None:
    """The table of every method's reward and KL, and each verdict of `compare_at_matched_kl`."""
    rows = [[name, f"{r['reward']:.3f} ± {r['reward_stderr']:.3f}",
             f"{r['kl']:.3f} (bound)" if name.startswith("Best of") else f"{r['kl']:.3f} ± {r['kl_stderr']:.3f}", r["n"]]
            for name, r in results.items()]  # fmt: skip
    title = f"\n[eval] {prompts} held-out prefixes, reward: {reward_label}; ± one standard error"
    print_table(["method", "reward", "KL(π‖π_ref)", "samples"], rows, [18, 20, 20, 9], title)
    for name, c in comparisons.items():
        at = (
            "(outside the β points' KL range)"
            if c["dpo_reward_at_kl"] is None
            else f"{c['dpo_reward_at_kl']:.3f}"
        )
        print(f"DPO vs {name} at {name}'s KL {c['baseline_kl']:.3f}: DPO {at}, {name} {c['baseline_reward']:.3f} "
              f"-> DPO at least {name}: {c['dpo_at_least_baseline']}")  # fmt: skip


def draw(run, name: str, groups: dict, title: str, reward_label: str) -> dict[str, str]:
    """`plots/<name>.png` of `groups` (`plot_frontier`), as {name: path}; {} when the plots folder cannot be written
    (a finished run on read-only storage, summarised again: its plot kept as it was)."""
    from dpo_trainer.evaluation.plots import plot_frontier

    read_only = unwritable(run.path("plots"))
    if read_only:
        print(f"[eval] plot not drawn: {run.path('plots')} cannot be written ({read_only}).")
        return {}
    largest = max(point["kl"] for points in groups.values() for point in points)
    path = plot_frontier(groups, run.path("plots", f"{name}.png"), title=title, reward_label=f"Mean reward ({reward_label})",
                         kl_scale="symlog" if largest > 10 else "linear")  # fmt: skip
    return {name: str(path)}


def report(run, results: dict, bon: dict, baselines: list[str], prompts: int, reward_label: str) -> dict:
    """The frontier plot, the matched-KL verdicts against each baseline in ``results`` and the table; returns
    ``{"results", "dpo_vs_baselines_at_matched_kl", "plots", "dpo_points"}`` (the DPO β points, labelled)."""
    baselines = [name for name in baselines if name in results]
    dpo_points = [
        dict(r, label=f"β={name.split('=')[1]}") for name, r in results.items() if name.startswith("DPO β=")
    ]
    results = {**results, **{f"Best of {n}": result for n, result in bon.items()}}
    groups = {"SFT": [dict(results["SFT"], label="")]} | ({"DPO": dpo_points} if dpo_points else {})
    groups.update({name: [dict(results[name], label="")] for name in baselines})
    if bon:
        groups["Best-of-N (SFT)"] = [dict(r, label=f"N={n}") for n, r in bon.items()]
    plots = draw(run, "frontier", groups, f"Reward against KL, {prompts} held-out prefixes", reward_label)
    comparisons = {name: compare_at_matched_kl(dpo_points, results[name]) for name in baselines if dpo_points}
    print_results(results, comparisons, prompts, reward_label)
    return {
        "results": results,
        "dpo_vs_baselines_at_matched_kl": comparisons,
        "plots": plots,
        "dpo_points": dpo_points,
    }


def as_round(result: dict, dpo_points: list[dict]) -> dict:
    """A round's entry of ``summary["rounds"]`` from its `evaluate_policy` result: ``reward``, ``reward_se``, ``kl``,
    ``kl_se``, and the single-round DPO curve over the β points (linear between them; None outside their KL range)
    at the round's KL: its reward and standard error (each interpolated)."""
    at = reward_at_kl(dpo_points, result["kl"])
    se = reward_at_kl([dict(p, reward=p["reward_stderr"]) for p in dpo_points], result["kl"])
    return {"reward": result["reward"], "reward_se": result["reward_stderr"], "kl": result["kl"],
            "kl_se": result["kl_stderr"], "n": result["n"], "single_round_reward_at_kl": at,
            "single_round_reward_se_at_kl": se}  # fmt: skip


def plot_rounds(run, rounds: list[dict], sft: dict, dpo_points: list[dict], label: str, prompts: int,
                reward_label: str) -> dict[str, str]:  # fmt: skip
    """`plots/rounds.png`: one marker per round next to the single-round DPO curve over β, and the table."""
    rows = [[f"round {e['round']}", f"{e['reward']:.3f} ± {e['reward_se']:.3f}", f"{e['kl']:.3f} ± {e['kl_se']:.3f}",
             "-" if e["single_round_reward_at_kl"] is None else
             f"{e['single_round_reward_at_kl']:.3f} ± {e['single_round_reward_se_at_kl']:.3f}", e["pairs"]]
            for e in rounds]  # fmt: skip
    title = f"\n[eval] {label}, {prompts} held-out prefixes; ± one standard error"
    print_table(
        ["round", "reward", "KL(π‖π_SFT)", "1-round DPO at KL", "pairs"], rows, [10, 18, 18, 20, 8], title
    )
    points = [
        dict(e, reward_stderr=e["reward_se"], kl_stderr=e["kl_se"], label=f"round {e['round']}")
        for e in rounds
    ]
    groups = {"SFT": [dict(sft, label="")]} | ({"DPO (one round)": dpo_points} if dpo_points else {})
    return draw(
        run,
        "rounds",
        groups | {label: points},
        f"On-policy rounds, {prompts} held-out prefixes",
        reward_label,
    )
