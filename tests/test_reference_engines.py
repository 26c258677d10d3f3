"""How the frozen reference is prepared for each engine (the parts that run without the engines).

The engines themselves run in tests/test_engines.py (two CPU processes); here: the DeepSpeed config the
reference engine gets, the frozen copy, and the no-engine preparation.
"""

import copy

import torch

from dpo_trainer import DPOTrainer
from dpo_trainer.placement import deepspeed_inference_config, frozen_copy

from conftest import dpo_config


def _run_config(stage: int) -> dict:
    """A DeepSpeed config as transformers hands it over before training starts ("auto" sizes unfilled)."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-6}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 150}},
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"},
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "overlap_comm": True,
        },
    }


def test_zero3_reference_config_partitions_without_an_optimizer(make_model):
    model = make_model(hidden_size=32)
    run = _run_config(3)
    original = copy.deepcopy(run)
    config = deepspeed_inference_config(run, model)
    assert run == original  # the run's own config is untouched
    assert "optimizer" not in config and "scheduler" not in config  # nothing for DeepSpeed to build
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert "offload_optimizer" not in zero
    assert zero["offload_param"] == {"device": "cpu"}  # the reference's weights are offloaded too
    assert zero["reduce_bucket_size"] == 32 * 32  # sized for the hidden size, as transformers does
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 32 * 32)
    assert zero["stage3_param_persistence_threshold"] == 10 * 32
    assert zero["overlap_comm"] is True and config["bf16"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 2


def test_zero2_reference_config_is_a_stage0_replica(make_model):
    config = deepspeed_inference_config(_run_config(2), make_model())
    zero = config["zero_optimization"]
    assert zero["stage"] == 0  # a frozen model has no optimizer state or gradients to shard
    assert "auto" not in zero.values()  # left to DeepSpeed's defaults, not handed over unfilled
    assert "optimizer" not in config and "offload_optimizer" not in zero


def test_frozen_copy_has_the_weights_in_separate_tensors(make_model):
    model = make_model(seed=4)
    copied = frozen_copy(model)
    for (name, a), b in zip(model.state_dict().items(), copied.state_dict().values()):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr(), name


def test_reference_without_an_engine_is_placed_but_not_registered(tmp_path, make_model, tokenizer, pairs):
    # accelerate.prepare_model (device and the run's autocast) lists the model among those it trains and
    # checkpoints; the reference is neither, and Trainer reads an empty list as "prepare the policy first"
    # when evaluate() runs before train().
    trainer = DPOTrainer(
        make_model(seed=2),
        ref_model=make_model(seed=2),
        args=dpo_config(tmp_path),
        train_dataset=pairs,
        eval_dataset=pairs[:4],
        processing_class=tokenizer,
    )
    assert trainer.accelerator._models == []
    assert trainer.ref_model.training is False
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    assert trainer.evaluate()["eval_rewards/margins"] == 0.0  # policy == reference before training
