"""A DPOConfig built without `use_cpu` in each process of a launch; launched by tests/test_examples_multiprocess.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 launched_config.py OUT

Each process writes ``OUT/rank<r>.json``: what its config made of the launch (process index, world size,
parallel mode, use_cpu, bf16, device).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dpo_trainer import DPOConfig  # noqa: E402
from process_group import process_group_closed  # noqa: E402


def main(out: str) -> None:
    config = DPOConfig(output_dir=os.path.join(out, "run"), report_to="none")
    seen = {
        "process_index": config.process_index,
        "world_size": config.world_size,
        "parallel_mode": config.parallel_mode.value,
        "use_cpu": config.use_cpu,
        "bf16": config.bf16,
        "device": config.device.type,
    }
    with open(os.path.join(out, f"rank{config.process_index}.json"), "w") as handle:
        json.dump(seen, handle)


if __name__ == "__main__":
    with process_group_closed():
        main(sys.argv[1])
