"""Side-by-side DPO benchmark: this project's `DPOTrainer` against TRL's, on identical work, in one run.

    python benchmarks/bench_dpo.py --preset cpu
    python benchmarks/bench_dpo.py --preset gpu-full,gpu-full-ckpt,gpu-lora,gpu-qlora --out $OUT/gpu.jsonl
    python benchmarks/bench_dpo.py --preset cpu --tiny --repeats 1          # smoke test, seconds
    python benchmarks/bench_dpo.py --preset cpu --ours-args "layout=shared_prompt max_tokens_per_batch=4096"

Both arms get the same model config and initial weights (built once by `_arm.py prepare` and loaded by
both from the same folder), the same tokenizer, the same rows in the same order (sequential sampling),
the same pairs per step, precision, checkpointing setting, optimizer (the `TrainingArguments` default
AdamW, lr 1e-6), LoRA config and reference (a frozen copy for full fine-tuning, the adapter disabled for
LoRA); no eval, no saving. Lengths are chosen so that neither library truncates, and each arm checks it.

Each arm runs in its own subprocess (`_arm.py run`), so peak memory is per arm (CPU: peak RSS from
`getrusage`; GPU: `torch.cuda.max_memory_allocated`), and the arms alternate (ours, trl, ours, trl, ...)
so that machine drift hits both. The table shows the median over `--repeats` runs per arm and the
ratio ours/TRL; every run and summary is appended as a JSON line to `--out`.

This process uses the standard library only: it neither imports torch nor either trainer.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARM_SCRIPT = HERE / "_arm.py"

CPU_MODEL = dict(  # BENCHMARKS.md's CPU anchor: a small Llama, ~6M parameters
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
LLAMA_1B = dict(  # the anchor's Llama-3.2-1B shape, 1.24B parameters
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
TINY_MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)

_CPU = dict(
    model=CPU_MODEL,
    tokenizer_words=8192 - 3,
    dtype="float32",
    prompt_tokens=(10, 100),
    response_tokens=(5, 125),
    max_length=256,
    pairs_per_step=8,
    warmup_steps=3,
    timed_steps=10,
    gradient_checkpointing=False,
    lora=False,
    qlora=False,
)
_GPU = dict(
    model=LLAMA_1B,
    tokenizer_words=4000,
    dtype="bfloat16",
    prompt_tokens=(40, 400),
    response_tokens=(20, 500),
    max_length=1024,
    pairs_per_step=8,
    warmup_steps=3,
    timed_steps=10,
    gradient_checkpointing=False,
    lora=False,
    qlora=False,
)
PRESETS = {
    "cpu": _CPU,
    "gpu-full": _GPU,
    "gpu-full-ckpt": {**_GPU, "gradient_checkpointing": True},
    "gpu-lora": {**_GPU, "lora": True, "gradient_checkpointing": True},  # the anchor's LoRA row
    # the anchor's QLoRA row: 4-bit NF4 base (bitsandbytes, bf16 compute) + LoRA r=16, checkpointing on
    "gpu-qlora": {**_GPU, "lora": True, "qlora": True, "gradient_checkpointing": True},
}
TINY = dict(
    model=TINY_MODEL,
    tokenizer_words=512 - 3,
    prompt_tokens=(4, 24),
    response_tokens=(2, 24),
    max_length=64,
    warmup_steps=1,
    timed_steps=2,
)
# Peak dense bf16 matrix-product TFLOP/s by device name: the anchor's measured H200 figure, H100's data sheet.
PEAK_TFLOPS = {"H200": 790.0, "H100": 989.0}


def parse_kv(text: str, flag: str) -> dict[str, str]:
    """`"a=1 b=x"` -> `{"a": "1", "b": "x"}`; the arm turns each value into int/float/bool/None/str."""
    pairs = {}
    for item in shlex.split(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: expected key=value items, got {item!r}")
        pairs[key] = value
    return pairs


def make_spec(preset: str, args) -> dict:
    spec = {**PRESETS[preset], **(TINY if args.tiny else {})}
    for key, value in (
        ("warmup_steps", args.warmup),
        ("timed_steps", args.timed),
        ("pairs_per_step", args.pairs),
    ):
        if value is not None:
            spec[key] = value
    if args.grad_ckpt is not None:
        spec["gradient_checkpointing"] = args.grad_ckpt == "on"
    if spec["timed_steps"] < 1 or spec["warmup_steps"] < 0 or spec["pairs_per_step"] < 1:
        raise SystemExit("--timed and --pairs must be >= 1, --warmup >= 0")
    spec["prompt_tokens"], spec["response_tokens"] = (
        list(spec["prompt_tokens"]),
        list(spec["response_tokens"]),
    )
    longest = spec["prompt_tokens"][1] + spec["response_tokens"][1] + 1  # + EOS
    if longest > spec["max_length"]:
        raise SystemExit(
            f"{preset}: the longest row ({longest} tokens) would be truncated at {spec['max_length']}"
        )
    spec["seed"] = 0
    spec["rows"] = spec["pairs_per_step"] * (spec["warmup_steps"] + spec["timed_steps"])
    key = json.dumps([spec["model"], spec["dtype"], spec["tokenizer_words"]], sort_keys=True)
    spec["work_dir"] = str(Path(args.work_dir) / hashlib.sha1(key.encode()).hexdigest()[:10])
    spec["threads"] = args.threads
    spec["ours_args"], spec["trl_args"] = args.ours_args, args.trl_args
    spec["ours_attn"] = args.ours_attn
    spec["preset"], spec["tiny"] = preset, args.tiny
    spec["profile"] = bool(getattr(args, "profile", False))
    if getattr(args, "trace_dir", None):
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        spec["trace"] = str(Path(args.trace_dir) / f"{preset}-{{arm}}-trace.json")
    return spec


def run_child(argv: list[str], log_path: Path, timeout: float) -> tuple[dict | None, str | None, float]:
    """Run `_arm.py argv...` with its output in `log_path`; return (result, error, seconds)."""
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(
                [sys.executable, str(ARM_SCRIPT), *argv, str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=HERE.parent,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    if code == 0 and result_path.exists():
        return json.loads(result_path.read_text()), None, seconds
    tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
    return None, f"exit {code} after {seconds:.0f}s; log {log_path}:\n{tail}", seconds


def busy_cores(seconds: float = 2.0) -> float | None:
    """Cores kept busy by any process over `seconds` (from /proc/stat), or None where there is no /proc."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def wait_for_idle_cpu(limit_s: float, threshold: float) -> float | None:
    """Wait up to `limit_s` until other processes use under `threshold` cores: on a shared CPU machine a run
    that competes for the cores measures the neighbour, not the trainer. Returns the last busy reading."""
    deadline = time.perf_counter() + limit_s
    busy = busy_cores()
    while busy is not None and busy > threshold and time.perf_counter() < deadline:
        busy = busy_cores(5.0)
    return busy


