"""What the launch environment decides for a `DPOConfig`: whether this machine can train in bf16 (TRL's default
precision, else float32 with `BF16_FALLBACK` said), and whether several launched processes without an
accelerator train as one data-parallel run on the CPU (`use_cpu=True`, `MULTI_CPU_LAUNCH` said)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import DPOConfig

logger = logging.getLogger(__name__)


BF16_FALLBACK = (
    "DPOConfig: this machine has no bf16 support (no bf16 GPU and use_cpu=False), so training runs in float32 "
    "instead of TRL's default bf16. Pass use_cpu=True for bf16 autocast on the CPU as TRL does, or bf16=False "
    "to choose float32 explicitly."
)


MULTI_CPU_LAUNCH = (
    "DPOConfig: {processes} processes were launched on a machine without an accelerator, so use_cpu=True: they "
    "train as one data-parallel run on the CPU (gloo). Without it, transformers gives each process world_size 1 "
    "and each would train alone on all the data."
)


def _launched_processes() -> int:
    """How many processes the launcher started (torchrun, accelerate launch, mpirun), as accelerate counts them."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return 1


def use_cpu_for_launched_processes(config: DPOConfig) -> None:
    """Several launched processes on a machine without an accelerator: set `use_cpu=True`, so that they train
    as one data-parallel run (accelerate's MULTI_CPU, gloo).

    Without `use_cpu`, accelerate (1.16) builds its multi-process state only for an accelerator, and every
    process trains alone on all the data (transformers only logs "process group is initialized, but
    parallel_mode != ParallelMode.DISTRIBUTED"). An MPS device has no multi-process backend: refused, with what
    to pass. Left alone: DeepSpeed, asked for by the field or by accelerate's launcher (transformers would drop
    it under `use_cpu`), and a state configured beforehand (`accelerator_config={"use_configured_state": True}`).
    """
    from transformers.utils import (
        is_torch_cuda_available,
        is_torch_hpu_available,
        is_torch_mlu_available,
        is_torch_mps_available,
        is_torch_musa_available,
        is_torch_neuron_available,
        is_torch_npu_available,
        is_torch_xla_available,
        is_torch_xpu_available,
    )

    def environment_says(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")

    processes = _launched_processes()
    configured = config.accelerator_config  # a dict, an AcceleratorConfig, a JSON file's path or None
    if isinstance(configured, dict):
        configured = configured.get("use_configured_state", False)
    else:
        configured = getattr(configured, "use_configured_state", False)
    deepspeed = config.deepspeed or environment_says("ACCELERATE_USE_DEEPSPEED")
    if processes < 2 or config.use_cpu or environment_says("ACCELERATE_USE_CPU") or deepspeed or configured:
        return
    accelerators = (is_torch_cuda_available, is_torch_xpu_available, is_torch_npu_available, is_torch_mlu_available,
                    is_torch_musa_available, is_torch_hpu_available, is_torch_neuron_available, is_torch_xla_available)  # fmt: skip
    if any(available() for available in accelerators):
        return
    if is_torch_mps_available():
        raise ValueError(
            f"DPOConfig: {processes} processes were launched, but this machine's accelerator (MPS) cannot run "
            "several processes as one data-parallel run; each would train alone on all the data. Launch one "
            "process, or pass use_cpu=True (--use_cpu) to train data-parallel on the CPU."
        )
    config.use_cpu = True
    logger.info(MULTI_CPU_LAUNCH.format(processes=processes))


def bf16_supported(use_cpu: bool) -> bool:
    """Whether `TrainingArguments` accepts `bf16=True` here (its own test: CPU autocast, or a bf16 device)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()
