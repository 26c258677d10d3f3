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
    try:
        main(*sys.argv[1:])
    finally:  # a gloo/NCCL group left for interpreter exit can abort the process ("terminate called ...")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
