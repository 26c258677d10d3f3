"""What `on_policy_pairs` keeps on disk to resume: fingerprints of a policy and a scorer, and chunk files.

A cache folder ``<cache_dir>/<key>/`` holds ``settings.json`` (what ``key`` hashes) and one
``chunk-<start>-<prompts hash>.json`` per finished chunk of prompts: ``{"key", "start", "prompts", "samples",
"scores"}``. Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a
reader sees a whole file or none; a file that does not parse, or was written for other prompts or settings,
is ignored (with a warning) and its chunk sampled again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping

import torch

from ..reference.cache import update_with_tensor

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
# Attributes of a scorer that do not change its scores (or are secrets, or change as it runs).
_SCORER_ATTRIBUTES_IGNORED = frozenset(
    {
        "disable_progress",
        "api_key",
        "unparsed",
        "max_retries",
        "timeout",
        "retry_delay",
        "cache_file",
        "training",
    }
)


def settings_key(settings: Mapping) -> str:
    """The key of a cache folder: a hash of ``settings`` (plain JSON values) and the cache format."""
    return text_hash(json.dumps({"version": CACHE_FORMAT_VERSION, **settings}, sort_keys=True))


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def policy_fingerprint(model, tokenizer=None) -> str:
    """A hash of what a policy samples with: its config, generation EOS, active adapters, every weight
    (adapter weights included: a policy's adapter is what training changed), and the tokenizer.

    Values are sampled (4096 evenly spaced values per tensor, plus their sum), which changes whenever
    training touches the tensor. Unlike `dpo_trainer.reference.model_fingerprint` (the reference's hash,
    which leaves the trained adapter out on purpose), nothing is left out.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        fields = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        fields.pop("_name_or_path", None)
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    generation_config = getattr(model, "generation_config", None)
    digest.update(repr(getattr(generation_config, "eos_token_id", None)).encode())
    digest.update(repr(getattr(model, "active_adapters", None)).encode())
    _update_with_weights(digest, model)
    if tokenizer is not None:
        digest.update(_tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:24]


def _update_with_weights(digest, module: torch.nn.Module) -> None:
    for name, tensor in module.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor: every process walks the same model
            tensor = tensor.full_tensor()
        update_with_tensor(digest, name, tensor)


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    special = sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))
    return text_hash(
        json.dumps([type(tokenizer).__name__, vocab, special, getattr(tokenizer, "eos_token_id", None)])
    )


def scorer_fingerprint(scorer) -> str:
    """A hash of what a scorer's scores depend on, as far as its attributes tell: its type; its public
    attributes that are plain values; a model attribute's config, weights and plain attributes; a
    tokenizer's vocabulary; a function's source (or name). Progress switches, secrets and counters are
    left out. Anything else counts by its type only: pass ``scorer_key`` to `dpo_trainer.evaluation.on_policy_pairs` when that is
    not enough."""
    parts = [f"{type(scorer).__module__}.{type(scorer).__qualname__}"]
    attributes = vars(scorer) if hasattr(scorer, "__dict__") else {}
    for name, value in sorted(attributes.items()):
        if name.startswith("_") or name in _SCORER_ATTRIBUTES_IGNORED:
            continue
        parts.append(f"{name}={_value_fingerprint(value)}")
    return text_hash("\n".join(parts))


def _value_fingerprint(value) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)) and all(
        item is None or isinstance(item, (bool, int, float, str)) for item in value
    ):
        return repr(value)
    if isinstance(value, torch.nn.Module):
        digest = hashlib.sha256()
        for module_name, module in value.named_modules():
            plain = {
                k: v
                for k, v in vars(module).items()
                if not k.startswith("_")
                and k not in _SCORER_ATTRIBUTES_IGNORED
                and isinstance(v, (bool, int, float, str))
            }
            digest.update(f"{module_name}|{type(module).__name__}|{sorted(plain.items())}".encode())
        return f"module:{policy_fingerprint(value)}:{digest.hexdigest()[:24]}"
    if hasattr(value, "get_vocab"):
        return f"tokenizer:{_tokenizer_fingerprint(value)}"
    if callable(value):
        name = (
            f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
        )
        try:
            source = inspect.getsource(value)
        except (OSError, TypeError):
            source = ""
        return f"callable:{name}:{text_hash(source)}"
    return f"object:{type(value).__module__}.{type(value).__qualname__}"


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    directory = os.path.dirname(path)
    handle = tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tmp-", suffix=".json", delete=False)
    try:
        with handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise


def read_chunk(path: str, key: str, start: int, chunk: list[str], n: int):
    """``(samples, scores)`` of a chunk written earlier under the same key and prompts, else None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            payload = json.load(handle)
        samples, scores = payload["samples"], payload["scores"]
        valid = (
            payload.get("key") == key
            and payload.get("start") == start
            and payload.get("prompts") == chunk
            and len(samples) == len(scores) == len(chunk)
            and all(len(row) == n and all(isinstance(text, str) for text in row) for row in samples)
            and all(len(row) == n and all(math.isfinite(float(value)) for value in row) for row in scores)
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("on-policy sample cache: ignoring the unreadable cache file %s (%s)", path, error)
        return None
    if not valid:
        logger.warning(
            "on-policy sample cache: ignoring the cache file %s, written for other prompts or settings", path
        )
        return None
    return samples, [[float(value) for value in row] for row in scores]


def chunk_path(run_dir: str, start: int, chunk: list[str]) -> str:
    """The file of the chunk of prompts ``chunk`` that starts at prompt ``start``."""
    return os.path.join(run_dir, f"chunk-{start:08d}-{text_hash(json.dumps(chunk))}.json")


def write_chunk(run_dir: str, key: str, start: int, chunk: list[str], samples, scores) -> None:
    """Write a finished chunk (its prompts, ``samples`` and ``scores``, ``n`` per prompt) to its file."""
    payload = dict(key=key, start=start, prompts=chunk, samples=samples, scores=scores)
    write_json(chunk_path(run_dir, start, chunk), payload)
