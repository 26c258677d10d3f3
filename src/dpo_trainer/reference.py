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
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .logprobs import sequence_logps, unwrap

CACHE_FORMAT_VERSION = 1


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference is never updated."""
    model.eval()
    model.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in `model` to 0 (modules and the configs that attention reads)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(unwrap(model), "config", None)
    if config is not None:
        for name in ("attention_dropout", "attn_pdrop", "hidden_dropout", "resid_pdrop", "embd_pdrop"):
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)


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


def reference_logps(
    policy: nn.Module,
    ref_model: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reference log-probs of every response in `batch`: (B, K) float32, no gradient.

    Uses `batch["ref_logps"]` when the batch carries precomputed values, else `ref_model`, else the
    policy with its adapter disabled (which requires a PEFT policy).
    """
    if "ref_logps" in batch:
        return batch["ref_logps"].float()
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, batch, chunk_size=chunk_size)
        if not is_peft_model(unwrap_to_peft(policy)):
            raise ValueError(
                "No reference: pass ref_model, train a PEFT adapter, or precompute reference log-probs."
            )
        with _adapter_disabled_eval(policy):
            return sequence_logps(policy, batch, chunk_size=chunk_size)


def unwrap_to_peft(model: nn.Module) -> nn.Module:
    """The `PeftModel` inside DDP / DeepSpeed wrappers (or `model` itself)."""
    while not is_peft_model(model) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


# ---------------------------------------------------------------- precomputation and its cache


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the reference weights: names, shapes, dtypes and a strided sample of every tensor's values.

    Adapter weights (names containing `lora_`) are left out: the reference is the base model. The sample
    (4096 evenly spaced values per tensor, plus their sum) changes whenever training touches the tensor.
    """
    digest = hashlib.sha256()
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


def load_cached(path: str, num_rows: int) -> torch.Tensor | None:
    if not os.path.exists(path):
        return None
    values = load_file(path)["ref_logps"]
    return values if values.shape[0] == num_rows else None


def save_cached(path: str, values: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"ref_logps": values.contiguous()}, tmp)
    os.replace(tmp, path)  # never leaves a half-written cache file under the real name


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
