"""examples/accelerate/*.yaml: read by accelerate's own loader and launcher into the intended engine.

Each file goes through what `accelerate launch --config_file F` does before it starts processes: the
config loader (`load_config_from_file`), the launch-argument merge (`_validate_launch_command`) and the
environment the launcher hands to the processes; from that environment accelerate's FSDP and DeepSpeed
plugins are built as the training processes build them. So a misspelt field (ignored silently by the
loader) fails here. The README must document every file.
"""

import os
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
FILES = (
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "deepspeed_zero3_offload.yaml",
    "fsdp2.yaml",
)


def _launch_environment(name: str) -> dict[str, str]:
    """The accelerate variables `accelerate launch --config_file <name> examples/hh.py` gives its processes."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "examples/hh.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (
            ["mixed_precision"] if mixed_precision_from_config else []
        )
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture
def launched(monkeypatch):
    """Set the launch environment of a config file, as a training process sees it."""

    def apply(name: str) -> dict[str, str]:
        for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
            monkeypatch.delenv(key)
        env = _launch_environment(name)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    return apply


def test_every_config_is_here_has_a_header_and_is_documented():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(FILES)
    readme = (CONFIGS / "README.md").read_text()
    for name in FILES:
        assert (CONFIGS / name).read_text().startswith("# "), (
            f"{name}: no header comment saying when to use it"
        )
        assert f"## {name}" in readme, f"README.md has no section for {name}"
        assert f"accelerate launch --config_file examples/accelerate/{name}" in readme, name


@pytest.mark.parametrize("name", FILES)
def test_common_fields(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False and config.num_machines == 1
    expected = 1 if name == "single_gpu.yaml" else 8
    assert config.num_processes == expected


def test_single_gpu_and_ddp():
    single = load_config_from_file(str(CONFIGS / "single_gpu.yaml"))
    assert single.distributed_type == DistributedType.NO
    ddp = load_config_from_file(str(CONFIGS / "multi_gpu.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU
    assert ddp.deepspeed_config == {} and ddp.fsdp_config == {}


@pytest.mark.parametrize(
    ("name", "stage", "offload", "zero3_init"),
    [
        ("deepspeed_zero2.yaml", 2, "none", False),
        ("deepspeed_zero3.yaml", 3, "none", True),
        ("deepspeed_zero3_offload.yaml", 3, "cpu", True),
    ],
)
def test_deepspeed_configs(name, stage, offload, zero3_init, launched):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.deepspeed_config["offload_optimizer_device"] == offload
    assert config.deepspeed_config["offload_param_device"] == offload
    assert config.deepspeed_config["zero3_init_flag"] is zero3_init

    env = launched(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()  # what each training process builds from that environment
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == offload
    assert zero["offload_param"]["device"] == offload
    assert plugin.zero3_init_flag is zero3_init
    if stage == 3:  # save_model gathers a normal 16-bit checkpoint
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # Batch sizes and clipping are left to the Trainer's flags.
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


def test_fsdp2_config(launched):
    config = load_config_from_file(str(CONFIGS / "fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_activation_checkpointing"] is False

    env = launched("fsdp2.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import OffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin()  # what each training process builds from that environment
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None  # read from the model's _no_split_modules
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.activation_checkpointing is False
    assert type(plugin.cpu_offload) is OffloadPolicy  # no CPU offload (CPUOffloadPolicy would be)
