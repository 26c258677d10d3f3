"""Length sweep: step time and peak memory of this project's `DPOTrainer` against TRL's, T = 512 .. 8,192.

    python benchmarks/bench_lengths.py                                 # CPU: 512 1024 2048 4096 8192
    python benchmarks/bench_lengths.py --model small --warmup 0 --timed 1     # a busy CPU: minutes
    python benchmarks/bench_lengths.py --lengths 1024,2048,4096,8192,16384,32768 --gpu   # a GPU, when lent

Work per step: `--pairs` pairs (2), each a prompt of T/2 tokens and two responses of T/4 .. T/2 tokens
(EOS included), so the longest sequence is exactly T and nothing is truncated (each arm checks). The model
is `bench_dpo.py`'s CPU Llama (6M parameters; `--model small`: 0.2M) with positions up to the longest T; same weights, rows,
order, optimizer and reference (a frozen copy) in both arms; our arm uses its defaults (`layout="auto"`).

Each arm runs in its own process through `_arm.py` (as `bench_dpo.py` does), arms alternating, so peak
memory is per arm: peak RSS on CPU, `torch.cuda.max_memory_allocated` on a GPU. The table gives medians
over `--repeats`; every run is appended as a JSON line to `--out`. Standard library only in this process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dpo import CPU_MODEL, LLAMA_1B, checkout_info, host_info, run_child  # noqa: E402

SMALL_MODEL = dict(  # a smaller Llama (0.2M parameters) for sweeps on a busy CPU
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)
MODELS = {"cpu": CPU_MODEL, "small": SMALL_MODEL, "gpu": LLAMA_1B}


def spec_for(length: int, args, work_root: Path) -> dict:
    model = dict(MODELS["gpu" if args.gpu else args.model])
    model["max_position_embeddings"] = max(args.lengths)
    half = length // 2
    return {
        "model": model,
        "tokenizer_words": 4000 if args.gpu else model["vocab_size"] - 3,
        "dtype": "bfloat16" if args.gpu else "float32",
        "prompt_tokens": [half, half],
        "response_tokens": [half // 2 - 1, half - 1],  # + EOS: T/4 .. T/2
        "max_length": length,
        "pairs_per_step": args.pairs,
        "warmup_steps": args.warmup,
        "timed_steps": args.timed,
        "gradient_checkpointing": False,
        "lora": False,
        "qlora": False,
        "seed": 0,
        "rows": args.pairs * (args.warmup + args.timed),
        # one model folder for every length (positions up to the longest), rows per length
        "work_dir": str(work_root / f"{'gpu' if args.gpu else args.model}-T{length}"),
        "threads": args.threads,
        "ours_args": {},
        "trl_args": {},
        "ours_attn": "sdpa",
        "preset": f"length-{length}",
        "tiny": False,
        "profile": False,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths", default="512,1024,2048,4096,8192", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu", action="store_true", help="1B Llama in bf16 (bench_dpo's GPU model)")
    parser.add_argument(
        "--model", choices=["cpu", "small"], default="cpu", help="CPU model: bench_dpo's or smaller"
    )
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "dpo_bench_lengths"))
    parser.add_argument("--out", default=str(HERE / "results" / "lengths.jsonl"))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    work_root = Path(args.work_dir)
    work_root.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **checkout_info(),
        "host": host_info(),
    }
    rows = []
    for length in args.lengths:
        spec = spec_for(length, args, work_root)
        Path(spec["work_dir"]).mkdir(parents=True, exist_ok=True)
        spec_path = Path(spec["work_dir"]) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        prepared, error, _ = run_child(
            ["prepare", str(spec_path)], Path(spec["work_dir"]) / "prepare.log", 1800
        )
        if error:
            print(f"T={length}: prepare failed: {error}")
            return 1
        runs = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            for arm in ("ours", "trl"):
                log = Path(spec["work_dir"]) / f"{arm}-{repeat}.log"
                result, error, _ = run_child(["run", arm, str(spec_path)], log, args.timeout)
                if error:
                    print(f"T={length} {arm}: {error}")
                    result = {"error": error}
                runs[arm].append(result)
                with open(out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({**stamp, "length": length, "arm": arm, "result": result}) + "\n")
        summary = {}
        for arm, results in runs.items():
            good = [r for r in results if "error" not in r]
            if not good:
                summary[arm] = None
                continue
            key = "cuda_max_allocated_gib" if args.gpu else "peak_rss_gib"
            summary[arm] = {
                "step_s": statistics.median(r["step_s"] for r in good),
                "peak_mib": statistics.median(r[key] for r in good) * 1024,
                "attn": good[0].get("attn_implementation"),
                "layout": good[0].get("layout"),
                "cpu_utilization": statistics.median(r["timed_cpu_utilization"] for r in good),
            }
        rows.append((length, summary))
        print_row(length, summary)
    print("\n| T | step s ours / TRL | peak MiB ours / TRL | pairs/s ours ÷ TRL | memory ours ÷ TRL |")
    print("|---|---|---|---|---|")
    for length, summary in rows:
        print(markdown_row(length, summary))
    return 0


def print_row(length: int, summary: dict) -> None:
    print(f"T={length}: " + ", ".join(f"{arm} {value}" for arm, value in summary.items()), flush=True)


def markdown_row(length: int, summary: dict) -> str:
    ours, trl = summary.get("ours"), summary.get("trl")
    if not ours or not trl:
        return f"| {length:,} | failed | | | |"
    return (
        f"| {length:,} | {ours['step_s']:.3f} / {trl['step_s']:.3f} | {ours['peak_mib']:,.0f} / {trl['peak_mib']:,.0f} "
        f"| ×{trl['step_s'] / ours['step_s']:.2f} | ×{ours['peak_mib'] / trl['peak_mib']:.2f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
