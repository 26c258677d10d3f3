"""One process of `bench_dpo.py`: build the shared inputs, or run one trainer and report its numbers.

    python benchmarks/_arm.py prepare SPEC.json RESULT.json
    python benchmarks/_arm.py run {ours,trl} SPEC.json RESULT.json

`prepare` writes, under the spec's work dir, the word-level tokenizer and the random-init Llama (both in
`model/`, reused while the model spec is unchanged) and the preference rows (`rows.jsonl`, regenerated
every time, deterministic). It is the only place the model is built, so both arms load the same weights.

`run` trains one arm on those files for `warmup + timed` steps and times the `timed` ones (the
anchor's `Clock`). Only that arm's library is imported: `dpo_trainer` (from this checkout's `src/`) for
`ours`, `trl` for `trl`; the result records that the other one stayed out of `sys.modules`.

Work done in the timed steps is counted from the rows each step actually trained on (a FIFO filled by
the collator, emptied by `training_step`, so the dataloader's look-ahead does not skew it):
  * real tokens: prompt + each response, the prompt once (the tokens of the data),
  * sequence tokens: prompt once per response + responses (what a one-sequence-per-response layout
    runs; the anchor's "real tokens"),
both computed from the tokenized rows, which are checked against the rows' own token counts so that a
truncating trainer fails the run instead of looking fast.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("ours", "trl")
FOREIGN = {"ours": "trl", "trl": "dpo_trainer"}

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_name, _value)


# ---------------------------------------------------------------------------------------------- prepare


def build_tokenizer(n_words: int):
    """The anchor's tokenizer: `<pad>`=0, `<eos>`=1, `<unk>`=2, then words `w0 .. w{n-1}`, split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    return fast


def build_rows(spec: dict) -> list[dict]:
    """Synthetic pairs with HH-like length spread (the anchor's generator, lengths from the spec)."""
    rng = random.Random(spec["seed"])
    words = [f"w{i}" for i in range(spec["tokenizer_words"])]
    (p_lo, p_hi), (r_lo, r_hi) = spec["prompt_tokens"], spec["response_tokens"]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for _ in range(spec["rows"]):
        prompt = text(rng.randint(p_lo, p_hi)) + " "
        rows.append(
            {
                "prompt": prompt,
                "chosen": text(rng.randint(r_lo, r_hi)),
                "rejected": text(rng.randint(r_lo, r_hi)),
            }
        )
    return rows


