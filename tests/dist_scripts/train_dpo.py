"""Train DPOTrainer on a tiny model and dump what it logged; launched by tests/test_multiprocess.py and
tests/test_engines.py.

Run it with one process (``python train_dpo.py ...``) or on two CPU processes
(``python -m torch.distributed.run --standalone --nproc_per_node 2 train_dpo.py ...``, gloo backend), as
plain DDP (``--engine ddp``), FSDP2 (``--engine fsdp2``) or DeepSpeed (``--engine zero2`` / ``zero3``).
For every mode in ``--modes`` it evaluates a fresh model on a held-out set, trains it, evaluates it again,
and writes, from rank 0, ``<out>/<mode>.json``: the per-step train logs (loss and DPO metrics), the eval metrics, the
examples of each global batch (gathered from all ranks), when precomputed the reference log-probs, and
what the engine made of the models (parameter types, the reference's wrapper). Modes: ``live`` (a frozen
copy of the policy as the reference), ``precompute`` (reference log-probs computed before training),
``lora`` (a LoRA adapter; the reference is the policy with its adapter disabled), ``zero_init`` (ZeRO-3
only: ``live`` with the policy built after its DPOConfig, so partitioned by ``deepspeed.zero.Init``) and
``ram_efficient`` (FSDP2 only: ``live`` with ``cpu_ram_efficient_loading``: only rank 0's weights count,
sharding sends them to the others; the other ranks' copies are zeroed to prove it). Each rank saves its final
weights to ``<out>/<mode>-rank<r>.safetensors``; under FSDP2 and ZeRO-3 only rank 0, which gathers them.

accelerate turns FSDP and DeepSpeed on only for accelerator devices (with ``use_cpu`` it silently runs
DDP), so ``engine_arguments`` nudges its state on CPU: see there.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)  # for conftest.preference_rows
try:
    import dpo_trainer  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "src"))

import torch  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dpo_trainer import DPOConfig, DPOTrainer  # noqa: E402
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer  # noqa: E402
from process_group import process_group_closed  # noqa: E402

from conftest import preference_rows  # noqa: E402

TRAIN_ROWS, EVAL_ROWS, GLOBAL_BATCH = 16, 7, 4


def noisy_rows(n: int, seed: int) -> list[dict]:
    """conftest's polite-vs-rude pairs with every third label flipped: the task is otherwise so easy that
    every accuracy is 0 or 1 after one step, and fractional accuracies make a better check of the means."""
    rows = preference_rows(n, seed=seed)
    for row in rows[::3]:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return rows


def make_tokenizer():
    # The same texts and vocabulary as conftest's `tokenizer` fixture.
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in preference_rows(300, seed=123)]
    texts += ["\n\nHuman: hello\n\nAssistant: hi there"] * 3
    return train_tokenizer(texts, vocab_size=400)


class RecordingDPOTrainer(DPOTrainer):
    """Records the examples of every global training batch, gathered from all processes.

    Data order: the Trainer's train sampler is a `RandomSampler`, which `accelerator.prepare` replaces with
    a `SeedableRandomSampler` seeded by `args.seed`, so every process (and the single-process run) draws
    the same permutation of the dataset. Under DDP, `BatchSamplerShard` cuts that permutation into
    per-device batches and deals them round-robin: with 2 processes of batch 2, step k's global batch is
    permutation[4k:4k+4], exactly the batch of step k with 1 process of batch 4. The dataset holds a whole
    number of global batches, so no batch is padded with repeated examples. The test checks this from the
    recorded batches instead of trusting it, so the loss comparison is known to compare like with like.
    """

    seen_batches: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            batch_size = inputs["response_lengths"].shape[0]
            rows = [  # the chosen response's tokens of each example, whatever the batch layout
                inputs["score_target"][inputs["score_seq"] == b].tolist() for b in range(batch_size)
            ]
            self.seen_batches.append(sorted(gather_object(rows)))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _fsdp_on_cpu() -> None:
    """Make accelerate honour an FSDP plugin on CPU processes (it keeps them MULTI_CPU, i.e. plain DDP).

    `AcceleratorState` only switches to FSDP for accelerator devices; torch's `fully_shard` itself runs
    on CPU with gloo. After the state is built as usual, the plugin and the distributed type are set as
    they would be on GPUs. The trainer under test is not touched.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    build = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def engine_arguments(engine: str, mode: str) -> dict:
    """DPOConfig settings for `engine` on CPU processes."""
    if engine == "ddp":
        return {"use_cpu": True}
    if engine == "fsdp2":
        _fsdp_on_cpu()
        # Sharded along the decoder layers, as examples/accelerate/fsdp2.yaml does on GPUs.
        return {
            "use_cpu": True,
            "fsdp": True,
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "cpu_ram_efficient_loading": mode == "ram_efficient",
            },
        }
    if engine in ("zero2", "zero3"):
        # DeepSpeed needs `use_cpu=False`; without a GPU, transformers would then start it with no backend
        # (one process). A state made beforehand with gloo and DeepSpeed on is used instead.
        from accelerate.state import AcceleratorState, PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        AcceleratorState._reset_state()  # a previous mode's Accelerator holds its DeepSpeed plugin
        PartialState(backend="gloo")
        zero = {"stage": int(engine[-1])}
        if engine == "zero3":
            # Partition even these tiny tensors (the default keeps those under 100k values whole), and
            # gather them when the weights are saved.
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        return {
            "use_cpu": False,
            "accelerator_config": {"use_configured_state": True},
            "deepspeed": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
                "zero_optimization": zero,
            },
        }
    raise ValueError(f"unknown engine {engine!r}")


