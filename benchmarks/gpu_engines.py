"""One GPU, three engines, the same DPO run: plain single device, DeepSpeed ZeRO-3 and FSDP2.

    accelerate launch --num_processes 1 --mixed_precision no \\
        --config_file examples/accelerate/deepspeed_zero3.yaml benchmarks/gpu_engines.py train --arm zero3 --out DIR
    python benchmarks/gpu_engines.py compare --out DIR        # the verdict; exits 1 if an arm differs

`train` builds a 19M-parameter Llama from a config (same seed in every arm), a separate frozen reference
model with the same weights (passed as `ref_model`, so the engine's reference path runs: a ZeRO-3
inference engine, FSDP2 shards), and trains a few DPO steps with plain SGD in float32 on synthetic
preference pairs, evaluating before and after. It writes `DIR/<arm>.json` (per-step loss, grad norm and
DPO metrics, evaluations, what the engine made of the models) and `DIR/<arm>.safetensors` (the final
weights, gathered). `compare` checks every other arm against `single`: losses and metrics within
`--rtol`, final weights within `--weight-rtol/--weight-atol`, and that the engines really sharded.
`--small` shrinks the model for a CPU smoke test of the `single` arm.

benchmarks/gpu_engines.sh runs the three arms through examples/accelerate/*.yaml and the comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

ARMS = ("single", "zero3", "fsdp2")
STEPS, BATCH, EVAL_ROWS = 8, 8, 24
WORDS_GOOD = "thanks happy glad sure here helpful kindly welcome great answer".split()
WORDS_BAD = "no go away stupid never whatever boring ugh leave annoying".split()
TOPICS = "garden river music bread winter train forest paper lamp coffee".split()


def rows(n: int, seed: int) -> list[dict]:
    """Polite (chosen) against rude (rejected) replies; every third pair flipped so accuracies are fractions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = "Tell me about the " + " and the ".join(rng.sample(TOPICS, rng.randint(1, 3))) + ":"
        good = " " + " ".join(rng.choice(WORDS_GOOD) for _ in range(rng.randint(3, 12))) + "."
        bad = " " + " ".join(rng.choice(WORDS_BAD) for _ in range(rng.randint(3, 12))) + "."
        chosen, rejected = (bad, good) if i % 3 == 0 else (good, bad)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def train(opts) -> None:
    import torch
    from safetensors.torch import save_file

    from dpo_trainer import DPOConfig, DPOTrainer
    from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 for real: the arms must agree closely
    torch.backends.cudnn.allow_tf32 = False
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows(400, seed=123)]
    tokenizer = train_tokenizer(texts, vocab_size=8192 if not opts.small else 400)
    size = (
        dict(hidden_size=384, num_layers=8, num_heads=6)
        if not opts.small
        else dict(hidden_size=32, num_layers=2, num_heads=4)
    )
    # Built before any DPOConfig: under ZeRO-3 transformers would otherwise build it inside zero.Init.
    policy = tiny_causal_lm(tokenizer, seed=7, **size)
    reference = tiny_causal_lm(tokenizer, seed=7, **size)
    args = DPOConfig(
        output_dir=str(Path(opts.out) / f"{opts.arm}-run"),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        max_steps=STEPS,
        optim="sgd",  # plain SGD: equal gradients give equal weights, no Adam sign amplification
        learning_rate=0.5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        layout=opts.layout,
    )
    trainer = DPOTrainer(
        policy,
        ref_model=reference,
        args=args,
        train_dataset=rows(STEPS * BATCH, seed=0),
        eval_dataset=rows(EVAL_ROWS, seed=99),
        processing_class=tokenizer,
    )
    if trainer.is_deepspeed_enabled:
        # Trainer hands DeepSpeed a torch SGD, which ZeRO accepts only when told to.
        trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
    unwrap = trainer.accelerator.unwrap_model
    reference_parameters = list(unwrap(trainer.ref_model).parameters())
    before = trainer.evaluate(metric_key_prefix="before")
    trainer.train()
    after = trainer.evaluate()

    policy_parameters = list(unwrap(trainer.model_wrapped).parameters())
    sharded = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": trainer.accelerator.num_processes,
        "policy_parameter_types": sorted({type(p).__name__ for p in policy_parameters}),
        "policy_zero3_partitioned": sum(getattr(p, "ds_numel", 0) > p.numel() for p in policy_parameters),
        "reference_wrapper": type(trainer.ref_model).__name__,
        "reference_parameter_types": sorted({type(p).__name__ for p in reference_parameters}),
        "reference_zero3_partitioned": sum(
            getattr(p, "ds_numel", 0) > p.numel() for p in reference_parameters
        ),
        "reference_trainable": sum(p.requires_grad for p in reference_parameters),
        "parameters": sum(getattr(p, "ds_numel", 0) or p.numel() for p in policy_parameters),
    }
    target = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(target)  # gathered (ZeRO-3: 16-bit save setting)
    if trainer.is_world_process_zero():
        weights = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        save_file(weights, str(Path(opts.out) / f"{opts.arm}.safetensors"))
        result = {
            "arm": opts.arm,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "train_logs": [e for e in trainer.state.log_history if "loss" in e and "eval_loss" not in e],
            "before": before,
            "after": after,
            **sharded,
        }
        with open(Path(opts.out) / f"{opts.arm}.json", "w") as handle:
            json.dump(result, handle, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "train_logs"}))
    trainer.accelerator.wait_for_everyone()


METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def compare(opts) -> int:
    from safetensors.torch import load_file

    out = Path(opts.out)
    base = json.loads((out / "single.json").read_text())
    base_weights = load_file(str(out / "single.safetensors"))
    print(f"baseline: single, {base['device']}, {base['parameters'] / 1e6:.1f}M parameters")
    print("  losses: " + " ".join(f"{e['loss']:.5f}" for e in base["train_logs"]))
    failures = []
    if abs(base["train_logs"][0]["loss"] - math.log(2)) > 1e-5:
        failures.append("single: step 1 loss is not ln 2 (policy and reference differ at the start)")
    for arm in ARMS[1:]:
        path = out / f"{arm}.json"
        if not path.exists():
            failures.append(f"{arm}: no result (the run failed; see its log)")
            continue
        run = json.loads(path.read_text())
        problems = []
        expect = {
            "zero3": run["distributed_type"] == "DistributedType.DEEPSPEED"
            and run["reference_wrapper"] == "DeepSpeedEngine"
            and run["policy_zero3_partitioned"] > 0
            and run["reference_zero3_partitioned"] > 0,
            "fsdp2": run["distributed_type"] == "DistributedType.FSDP"
            and run["policy_parameter_types"] == ["DTensor"]
            and run["reference_parameter_types"] == ["DTensor"],
        }[arm]
        if not expect:
            problems.append(f"the engine did not shard as expected: {json.dumps(run)[:400]}")
        if run["reference_trainable"]:
            problems.append(f"{run['reference_trainable']} reference parameters require grad")
        steps = list(zip(base["train_logs"], run["train_logs"]))
        if len(steps) != len(base["train_logs"]) or len(run["train_logs"]) != len(base["train_logs"]):
            problems.append(f"{len(run['train_logs'])} logged steps, baseline {len(base['train_logs'])}")
        worst = 0.0
        for a, b in steps:
            for name in METRICS:
                worst = max(worst, abs(a[name] - b[name]) / max(abs(a[name]), 1e-8))
                if not _close(a[name], b[name], opts.rtol, opts.atol):
                    problems.append(f"step {a['step']} {name}: {b[name]:.6g} vs {a[name]:.6g}")
        for phase in ("before", "after"):
            for key, value in base[phase].items():
                if key.endswith(("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")):
                    if not _close(value, run[phase][key], opts.rtol, opts.atol):
                        problems.append(f"{key}: {run[phase][key]:.6g} vs {value:.6g}")
        weights = load_file(str(out / f"{arm}.safetensors"))
        if set(weights) != set(base_weights):
            problems.append(f"weight names differ: {sorted(set(weights) ^ set(base_weights))[:5]}")
        max_diff = 0.0
        for name in set(weights) & set(base_weights):
            diff = (weights[name] - base_weights[name]).abs()
            bound = opts.weight_atol + opts.weight_rtol * base_weights[name].abs()
            max_diff = max(max_diff, diff.max().item())
            if (diff > bound).any():
                problems.append(f"weight {name}: max |diff| {diff.max().item():.3g}")
        verdict = "SAME" if not problems else "DIFFERENT"
        print(
            f"{arm}: {verdict} as single ({run['distributed_type']}, reference {run['reference_wrapper']}); "
            f"worst relative metric diff {worst:.2e}, max weight diff {max_diff:.2e}"
        )
        print("  losses: " + " ".join(f"{e['loss']:.5f}" for e in run["train_logs"]))
        for problem in problems[:12]:
            print(f"  - {problem}")
        failures += [f"{arm}: {p}" for p in problems]
    print(
        "VERDICT:", "all engines match the single-device run" if not failures else f"{len(failures)} problems"
    )
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("train", "compare"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument(
        "--layout", default="padded", help="DPOConfig.layout (padded: no FlexAttention compile)"
    )
    parser.add_argument("--small", action="store_true", help="a tiny model, for a CPU smoke test")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--weight-rtol", type=float, default=1e-3)
    parser.add_argument("--weight-atol", type=float, default=1e-5)
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    if opts.command == "compare":
        return compare(opts)
    if opts.arm is None:
        parser.error("train needs --arm")
    train(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
