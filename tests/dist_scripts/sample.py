"""Sample from a saved model with `sample_responses(..., across_processes=True)` in every process of a
distributed run; each process writes what it got to `<out>/rank<R>.json`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 sample.py MODEL_DIR OUT PROMPTS_JSON
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from accelerate import PartialState
from dpo_trainer.evaluation.sampling import sample_responses
from process_group import process_group_closed


def main(model_dir: str, out: str, prompts_path: str) -> None:
    state = PartialState(cpu=not torch.cuda.is_available())  # joins torchrun's processes (gloo on CPU)
    torch.set_num_threads(1)
    with open(prompts_path) as handle:
        settings = json.load(handle)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(state.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = sample_responses(
        model, tokenizer, settings.pop("prompts"), across_processes=True, disable_progress=True, **settings
    )
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as handle:
        json.dump({"num_processes": state.num_processes, "samples": samples}, handle)


if __name__ == "__main__":
    with process_group_closed():
        main(*sys.argv[1:])
