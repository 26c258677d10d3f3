"""Build on-policy pairs (`on_policy_pairs`) from a saved model in every process of a distributed run, twice
with the same cache folder; each process writes what it got to `<out>/rank<R>.json`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 onpolicy_pairs.py MODEL_DIR OUT SETTINGS_JSON

SETTINGS_JSON holds the prompts and the keyword arguments; the scorer is `word_count` (`RuleJudge`). Each
process also records how many generate() and scorer calls it made, and what a scorer that fails on the main
process raised on each process.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from accelerate import PartialState
from dpo_trainer.evaluation import RuleJudge, on_policy_pairs
from process_group import process_group_closed


def word_count(prompt: str, response: str) -> float:
    """The scorer of the test: words in the response (many ties, so the tie handling is exercised)."""
    return float(len(response.split()))


def main(model_dir: str, out: str, settings_path: str) -> None:
    state = PartialState(cpu=not torch.cuda.is_available())  # joins torchrun's processes (gloo on CPU)
    torch.set_num_threads(1)
    with open(settings_path) as handle:
        settings = json.load(handle)
    prompts = settings.pop("prompts")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(state.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calls = {"generate": 0, "score": 0}
    generate, score = model.generate, RuleJudge.score

    def counted_generate(*args, **kwargs):
        calls["generate"] += 1
        return generate(*args, **kwargs)

    class CountedJudge(RuleJudge):
        def score(self, prompts, responses):
            calls["score"] += 1
            return score(self, prompts, responses)

    model.generate = counted_generate
    scorer = CountedJudge(word_count, disable_progress=True)
    runs = {}
    for name in ("first", "again"):  # "again" must read every chunk that "first" wrote
        made = on_policy_pairs(model, tokenizer, prompts, scorer, disable_progress=True, **settings)
        runs[name] = {
            "rows": made.rows,
            "samples": made.samples,
            "scores": made.scores,
            "counts": made.counts,
        }
    runs["calls"] = dict(calls)

    def fail_on_main(prompt: str, response: str) -> float:
        raise ValueError("the judge is down")

    settings.pop("cache_dir", None)
    try:
        on_policy_pairs(model, tokenizer, prompts, RuleJudge(fail_on_main, disable_progress=True), **settings)
        runs["failure"] = None
    except Exception as error:  # every process must raise, none may wait for scores that never come
        runs["failure"] = f"{type(error).__name__}: {error}"
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as handle:
        json.dump({"num_processes": state.num_processes, **runs}, handle)


if __name__ == "__main__":
    with process_group_closed():
        main(*sys.argv[1:])
