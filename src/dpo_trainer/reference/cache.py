"""The on-disk cache of precomputed reference log-probs: its key (fingerprints of the reference, the tokenizer
and the tokenized rows), its files (validated on load, written atomically) and the cleanup of temporaries that
killed writers left behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..guards import reference_problem
from ..models import unwrap
from .sync import REFERENCE_ADAPTER

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the key covers the model config and the tokenizer
# config fields that name or place a model without changing what it computes
_UNHASHED_CONFIG_KEYS = (
    "_name_or_path",
    "transformers_version",
    "_commit_hash",
    "use_cache",
    "architectures",
)
# A cache temporary of a writer on another machine (whose process cannot be looked up) this old was left by a
# killed process; one of a writer on this machine is removed as soon as that process is gone.
STALE_TEMPORARY_S = 3600
# safetensors metadata field holding the key a cache file was written under (its name, less ".safetensors")
CACHE_KEY_FIELD = "dpo_trainer_cache_key"


def model_fingerprint(model: nn.Module, tokenizer=None) -> str:
    """A hash of the reference: its config, the tokenizer, and the weights' names, shapes, dtypes and values.

    The config counts (the same weights with another `rope_theta` or activation compute other log-probs),
    except fields that only name the model (`_UNHASHED_CONFIG_KEYS`). The tokenizer's vocabulary and
    special tokens count when `tokenizer` is given. Adapter weights (names containing `lora_`) are left
    out, except those of the frozen reference adapter (`REFERENCE_ADAPTER`, a copy of an adapter given with
    the model): the reference is the base model, plus that adapter when there is one. Values are sampled
    (4096 evenly spaced values per tensor, plus their sum), which changes whenever training touches the tensor.
    """
    digest = hashlib.sha256()
    config = getattr(unwrap(model), "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in _UNHASHED_CONFIG_KEYS}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items())
        special = sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))
        digest.update(json.dumps([type(tokenizer).__name__, vocab, special]).encode())
    for name, tensor in _whole_state(model):
        if "lora_" in name and REFERENCE_ADAPTER not in name.split("."):
            continue
        if (
            tensor.is_meta
        ):  # not loaded on this process (FSDP's cpu_ram_efficient_loading): rank 0's key is used
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|meta".encode())
            continue
        update_with_tensor(digest, name, tensor)
    return digest.hexdigest()[:24]


def update_with_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    """Hash one tensor into `digest`: its name, shape, dtype, sum and 4096 evenly spaced values, which change
    whenever training touches the tensor."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{flat.float().sum().item():.8e}".encode())
    digest.update(flat[::step].float().cpu().numpy().tobytes())


def _whole_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `model`'s state dict with every tensor whole on every process.

    A ZeRO-3 partition is gathered for the moment it is read, an FSDP2 DTensor assembled; both are
    collectives, so every process must walk the same model. Other tensors are yielded as they are.
    """
    module = unwrap(model)
    parameters = dict(module.named_parameters())
    for name, tensor in module.state_dict().items():
        parameter = parameters.get(name)
        if parameter is not None and hasattr(parameter, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                yield name, parameter.detach().clone()
        elif hasattr(tensor, "full_tensor"):  # torch.distributed.tensor.DTensor (FSDP2)
            yield name, tensor.full_tensor()
        else:
            yield name, tensor


def rows_fingerprint(rows: Iterable[Mapping]) -> str:
    """A hash of the tokenized rows (`prompt_ids`, `response_ids`) in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["prompt_ids"], row["response_ids"]], separators=(",", ":")).encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "dpo_trainer", "ref_logps")


def cache_path(cache_dir: str | None, model_key: str, data_key: str, settings: Mapping) -> str:
    settings_key = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:12]
    name = f"v{CACHE_FORMAT_VERSION}-{model_key}-{data_key}-{settings_key}.safetensors"
    return os.path.join(cache_dir or default_cache_dir(), name)


