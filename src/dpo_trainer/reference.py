"""The reference model π_ref: one helper for training, evaluation and precomputation, and the on-disk cache.

Strategies, chosen by `DPOTrainer` (see its docstring):
  * a separate frozen model (`ref_model` given, or a frozen copy of the policy for full fine-tuning);
  * the policy itself with its PEFT adapter disabled (one copy of the base weights);
  * log-probs precomputed once before training and read from the batch (`ref_logps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .guards import reference_problem
from .logprobs import sequence_logps, unwrap

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
STALE_TEMPORARY_S = 3600  # a cache temporary this old was left by a killed process


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference is never updated."""
    model.eval()
    model.requires_grad_(False)
    return model


# Models whose forward reads a dropout probability from the config itself (transformers 5.24), which
# `disable_dropout` leaves alone: the config is the caller's, and it is saved with the model.
_DROPOUT_READ_FROM_CONFIG = {
    "falcon": ("attention_dropout", "hidden_dropout"),
    "persimmon": ("attention_dropout",),
    "blt": ("dropout",),
}


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability inside `model` to 0, leaving its config (which is saved) unchanged.

    Zeroes the `nn.Dropout` modules (and their 1d/2d/3d/alpha variants) and the probabilities modules keep
    as float attributes for a functional dropout: Llama-family attention copies `config.attention_dropout`
    into `self.attention_dropout` when it is built, others keep `dropout`, `attn_pdrop`, `layerdrop`, ...
    (every float attribute whose name contains "drop"). Warns for a model whose forward reads its dropout
    from the config (`_DROPOUT_READ_FROM_CONFIG`).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "drop" in name.lower() and isinstance(value, float) and value != 0.0:
                setattr(module, name, 0.0)
    config = getattr(unwrap(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = _DROPOUT_READ_FROM_CONFIG.get(getattr(text_config, "model_type", None), ())
    left = [name for name in names if getattr(text_config, name, 0.0)]
    if left:
        logger.warning(
            "%s reads %s from its config in its forward pass; dropout stays on there (set them to 0 in the "
            "config when loading the model to turn it off).",
            type(unwrap(model)).__name__,
            ", ".join(left),
        )


@contextlib.contextmanager
def _adapter_disabled_eval(policy: nn.Module):
    """The policy's base weights in eval mode: adapters off and dropout off, restored on exit."""
    peft_model = unwrap_to_peft(policy)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


@contextlib.contextmanager
def _reference_adapter_eval(policy: nn.Module, reference_adapter: str):
    """The policy's frozen reference adapter active, in eval mode (TR-DPO with PEFT, `callbacks.REFERENCE_ADAPTER`).

    On exit the adapter that was active is active again, every parameter has its `requires_grad` back (peft's
    `set_adapter` makes the adapter it activates trainable and the others frozen) and the training mode is
    restored.
    """
    peft_model = unwrap_to_peft(policy)
    active, was_training = peft_model.active_adapter, peft_model.training
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]
    peft_model.eval()
    try:
        peft_model.set_adapter(reference_adapter)
        yield
    finally:
        peft_model.set_adapter(active)
        for param, flag in flags:
            param.requires_grad_(flag)
        peft_model.train(was_training)


def reference_logps(
    policy: nn.Module,
    ref_model: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reference log-probs of every response in `batch`: (B, K) float32, no gradient.

    Uses `batch["ref_logps"]` when the batch carries precomputed values, else `ref_model`, else (a PEFT
    policy) the policy's reference adapter `callbacks.REFERENCE_ADAPTER` when it has one (TR-DPO's
    `sync_ref_model`), else the policy with its adapter disabled.
    """
    if "ref_logps" in batch:
        return batch["ref_logps"].float()
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, batch, chunk_size=chunk_size)
        peft_model = unwrap_to_peft(policy)
        if not is_peft_model(peft_model):
            raise ValueError(
                "No reference: pass ref_model, train a PEFT adapter, or precompute reference log-probs."
            )
        from .callbacks import REFERENCE_ADAPTER  # callbacks imports this module

        if REFERENCE_ADAPTER in peft_model.peft_config:
            with _reference_adapter_eval(policy, REFERENCE_ADAPTER):
                return sequence_logps(policy, batch, chunk_size=chunk_size)
        with _adapter_disabled_eval(policy):
            return sequence_logps(policy, batch, chunk_size=chunk_size)


def unwrap_to_peft(model: nn.Module) -> nn.Module:
    """The `PeftModel` inside DDP / DeepSpeed wrappers (or `model` itself)."""
    while not is_peft_model(model) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


# ---------------------------------------------------------------- precomputation and its cache


def model_fingerprint(model: nn.Module, tokenizer=None) -> str:
    """A hash of the reference: its config, the tokenizer, and the weights' names, shapes, dtypes and values.

    The config counts (the same weights with another `rope_theta` or activation compute other log-probs),
    except fields that only name the model (`_UNHASHED_CONFIG_KEYS`). The tokenizer's vocabulary and
    special tokens count when `tokenizer` is given. Adapter weights (names containing `lora_`) are left
    out: the reference is the base model. Values are sampled (4096 evenly spaced values per tensor, plus
    their sum), which changes whenever training touches the tensor.
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
        if "lora_" in name:
            continue
        if (
            tensor.is_meta
        ):  # not loaded on this process (FSDP's cpu_ram_efficient_loading): rank 0's key is used
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|meta".encode())
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{flat.float().sum().item():.8e}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


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


def load_cached(path: str, num_rows: int, num_responses: int | None = None) -> torch.Tensor | None:
    """The cached (num_rows, K) float32 reference log-probs at `path`, or None to compute them.

    A file that cannot be read or holds unusable values (another shape or dtype, NaN or inf, a
    log-probability above 0) is named in a warning and deleted, so that it is recomputed and rewritten.
    """
    if not os.path.exists(path):
        return None
    try:
        values = load_file(path)["ref_logps"]
    except Exception as error:  # safetensors raises its own error types for a corrupt file
        return _discard(path, f"it cannot be read ({type(error).__name__}: {error})")
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


def cache_dir_problem(cache_dir: str) -> str | None:
    """Why reference log-probs cannot be cached in `cache_dir` (created if missing), or None.

    Also deletes temporaries that killed processes left there (older than `STALE_TEMPORARY_S`).
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f".probe-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "wb") as handle:
            handle.write(b"0")
        os.remove(probe)
    except OSError as error:
        return f"{cache_dir} is not writable ({error})"
    now = time.time()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if ".tmp-" in name:
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(path) > STALE_TEMPORARY_S:
                    os.remove(path)
    return None


def save_cached(path: str, values: torch.Tensor) -> bool:
    """Write `values` to `path` atomically; on failure warn, leave no temporary behind and return False."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"ref_logps": values.float().contiguous()}, tmp)
        os.replace(tmp, path)  # never leaves a half-written cache file under the real name
        return True
    except OSError as error:
        logger.warning("Could not cache reference log-probs at %s (%s); training goes on.", path, error)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def compute_dataset_reference_logps(
    batches: Iterable[Mapping[str, torch.Tensor]],
    logps_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    *,
    total: int | None,
    desc: str,
    disable_progress: bool = False,
    num_responses: int = 2,
) -> torch.Tensor:
    """Run `logps_fn` over `batches` in order and stack the results: (rows, K) float32 on CPU."""
    outputs = [torch.zeros(0, num_responses)]  # a process given no rows returns an empty (0, K)
    for batch in tqdm(batches, total=total, desc=desc, disable=disable_progress):
        outputs.append(logps_fn(batch).float().cpu())
    return torch.cat(outputs)