def prepare(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec["tokenizer_words"])
    rows = build_rows(spec)
    counts = []
    for row in rows:
        prompt = len(tok(row["prompt"])["input_ids"])
        responses = [
            len(tok(row[key], add_special_tokens=False)["input_ids"]) + 1 for key in ("chosen", "rejected")
        ]
        counts.append([prompt, *responses])  # + 1: the EOS both libraries append
    with open(work / "rows.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with open(work / "row_tokens.json", "w", encoding="utf-8") as handle:
        json.dump(counts, handle)

    model_dir = work / "model"
    stamp = model_dir / "bench_model_spec.json"
    model_spec = {
        "model": spec["model"],
        "dtype": spec["dtype"],
        "seed": spec["seed"],
        "words": spec["tokenizer_words"],
    }
    built = False
    if not (stamp.exists() and json.loads(stamp.read_text()) == model_spec):
        cfg = LlamaConfig(**spec["model"])
        torch.manual_seed(spec["seed"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(getattr(torch, spec["dtype"]))
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        stamp.write_text(json.dumps(model_spec))
        del model
        built = True
    cfg = LlamaConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())  # tied embeddings counted once
    longest = max(c[0] + max(c[1:]) for c in counts)
    return {
        "params": params,
        "model_dir": str(model_dir),
        "model_built": built,
        "rows": len(rows),
        "longest_sequence": longest,
    }


# ---------------------------------------------------------------------------------------------- run


def parse_value(text: str):
    """`--ours-args` values: true/false, none, int, float, else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def row_lengths(feature) -> tuple[int, list[int]] | None:
    """(prompt tokens, [tokens of each response]) of one tokenized row, in either library's columns."""
    if "prompt_ids" not in feature:
        return None
    if "response_ids" in feature:  # dpo_trainer
        return len(feature["prompt_ids"]), [len(ids) for ids in feature["response_ids"]]
    if "chosen_ids" in feature and "rejected_ids" in feature:  # trl
        return len(feature["prompt_ids"]), [len(feature["chosen_ids"]), len(feature["rejected_ids"])]
    return None


class WorkMeter:
    """Counts pairs and tokens of the batches `training_step` consumed, whatever the dataloader prefetched."""

    def __init__(self):
        self.pending = collections.deque()
        self.consumed = {"pairs": 0, "real_tokens": 0, "sequence_tokens": 0, "batches": 0}

    def wrap_collator(self, collator):
        meter = self

        def collate(features, *args, **kwargs):
            pairs = real = seq = 0
            for feature in features:
                lengths = row_lengths(feature)
                if lengths is None:
                    raise RuntimeError(f"unknown row columns {sorted(feature)}: cannot count the work")
                prompt, responses = lengths
                pairs += 1
                real += prompt + sum(responses)
                seq += prompt * len(responses) + sum(responses)
            meter.pending.append((pairs, real, seq))
            return collator(features, *args, **kwargs)

        return collate

    def wrap_training_step(self, training_step):
        meter = self

        def step(*args, **kwargs):
            if not meter.pending:
                raise RuntimeError(
                    "a training step ran on a batch this process did not collate (dataloader workers?): "
                    "the work cannot be counted; keep dataloader_num_workers=0"
                )
            pairs, real, seq = meter.pending.popleft()
            meter.consumed["pairs"] += pairs
            meter.consumed["real_tokens"] += real
            meter.consumed["sequence_tokens"] += seq
            meter.consumed["batches"] += 1
            return training_step(*args, **kwargs)

        return step


def check_no_truncation(dataset, expected: list[list[int]]) -> dict:
    """Compare every tokenized row with the row's own token counts (no truncation, one EOS per response)."""
    if len(dataset) != len(expected):
        raise RuntimeError(f"the trainer kept {len(dataset)} of {len(expected)} rows")
    mismatched = []
    for index in range(len(dataset)):
        lengths = row_lengths(dataset[index])
        if lengths is None:
            return {"checked": False, "reason": f"unknown columns {dataset.column_names}"}
        if [lengths[0], *lengths[1]] != expected[index]:
            mismatched.append((index, [lengths[0], *lengths[1]], expected[index]))
    if mismatched:
        raise RuntimeError(
            f"{len(mismatched)} rows were tokenized to other lengths than the data holds (truncation?); "
            f"first (row, got, expected): {mismatched[0]}"
        )
    return {"checked": True, "rows": len(expected)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def import_torch(threads: int | None):
    """`torch`, limited to `threads` CPU threads when set (the variables must be set before the import)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch


@dataclasses.dataclass
class ArmLibrary:
    """The trainer library of one arm, imported in this process only."""

    info: dict  # name, version, file
    config_class: type  # its DPOConfig
    trainer_class: type  # its DPOTrainer
    train_dataset: Callable[[list[dict]], Any]  # the rows as its trainer takes them


def import_library(arm: str) -> ArmLibrary:
    """`dpo_trainer` from this checkout's `src/` for `ours`, `trl` for `trl`; never both in one process."""
    if arm == "ours":
        sys.path.insert(0, str(ROOT / "src"))  # benchmark this checkout, not some installed copy
        import dpo_trainer
        from dpo_trainer import DPOConfig, DPOTrainer

        info = {"name": "dpo_trainer", "version": dpo_trainer.__version__, "file": dpo_trainer.__file__}
        return ArmLibrary(info, DPOConfig, DPOTrainer, train_dataset=lambda rows: rows)
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    info = {"name": "trl", "version": trl.__version__, "file": trl.__file__}
    return ArmLibrary(info, DPOConfig, DPOTrainer, train_dataset=Dataset.from_list)


def trainer_options(arm: str, spec: dict, cuda: bool) -> dict:
    """The `DPOConfig` keyword arguments both arms share (the README's "same work"), before `--*-args`."""
    from transformers import TrainingArguments

    steps = spec["warmup_steps"] + spec["timed_steps"]
    options = dict(
        output_dir=str(Path(spec["work_dir"]) / f"out-{arm}"),
        per_device_train_batch_size=spec["pairs_per_step"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=1e-6,
        max_length=spec["max_length"],
        bf16=spec["dtype"] == "bfloat16",
        use_cpu=not cuda,
        gradient_checkpointing=spec["gradient_checkpointing"],
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=steps,  # one log, after the last timed step: no per-step host syncs in either arm
        dataloader_num_workers=0,
        seed=spec["seed"],
        disable_tqdm=True,
        model_init_kwargs={
            "dtype": spec["dtype"],
            "attn_implementation": spec.get("ours_attn", "sdpa") if arm == "ours" else "sdpa",
        },
    )
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        options["train_sampling_strategy"] = "sequential"  # both arms see the same rows in the same steps
    if arm == "ours":
        options["max_prompt_length"] = None  # nothing is truncated; the default 256 must be < max_length
    return options


def user_options(arm: str, spec: dict, options: dict, config_class: type) -> tuple[dict, list[str]]:
    """The arm's `--{arm}-args`, parsed and checked against its `DPOConfig`, and the `options` they replace."""
    user = {key: parse_value(value) for key, value in spec[f"{arm}_args"].items()}
    unknown = sorted(set(user) - set(config_class.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"{arm} DPOConfig has no field(s) {', '.join(unknown)}")
    return user, sorted(set(user) & set(options))


def lora_config(spec: dict):
    """The anchor's LoRA (r=16, alpha 32, all linear layers) for the LoRA presets, else None."""
    if not spec["lora"]:
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def quantization_kwargs(spec: dict, torch) -> dict:
    """`quantization_config` (4-bit NF4, compute in the spec's dtype) for the QLoRA preset, else nothing."""
    if not spec.get("qlora"):
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, spec["dtype"])
    )
    return {"quantization_config": config}


def step_profile(spec: dict, torch):
    """A `_profile.StepProfile` when the spec asks where the step's time goes (slows the step a little)."""
    if not spec.get("profile"):
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _profile import StepProfile

    return StepProfile(torch)


def step_trace(spec: dict, torch):
    """A `torch.profiler` for the last timed step when the spec names a trace file (chrome://tracing, Perfetto)."""
    if not spec.get("trace"):
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=False)


class StepClock:
    """The anchor's clock, as `TrainerCallback` hooks (see `clock_callback`): wall time, CPU time and the work
    meter's counts at the start of step `warm` and at the end of step `steps`. Also switches the step profile
    on for the timed steps and traces the last one."""

    def __init__(
        self, warm: int, steps: int, meter: WorkMeter, sync, profile=None, trace=None, trace_path=None
    ):
        self.warm, self.steps, self.meter, self.sync = warm, steps, meter, sync
        self.profile, self.trace, self.trace_path = profile, trace, trace_path
        self.t0 = self.t1 = None
        self.at0 = self.at1 = None
        self.cpu0 = self.cpu1 = None

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        if self.profile is not None and optimizer is not None:
            from _profile import wrap_optimizer

            wrap_optimizer(self.profile, optimizer)

    def on_step_begin(self, args, state, control, **kw):
        if self.trace is not None and state.global_step == self.steps - 1:  # the last timed step, traced
            self.trace.__enter__()
        if state.global_step == self.warm:
            self.sync()
            self.t0, self.at0, self.cpu0 = time.perf_counter(), dict(self.meter.consumed), cpu_seconds()
            if self.profile is not None:
                self.profile.active = True

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.steps:
            self.sync()
            self.t1, self.at1, self.cpu1 = time.perf_counter(), dict(self.meter.consumed), cpu_seconds()
            if self.profile is not None:
                self.profile.active = False
            if self.trace is not None:
                self.trace.__exit__(None, None, None)
                self.trace.export_chrome_trace(self.trace_path)

    def timed(self) -> tuple[float, dict]:
        """(seconds, work done) of the timed steps; fails if the clock missed their start or end."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the clock did not see steps {self.warm} and {self.steps}")
        return self.t1 - self.t0, {key: self.at1[key] - self.at0[key] for key in self.at1}


def clock_callback(**settings) -> StepClock:
    """A `StepClock` that is a `transformers.TrainerCallback` (imported here, after `import_torch`)."""
    from transformers import TrainerCallback

    class Clock(StepClock, TrainerCallback):
        pass

    return Clock(**settings)


def use_sequential_sampler(trainer) -> None:
    """On a transformers without `train_sampling_strategy` (< 5.24): the same rows in the same steps in
    both arms, by overriding the trainer's sampler."""
    from torch.utils.data import SequentialSampler

    trainer._get_train_sampler = lambda dataset=None, *a, **k: SequentialSampler(
        dataset if dataset is not None else trainer.train_dataset
    )


def instrument(trainer, meter: WorkMeter, profile, arm: str) -> None:
    """Count the work of each step the trainer runs and, when profiling, time the parts of the step."""
    if profile is not None:
        from _profile import install

        install(profile, trainer, arm)
    trainer.data_collator = meter.wrap_collator(trainer.data_collator)
    trainer.training_step = meter.wrap_training_step(trainer.training_step)


def timed_figures(clock: StepClock, timed: int, warm: int, load_before, threads: int) -> dict:
    """Seconds, CPU use, machine load, work done and rates of the timed steps."""
    secs, work_done = clock.timed()
    return {
        "timed_s": secs,
        # CPU seconds of this process over the timed steps / (wall seconds x torch threads): well under 1
        # on a CPU run means something else was using the cores.
        "timed_cpu_utilization": (clock.cpu1 - clock.cpu0) / (secs * threads),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "step_s": secs / timed,
        "timed_steps": timed,
        "warmup_steps": warm,
        "timed_pairs": work_done["pairs"],
        "timed_batches": work_done["batches"],
        "timed_real_tokens": work_done["real_tokens"],
        "timed_sequence_tokens": work_done["sequence_tokens"],
        "pairs_per_s": work_done["pairs"] / secs,
        "real_tokens_per_s": work_done["real_tokens"] / secs,
        "sequence_tokens_per_s": work_done["sequence_tokens"] / secs,
    }


def vm_hwm_kib() -> int | None:
    """The process's peak resident memory by `/proc/self/status` (`VmHWM`, KiB), where there is one."""
    status = open("/proc/self/status", encoding="utf-8").read() if os.path.exists("/proc/self/status") else ""
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)


def memory_peaks(torch, cuda: bool, hwm_kib: int | None) -> dict:
    """Peak memory of this process: resident (two ways) and, on a GPU, allocated and reserved by torch."""
    return {
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        "vm_hwm_gib": hwm_kib / 2**20 if hwm_kib else None,
        "cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "cuda_max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }


def library_versions(torch) -> dict:
    """Versions of the libraries under both arms (peft: None where it is not installed)."""
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "python": sys.version.split()[0],
    }


