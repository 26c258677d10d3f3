"""Shared fixtures: an offline tokenizer, tiny models built from configs, small preference datasets, and
runs of the distributed training script (tests/dist_scripts/train_dpo.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import dpo_trainer  # noqa: E402
from dpo_trainer import DPOConfig  # noqa: E402
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer  # noqa: E402

# The example scripts import their shared modules (`pipeline`, `frontier`, `hh_data`) as `python examples/<script>.py` does.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

TOPICS = ["garden", "river", "music", "bread", "winter", "train", "forest", "paper", "lamp", "coffee"]
GOOD = ["thanks", "happy", "glad", "sure", "here", "helpful", "kindly", "welcome", "great", "answer"]
BAD = ["no", "go", "away", "stupid", "never", "whatever", "boring", "ugh", "leave", "annoying"]


def dpo_config(tmp_path, **overrides) -> DPOConfig:
    """A small CPU training configuration writing under tmp_path; keyword arguments override it.

    float32 and no activation checkpointing (TRL's defaults are bf16 autocast and checkpointing on, which the
    tests of those defaults ask for): the tests compare log-probs and losses with float64 oracles and TRL."""
    settings = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ref_logps_cache_dir=str(tmp_path / "cache"),
    )
    settings.update(overrides)
    return DPOConfig(**settings)


def preference_rows(n: int, seed: int, k: int = 2) -> list[dict]:
    """A learnable task: the preferred reply uses polite words, the other rude ones (ranked: more rude)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "Tell me about the " + " and the ".join(rng.sample(TOPICS, rng.randint(1, 3))) + ":"
        responses = []
        for rank in range(k):
            words = [
                rng.choice(GOOD if rng.random() >= rank / (k - 1) else BAD) for _ in range(rng.randint(2, 7))
            ]
            responses.append(" " + " ".join(words) + ".")
        if k == 2:
            rows.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
        else:
            rows.append({"prompt": prompt, "responses": responses})
    return rows


@pytest.fixture(scope="session")
def tokenizer():
    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in preference_rows(300, seed=123)]
    texts += ["\n\nHuman: hello\n\nAssistant: hi there"] * 3
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def make_model(tokenizer):
    """Factory: a tiny randomly initialised causal LM (same weights for the same seed)."""

    def make(**kwargs):
        kwargs.setdefault("hidden_size", 32)
        kwargs.setdefault("num_layers", 2)
        kwargs.setdefault("num_heads", 4)
        return tiny_causal_lm(tokenizer, **kwargs)

    return make


@pytest.fixture
def pairs():
    return preference_rows(16, seed=0)


# ---------------------------------------------------------------- runs of tests/dist_scripts/train_dpo.py

TESTS = Path(__file__).resolve().parent
DIST_SCRIPT = TESTS / "dist_scripts" / "train_dpo.py"
DIST_TIMEOUT_S = 300
TORCHRUN_TWO_PROCESSES = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
]
# Launcher variables of an outer distributed run would make the single-process run join it.
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def dist_env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("ACCELERATE_")
    }
    src = str(Path(dpo_trainer.__file__).resolve().parent.parent)  # the dpo_trainer this pytest imports
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(TESTS), env.get("PYTHONPATH")) if p)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
        OMP_NUM_THREADS="1",  # two processes on a small CPU: no oversubscription, deterministic kernels
    )
    return env


def launch_dist_script(
    launcher: list[str], out: Path, per_device_batch: int, modes: str, engine="ddp"
) -> dict:
    """Run train_dpo.py under `launcher`; {mode: what rank 0 wrote, plus `out`}. Fails the test on error."""
    cmd = [
        *launcher,
        str(DIST_SCRIPT),
        "--out",
        str(out),
        "--work",
        str(out / "work"),
        "--per-device-batch",
        str(per_device_batch),
        "--modes",
        modes,
        "--engine",
        engine,
    ]
    try:
        proc = subprocess.run(
            cmd, env=dist_env(), cwd=str(out), capture_output=True, text=True, timeout=DIST_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        stderr = (
            error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
        )
        pytest.fail(f"{' '.join(cmd)} timed out after {DIST_TIMEOUT_S}s; stderr tail:\n{stderr[-8000:]}")
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout tail:\n{proc.stdout[-3000:]}\n"
            f"--- stderr tail:\n{proc.stderr[-8000:]}"
        )
    results = {}
    for mode in modes.split(","):
        with open(out / f"{mode}.json") as handle:
            results[mode] = json.load(handle)
        results[mode]["out"] = out
    return results


@pytest.fixture(scope="session")
def one_process_runs(tmp_path_factory):
    """train_dpo.py in one plain process, batch 4: the `live`, `lora` and `adapter` runs every launch is
    compared to."""
    return launch_dist_script(
        [sys.executable], tmp_path_factory.mktemp("one_process"), 4, "live,lora,adapter"
    )


# TRL's metric names, logged by the trainer (eval_-prefixed in evaluation)
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture
def model_dir(tmp_path, make_model, tokenizer):
    """A tiny model and its tokenizer saved to a folder, as a hub checkpoint would be."""
    path = tmp_path / "tiny-model"
    make_model(seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