def run(mode: str, opts) -> None:
    tokenizer = make_tokenizer()
    # A ZeRO-3 DPOConfig makes transformers build every later model inside `deepspeed.zero.Init`
    # (partitioned at construction, with other initial values); each mode starts from the same plain
    # model, except `zero_init`, which is built after its DPOConfig on purpose.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    model = None
    pretrained = os.path.join(opts.work, "pretrained")
    if mode == "ram_efficient" and int(os.environ.get("RANK", "0")) == 0:
        tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3).save_pretrained(
            pretrained
        )
    elif mode not in ("zero_init", "ram_efficient"):
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
    args = DPOConfig(
        output_dir=os.path.join(opts.work, mode, "out"),
        bf16=False,  # float32 and no recomputation: the runs are compared to one process at tight tolerances
        gradient_checkpointing=False,
        ref_logps_cache_dir=os.path.join(opts.work, mode, "cache"),
        precompute_ref_log_probs=mode == "precompute",
        per_device_train_batch_size=opts.per_device_batch,
        per_device_eval_batch_size=opts.per_device_batch,
        max_steps=TRAIN_ROWS // GLOBAL_BATCH,  # one epoch
        optim="sgd",  # plain SGD: equal weights mean equal (all-reduced) gradients at every step
        learning_rate=opts.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,  # no clipping
        beta=opts.beta,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **engine_arguments(opts.engine, mode),
    )
    assert args.world_size * opts.per_device_batch == GLOBAL_BATCH, (args.world_size, opts.per_device_batch)
    if mode == "ram_efficient":
        # Loaded after the FSDP config: with cpu_ram_efficient_loading only rank 0 reads the weights.
        from transformers import AutoModelForCausalLM

        args.distributed_state.wait_for_everyone()  # rank 0 has saved them
        # as `accelerate launch` sets them for examples/accelerate/fsdp2.yaml, before the script starts
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
        model = AutoModelForCausalLM.from_pretrained(pretrained)
        if args.process_index != 0:  # stand for weights this rank did not read: only rank 0's may count
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.zero_()
    elif model is None:
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=3)
    if mode == "adapter":  # a PeftModel with a trained (non-zero) adapter, given without peft_config
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(5)  # the same adapter on every process
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, lora)
    partitioned_at_construction = any(hasattr(p, "ds_id") for p in model.parameters())
    with torch.no_grad():  # per rank: what each process holds before the trainer exists
        checksums = gather_object([sum(p.double().abs().sum().item() for p in model.parameters())])
    trainer = RecordingDPOTrainer(
        model,
        args=args,
        train_dataset=noisy_rows(TRAIN_ROWS, seed=0),
        eval_dataset=noisy_rows(EVAL_ROWS, seed=99),  # 7 rows: the last eval batch is uneven
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    reference = None
    if trainer.ref_model is not None:
        reference_parameters = list(trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters())
        reference = {
            "wrapper": type(trainer.ref_model).__name__,
            "training": trainer.accelerator.unwrap_model(trainer.ref_model).training,
            "requires_grad": any(p.requires_grad for _, p in reference_parameters),
            "parameter_types": sorted({type(p).__name__ for _, p in reference_parameters}),
            "zero3_partitioned": sorted(
                n for n, p in reference_parameters if getattr(p, "ds_numel", 0) > p.numel()
            ),
        }
    trainer.seen_batches = []
    before = trainer.evaluate(metric_key_prefix="before")  # as examples/hh.py does, before any training
    trainer.train()
    eval_metrics = trainer.evaluate()

    rank = trainer.args.process_index
    sharded = opts.engine in ("fsdp2", "zero3")
    policy = trainer.model_wrapped if opts.engine.startswith("zero") else trainer.model
    state = trainer.accelerator.get_state_dict(policy)  # gathered on rank 0 when sharded
    if not sharded or rank == 0:
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(weights, os.path.join(opts.out, f"{mode}-rank{rank}.safetensors"))
    parameters = list(trainer.accelerator.unwrap_model(policy).named_parameters())
    if trainer.is_world_process_zero():
        result = {
            "mode": mode,
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "reference": reference,
            "partitioned_at_construction": partitioned_at_construction,
            "checksums_at_construction": checksums,
            "parameter_types": sorted({type(p).__name__ for _, p in parameters}),
            "zero3_partitioned": sorted(n for n, p in parameters if getattr(p, "ds_numel", 0) > p.numel()),
            "global_step": trainer.state.global_step,
            "train_logs": [entry for entry in trainer.state.log_history if "loss" in entry],
            "before": before,
            "eval": eval_metrics,
            "batches": trainer.seen_batches,
            "ref_logps": list(trainer.train_dataset["ref_logps"]) if mode == "precompute" else None,
            "eval_ref_logps": list(trainer.eval_dataset["ref_logps"]) if mode == "precompute" else None,
        }
        with open(os.path.join(opts.out, f"{mode}.json"), "w") as handle:
            json.dump(result, handle)
    trainer.accelerator.wait_for_everyone()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument(
        "--modes",
        default="live",
        help="comma-separated: live, precompute, lora, adapter, zero_init, ram_efficient",
    )
    parser.add_argument("--engine", default="ddp", choices=("ddp", "fsdp2", "zero2", "zero3"))
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--beta", type=float, default=0.1)
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    for mode in opts.modes.split(","):
        run(mode, opts)


if __name__ == "__main__":
    with process_group_closed():
        main()