def peak_tflops(device: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((value for name, value in PEAK_TFLOPS.items() if name in device), None)


def add_flops(result: dict, spec: dict, params: int, override: float | None) -> None:
    """The anchor's useful FLOPs: (policy 6 or LoRA 4, + reference 2, + recompute 2) * N * tokens."""
    factor = (4 if spec["lora"] else 6) + 2 + (2 if spec["gradient_checkpointing"] else 0)
    secs = result["timed_s"]
    result["params"] = params
    result["useful_tflops"] = factor * params * result["timed_real_tokens"] / secs / 1e12
    result["useful_tflops_sequence_tokens"] = factor * params * result["timed_sequence_tokens"] / secs / 1e12
    peak = peak_tflops(result["device"], override) if (result["device"] != "cpu" or override) else None
    result["peak_tflops"] = peak
    result["mfu"] = result["useful_tflops"] / peak if peak else None
    result["mfu_sequence_tokens"] = result["useful_tflops_sequence_tokens"] / peak if peak else None
    result["peak_mem_gib"] = (
        result["cuda_max_allocated_gib"]
        if result["cuda_max_allocated_gib"] is not None
        else result["peak_rss_gib"]
    )
    result["peak_mem_kind"] = (
        "cuda_max_allocated" if result["cuda_max_allocated_gib"] is not None else "ru_maxrss"
    )


CONTENDED = 0.85  # timed CPU utilization below this: the process did not have the cores to itself

SUMMARY_KEYS = (
    "step_s",
    "pairs_per_s",
    "real_tokens_per_s",
    "sequence_tokens_per_s",
    "useful_tflops",
    "mfu",
    "peak_mem_gib",
    "init_s",
    "wall_s",
    "train_loss",
    "timed_cpu_utilization",
)


def summarize(runs: list[dict]) -> dict:
    out = {
        "runs": len(runs),
        "contended_runs": sum(bool(run.get("contended")) for run in runs),
        "layout": "/".join(sorted({str(run.get("layout")) for run in runs})),
    }
    for key in SUMMARY_KEYS:
        values = [run[key] for run in runs if run.get(key) is not None]
        out[key] = statistics.median(values) if values else None
        if key in ("pairs_per_s", "peak_mem_gib") and values:
            out[f"{key}_all"] = values
    profiles = [run["profile_s_per_step"] for run in runs if run.get("profile_s_per_step")]
    if profiles:
        parts = sorted({part for profile in profiles for part in profile})
        out["profile_s_per_step"] = {
            part: statistics.median(p[part] for p in profiles if part in p) for part in parts
        }
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(blocks: list[tuple[str, dict, dict]]) -> None:
    """blocks: (preset, {arm: summary}, ratios)."""
    head = (
        f"{'preset':<14} {'arm':<5} {'layout':<13} {'runs':>4} {'step s':>7} {'pairs/s':>8} {'real tok/s':>10} "
        f"{'TFLOP/s':>8} {'MFU':>5} {'peak GiB':>8} {'loss':>6} {'cpu util':>8}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for preset, summaries, ratios in blocks:
        for arm, s in summaries.items():
            print(
                f"{preset:<14} {arm:<5} {s['layout']:<13} {s['runs']:>4} {fmt(s['step_s'], '.3f'):>7} "
                f"{fmt(s['pairs_per_s'], '.2f'):>8} {fmt(s['real_tokens_per_s'], ',.0f'):>10} "
                f"{fmt(s['useful_tflops'], '.1f'):>8} {fmt(s['mfu'], '.2f'):>5} {fmt(s['peak_mem_gib'], '.2f'):>8} "
                f"{fmt(s['train_loss'], '.4f'):>6} {fmt(s['timed_cpu_utilization'], '.2f'):>8}"
            )
        contended = sum(s["contended_runs"] for s in summaries.values())
        if contended:
            print(
                f"{preset:<14} WARNING: {contended} run(s) had under {CONTENDED:.0%} of the cores: noisy numbers"
            )
        if ratios:
            print(
                f"{preset:<14} ours/TRL: pairs/s x{fmt(ratios['pairs_per_s'], '.2f')}, "
                f"peak memory x{fmt(ratios['peak_mem_gib'], '.2f')}"
            )


PROFILE_PARTS = (
    "collate",
    "to_device",
    "attention_mask",
    "policy_forward",
    "lm_head",
    "reference_forward",
    "backward",
    "optimizer",
    "other",
    "step",
)


def print_profile(blocks: list[tuple[str, dict, dict]]) -> None:
    """Milliseconds per step of each part (median over repeats), one column per preset and arm."""
    columns = [
        (f"{preset} {arm}", summary.get("profile_s_per_step") or {})
        for preset, summaries, _ in blocks
        for arm, summary in summaries.items()
    ]
    if not columns:
        return
    print("\nms per step | " + " | ".join(name for name, _ in columns))
    for part in PROFILE_PARTS:
        cells = [fmt(1e3 * p[part] if part in p else None, ".1f") for _, p in columns]
        print(f"{part} | " + " | ".join(cells))


def checkout_info() -> dict:
    """The commit of this checkout and whether `src/` differs from it (the `ours` arm runs `src/`)."""

    def git(*argv):
        try:
            return subprocess.run(
                ["git", *argv], cwd=HERE.parent, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "commit": git("rev-parse", "HEAD"),
        "src_modified": bool(git("status", "--porcelain", "--", "src")),
    }


def host_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["mem_gib"] = int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20
    except (OSError, StopIteration, ValueError):
        pass
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--preset", default="cpu", help=f"one or more of {', '.join(PRESETS)}, comma-separated"
    )
    parser.add_argument("--tiny", action="store_true", help="shrink model, lengths and steps: a smoke test")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per arm, alternating ours/trl (default 2)"
    )
    parser.add_argument("--arms", default="ours,trl", help="which arms, in the order they alternate")
    parser.add_argument("--warmup", type=int, help="untimed steps first (preset: cpu 3, gpu 3)")
    parser.add_argument("--timed", type=int, help="timed steps (preset: cpu 10, gpu 10)")
    parser.add_argument("--pairs", type=int, help="pairs per step (preset: 8)")
    parser.add_argument(
        "--grad-ckpt", choices=("on", "off"), help="override the preset's gradient checkpointing"
    )
    parser.add_argument(
        "--ours-args", default="", help='key=value pairs set on our DPOConfig, e.g. "layout=packed"'
    )
    parser.add_argument("--trl-args", default="", help="key=value pairs set on TRL's DPOConfig")
    parser.add_argument(
        "--ours-attn",
        default="sdpa",
        help="attention implementation our arm loads the model with (TRL's arm: sdpa), e.g. flex_attention",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads per arm (default: torch's own choice)")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: H200 790, H100 989)"
    )
    parser.add_argument(
        "--out", help="JSON lines file to append to (default benchmarks/results/<preset>-<date>.jsonl)"
    )
    parser.add_argument(
        "--log-dir", help="each child's log, spec and result (default: logs-<preset>-<time> beside --out)"
    )
    parser.add_argument(
        "--work-dir", default=str(HERE / "results" / "work"), help="model, tokenizer and rows"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        help="before each CPU-preset arm run, wait up to this many seconds for the other processes to leave the "
        "cores idle (default 120 for cpu, 0 for gpu presets)",
    )
    parser.add_argument(
        "--arm-timeout", type=float, default=1800, help="seconds before one arm run is killed"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time each part of the step (device synchronised around each; see _profile.py) and print the split",
    )
    parser.add_argument(
        "--trace-dir", help="write a torch.profiler trace of each arm's last timed step into this folder"
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(options, presets, arms), checked; `--ours-args` and `--trl-args` parsed into dicts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    presets = [name.strip() for name in args.preset.split(",") if name.strip()]
    unknown = [name for name in presets if name not in PRESETS]
    if unknown or not presets:
        parser.error(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not arms or any(arm not in ("ours", "trl") for arm in arms):
        parser.error("--arms takes ours and/or trl")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.ours_args = parse_kv(args.ours_args, "--ours-args")
    args.trl_args = parse_kv(args.trl_args, "--trl-args")
    return args, presets, arms


def prepare_preset(preset: str, spec: dict, spec_path: Path, args, log_dir: Path, emit) -> dict | None:
    """Build the preset's model, tokenizer and rows (`_arm.py prepare`); None if that failed (emitted)."""
    print(f"[{preset}] preparing model, tokenizer and {spec['rows']} rows in {spec['work_dir']}", flush=True)
    prepared, error, secs = run_child(
        ["prepare", str(spec_path)], log_dir / f"{preset}-prepare.log", args.arm_timeout
    )
    if error:
        print(f"[{preset}] prepare failed: {error}", flush=True)
        emit({"type": "error", "preset": preset, "stage": "prepare", "error": error})
        return None
    print(
        f"[{preset}] {prepared['params']:,} parameters (model {'built' if prepared['model_built'] else 'reused'}, "
        f"{secs:.0f}s); longest row {prepared['longest_sequence']} tokens <= max_length {spec['max_length']}",
        flush=True,
    )
    emit({"type": "spec", "preset": preset, "spec": spec, "prepared": prepared})
    return prepared


def run_arm(
    preset: str, arm: str, repeat: int, spec: dict, spec_path: Path, params: int, args, log_dir: Path, emit
) -> dict | None:
    """One run of one arm (`_arm.py run`), after waiting for idle cores on CPU; its result with FLOPs and
    contention added, or None if it failed (emitted)."""
    wait = args.wait_idle if args.wait_idle is not None else (120 if preset == "cpu" else 0)
    spare = (os.cpu_count() or 1) - (args.threads or os.cpu_count() or 1)  # cores the arm leaves free
    busy = wait_for_idle_cpu(wait, threshold=max(spare, 0) + 0.5) if wait > 0 else None
    result, error, secs = run_child(
        ["run", arm, str(spec_path)], log_dir / f"{preset}-{arm}-{repeat}.log", args.arm_timeout
    )
    if error:
        print(f"[{preset}] {arm} #{repeat} FAILED: {error}", flush=True)
        emit({"type": "error", "preset": preset, "arm": arm, "repeat": repeat, "error": error})
        return None
    add_flops(result, spec, params, args.peak_tflops)
    result["busy_cores_before"] = busy
    util = result.get("timed_cpu_utilization")
    result["contended"] = (
        result["device"] == "cpu" and not args.tiny and util is not None and util < CONTENDED
    )
    emit({"type": "run", "preset": preset, "repeat": repeat, **result})
    print(
        f"[{preset}] {arm} #{repeat}: {result['pairs_per_s']:.2f} pairs/s, step {result['step_s']:.3f}s, "
        f"peak {result['peak_mem_gib']:.2f} GiB ({result['peak_mem_kind']}), loss {fmt(result['train_loss'], '.4f')}, "
        f"cpu util {fmt(util, '.2f')}{' CONTENDED' if result['contended'] else ''}, {secs:.0f}s in all",
        flush=True,
    )
    return result


def ours_over_trl(summaries: dict) -> dict:
    """Ratios ours/TRL of the medians, or {} unless both arms have runs."""
    if "ours" not in summaries or "trl" not in summaries:
        return {}
    ratios = {}
    for key in ("pairs_per_s", "peak_mem_gib", "real_tokens_per_s", "step_s"):
        ours, theirs = summaries["ours"][key], summaries["trl"][key]
        ratios[key] = ours / theirs if ours is not None and theirs else None
    return ratios


def bench_preset(preset: str, args, arms: list[str], log_dir: Path, emit) -> tuple[tuple | None, int]:
    """Prepare one preset, run its arms `--repeats` times alternating, emit the medians and ratios.
    Returns (the table block (preset, {arm: summary}, ratios), or None if prepare failed; failed runs)."""
    spec = make_spec(preset, args)
    Path(spec["work_dir"]).mkdir(parents=True, exist_ok=True)
    spec_path = log_dir / f"{preset}-spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    prepared = prepare_preset(preset, spec, spec_path, args, log_dir, emit)
    if prepared is None:
        return None, 1
    runs, failures = {arm: [] for arm in arms}, 0
    for repeat in range(args.repeats):
        for arm in arms:
            result = run_arm(preset, arm, repeat, spec, spec_path, prepared["params"], args, log_dir, emit)
            if result is None:
                failures += 1
            else:
                runs[arm].append(result)
    summaries = {arm: summarize(results) for arm, results in runs.items() if results}
    for arm, summary in summaries.items():
        emit({"type": "summary", "preset": preset, "arm": arm, "statistic": "median", **summary})
    ratios = ours_over_trl(summaries)
    if ratios:
        emit({"type": "ratio", "preset": preset, "of": "ours/trl", **ratios})
    return (preset, summaries, ratios), failures


def main(argv: list[str] | None = None) -> int:
    args, presets, arms = parse_args(argv)
    started = datetime.datetime.now()
    run_id = started.strftime("%Y%m%dT%H%M%S")
    label = "_".join(presets) + ("-tiny" if args.tiny else "")
    out = Path(args.out) if args.out else HERE / "results" / f"{label}-{started.date().isoformat()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir) if args.log_dir else out.parent / f"logs-{label}-{run_id}"
    log_dir.mkdir(parents=True, exist_ok=True)

    def emit(record: dict) -> None:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"run_id": run_id, **record}, default=str) + "\n")

    emit(
        {
            "type": "meta",
            "date": started.isoformat(timespec="seconds"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "host": host_info(),
            "checkout": checkout_info(),
            "presets": presets,
            "tiny": args.tiny,
            "repeats": args.repeats,
            "arms": arms,
        }
    )
    blocks, failures = [], 0
    t_all = time.perf_counter()
    for preset in presets:
        block, failed = bench_preset(preset, args, arms, log_dir, emit)
        failures += failed
        if block is not None:
            blocks.append(block)
    wall = time.perf_counter() - t_all
    emit({"type": "end", "wall_s": wall, "failures": failures})
    print_table(blocks)
    if args.profile:
        print_profile(blocks)
    print(f"\nwall time {wall:.0f}s; results appended to {out}; logs in {log_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