def cache_key(path: str) -> str:
    """The key a cache file at `path` belongs to: its name (model, data and settings keys), stored inside it."""
    name = os.path.basename(path)
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def load_cached(path: str, num_rows: int, num_responses: int | None = None) -> torch.Tensor | None:
    """The cached (num_rows, K) float32 reference log-probs at `path`, or None to compute them.

    A file that cannot be read, was written under another key than its name's (copied or renamed from another
    run's cache: the key is stored inside the file) or holds unusable values (another shape or dtype, NaN or
    inf, a log-probability above 0) is named in a warning and deleted, so that it is recomputed and rewritten.
    """
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            stored = (handle.metadata() or {}).get(CACHE_KEY_FIELD)
        values = load_file(path)["ref_logps"]
    except Exception as error:  # safetensors raises its own error types for a corrupt file
        return _discard(path, f"it cannot be read ({type(error).__name__}: {error})")
    if stored != cache_key(path):
        written = "no key (not written by this version of dpo_trainer)" if stored is None else f"key {stored}"
        return _discard(
            path, f"it holds {written}, not its name's, {cache_key(path)}: copied from another run?"
        )
    expected = (num_rows, num_responses if num_responses is not None else values.shape[-1])
    if values.dim() != 2 or tuple(values.shape) != expected:
        return _discard(path, f"it holds shape {tuple(values.shape)} where {expected} is expected")
    if values.dtype != torch.float32:
        return _discard(path, f"it holds {values.dtype} where float32 is expected")
    problem = reference_problem(values)
    if problem:
        return _discard(path, problem)
    return values


def _discard(path: str, reason: str) -> None:
    logger.warning("Reference log-prob cache %s is unusable (%s): deleting it and recomputing.", path, reason)
    with contextlib.suppress(FileNotFoundError):  # another process may have deleted it first
        os.remove(path)
    return None


def _this_machine() -> str:
    """This machine as a cache temporary's name gives it: the host name, and the PID namespace where there is
    one (two containers may share a host name and a folder, not their processes)."""
    with contextlib.suppress(OSError):
        return f"{socket.gethostname()}@{os.readlink('/proc/self/ns/pid').strip('pid:[]')}"
    return socket.gethostname()


def _temporary_name(path: str) -> str:
    return f"{path}.tmp-{_this_machine()}-{os.getpid()}"


def _process_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this machine (POSIX; elsewhere never claimed)."""
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    return False


def _dead_writer(name: str, machine: str) -> bool:
    """Whether the temporary `name` (`_temporary_name`) was written by a process of `machine` that is gone."""
    writer, _, pid = name.split(".tmp-", 1)[1].rpartition("-")
    return writer == machine and pid.isdigit() and int(pid) != os.getpid() and _process_gone(int(pid))


def cache_dir_problem(cache_dir: str) -> str | None:
    """Why reference log-probs cannot be cached in `cache_dir` (created if missing), or None.

    Also deletes temporaries that killed processes left there: at once where the writer ran on this machine
    and is gone, else once older than `STALE_TEMPORARY_S`.
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f".probe-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "wb") as handle:
            handle.write(b"0")
        os.remove(probe)
    except OSError as error:
        return f"{cache_dir} is not writable ({error})"
    now, machine = time.time(), _this_machine()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if ".tmp-" in name:
            with contextlib.suppress(OSError):
                if _dead_writer(name, machine) or now - os.path.getmtime(path) > STALE_TEMPORARY_S:
                    os.remove(path)
    return None


def save_cached(path: str, values: torch.Tensor) -> bool:
    """Write `values` to `path` atomically, with the key of its name inside (`load_cached` checks it); on
    failure warn, leave no temporary behind and return False."""
    tmp = _temporary_name(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(
            {"ref_logps": values.float().contiguous()}, tmp, metadata={CACHE_KEY_FIELD: cache_key(path)}
        )
        os.replace(tmp, path)  # never leaves a half-written cache file under the real name
        return True
    except OSError as error:
        logger.warning("Could not cache reference log-probs at %s (%s); training goes on.", path, error)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