def trained_model_facts(trainer) -> dict:
    """What the arm actually trained: trainable parameters, optimizer, checkpointing, dtypes, attention."""
    model = trainer.model
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "checkpointing_active": any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
        ),
        "model_dtype": str(next(model.parameters()).dtype),
        "trainable_dtype": str(next(p.dtype for p in model.parameters() if p.requires_grad)),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def run(arm: str, spec: dict) -> dict:
    """Train one arm on the prepared files for `warmup + timed` steps; the result `bench_dpo.py` records."""
    wall0 = time.perf_counter()
    load_before = os.getloadavg()
    torch = import_torch(spec.get("threads"))
    from transformers import PreTrainedTokenizerFast, TrainingArguments

    library = import_library(arm)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    work = Path(spec["work_dir"])
    model_dir = str(work / "model")
    rows = [json.loads(line) for line in open(work / "rows.jsonl", encoding="utf-8")]
    expected = json.load(open(work / "row_tokens.json", encoding="utf-8"))
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    warm, timed = spec["warmup_steps"], spec["timed_steps"]

    options = trainer_options(arm, spec, cuda)
    user, overridden = user_options(arm, spec, options, library.config_class)
    options.update(user)
    args = library.config_class(**options)
    peft_config = lora_config(spec)
    quantization = quantization_kwargs(spec, torch)

    meter = WorkMeter()
    profile = step_profile(spec, torch)
    clock = clock_callback(
        warm=warm,
        steps=warm + timed,
        meter=meter,
        sync=torch.cuda.synchronize if cuda else (lambda: None),
        profile=profile,
        trace=step_trace(spec, torch),
        trace_path=spec["trace"].replace("{arm}", arm) if spec.get("trace") else None,
    )
    train_dataset = library.train_dataset(rows)
    init0 = time.perf_counter()
    trainer = library.trainer_class(
        model=model_dir,
        args=args,
        train_dataset=train_dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[clock],
        **quantization,
    )
    init_s = time.perf_counter() - init0
    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        use_sequential_sampler(trainer)
    truncation = check_no_truncation(trainer.train_dataset, expected)
    instrument(trainer, meter, profile, arm)

    train0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train0
    timing = timed_figures(clock, timed, warm, load_before, torch.get_num_threads())

    train_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    hwm_kib = vm_hwm_kib()  # before `library_versions` imports peft
    result = {
        "arm": arm,
        "library": library.info,
        "versions": library_versions(torch),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "layout": getattr(trainer, "layout", "padded"),  # dpo_trainer's resolved layout; TRL 1.16 pads
        **timing,
        **memory_peaks(torch, cuda, hwm_kib),
        "init_s": init_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - wall0,
        **trained_model_facts(trainer),
        "trainer_args_overridden_by_user": overridden,
        "user_args": user,
        "truncation_check": truncation,
        "train_loss": train_log.get("loss"),
        "final_log": train_log,
        "foreign_library_imported": FOREIGN[arm] in sys.modules,
    }
    if profile is not None:
        result["profile_s_per_step"] = profile.per_step(timed, timing["step_s"])
    if result["foreign_library_imported"]:
        raise RuntimeError(f"{FOREIGN[arm]} was imported in the {arm} process")
    return result


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "prepare":
        spec_path, result_path = argv[1:3]
        result = prepare(json.loads(Path(spec_path).read_text()))
    elif command == "run":
        arm, spec_path, result_path = argv[1:4]
        if arm not in ARMS:
            raise SystemExit(f"arm must be one of {ARMS}, got {arm!r}")
        result = run(arm, json.loads(Path(spec_path).read_text()))
    else:
        raise SystemExit(__doc__)
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
