"""Per-sequence log-probabilities of the scored tokens, without a `(batch, seq, vocab)` logits tensor.

The model runs up to its last hidden layer; only the hidden states named by the batch's scoring plan go
through the LM head, a chunk at a time. For a plain `nn.Linear` head a custom autograd function keeps only
one chunk of logits alive, in the forward pass and in the backward pass (which recomputes them), and
stores a single float32 log-normaliser per token. Other heads (a LoRA-wrapped or quantized head), and a
head whose weight an engine keeps sharded outside the module's own forward (a DeepSpeed ZeRO-3 partition,
an FSDP2 DTensor), run the same chunks through the module under activation checkpointing, so the
engine's hooks gather the weight for each call and again for the recomputation in the backward pass.

    log p(y | x) = sum_t [ z_t[y_t] - logsumexp(z_t) ],   z_t = head(h_t)       (paper Eq. 7, log π(y|x))
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import grouped_attention_mask

# About 64M float32 logits (256 MiB) per chunk when the chunk size is chosen automatically.
AUTO_CHUNK_LOGITS = 1 << 26


def auto_chunk_size(vocab_size: int) -> int:
    """Scored tokens per LM-head chunk so that one chunk holds about `AUTO_CHUNK_LOGITS` logits."""
    return max(1, AUTO_CHUNK_LOGITS // vocab_size)


def _logits(hidden: torch.Tensor, weight, bias, softcap: float | None, scale: float):
    raw = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        raw = raw * scale
    if softcap is None:
        return raw, None
    tanh = torch.tanh(raw / softcap)
    return softcap * tanh, tanh


class _LinearHeadLogProbs(torch.autograd.Function):
    """token_logps[n] = log_softmax(scale * (hidden[n] @ weight.T + bias), softcapped)[targets[n]], chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, scale):
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            logits, _ = _logits(hidden[chunk], weight, bias, softcap, scale)
            lse[chunk] = torch.logsumexp(logits, dim=-1)
            out[chunk] = logits.gather(-1, targets[chunk, None]).squeeze(-1) - lse[chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap, ctx.scale = chunk_size, softcap, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        multi_chunk = hidden.shape[0] > ctx.chunk_size
        acc_dtype = torch.float32 if multi_chunk else weight.dtype  # sum chunk gradients in float32
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            logits, tanh = _logits(hidden[chunk], weight, bias, ctx.softcap, ctx.scale)
            g = grad_out[chunk, None]
            # d/dz [z[y] - logsumexp(z)] = onehot(y) - softmax(z)
            grad_logits = -g * torch.exp(logits - lse[chunk, None])
            grad_logits.scatter_add_(-1, targets[chunk, None], g)
            if tanh is not None:
                grad_logits = grad_logits * (1 - tanh * tanh)
            grad_logits = (grad_logits * ctx.scale).to(weight.dtype)
            if need_hidden:
                grad_hidden[chunk] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.T @ hidden[chunk]).to(acc_dtype)
            if need_bias:
                grad_bias += grad_logits.sum(0).to(acc_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is only this process's piece of a parameter: a DTensor (FSDP2) or a ZeRO-3 partition."""
    if hasattr(tensor, "ds_id"):  # DeepSpeed ZeRO-3 marks its partitioned parameters
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(tensor, DTensor)


def fused_linear_head(head: nn.Module) -> bool:
    """Whether the fused path may read `head.weight` directly: a plain `nn.Linear` whose weight is whole here.

    FSDP2 turns the head into a subclass of its own class (`FSDPLinear`); after the model's forward a
    parameter group that is not resharded (accelerate's group of final norm and head) holds plain tensors,
    which the fused path may use; a resharded one holds DTensors, which it may not.
    """
    cls = type(head)
    if cls is not nn.Linear and not (is_fsdp_module(head) and nn.Linear in cls.__bases__):
        return False  # subclasses of nn.Linear (LoRA, bitsandbytes) compute something else in forward
    return not any(_is_sharded(p) for p in (head.weight, head.bias) if p is not None)


def is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _module_chunk_logps(head: nn.Module, hidden, targets, softcap, scale):
    logits = head(hidden).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Log-probability of each target token under `log_softmax(head(hidden))`, computed in chunks.

    Args:
        hidden: (N, H) hidden states, one per scored token (the position that predicts it).
        head: the LM head; a plain `nn.Linear` with a whole weight takes the fused path (`fused_linear_head`),
            anything else is called per chunk.
        targets: (N,) long, the token ids whose log-probabilities are wanted.
        chunk_size: rows per chunk; None chooses from the vocabulary size.
        softcap: Gemma-style final logit soft-capping `c * tanh(z / c)`, or None.
        scale: multiplier applied to the logits before soft-capping (e.g. Cohere's `logit_scale`).

    Returns:
        (N,) float32 log-probabilities.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    if fused_linear_head(head):
        size = chunk_size or auto_chunk_size(head.out_features)
        return _LinearHeadLogProbs.apply(hidden, head.weight, head.bias, targets, size, softcap, scale)
    vocab = getattr(head, "out_features", None) or 32768
    size = chunk_size or auto_chunk_size(vocab)
    parts = []
    for start in range(0, hidden.shape[0], size):
        h, t = hidden[start : start + size], targets[start : start + size]
        if not torch.is_grad_enabled():
            parts.append(_module_chunk_logps(head, h, t, softcap, scale))
        elif not any(hasattr(p, "ds_id") for p in head.parameters()):
            parts.append(checkpoint(_module_chunk_logps, head, h, t, softcap, scale, use_reentrant=False))
        elif h.requires_grad:
            # ZeRO-3 gathers the weight in the module's forward hooks, which the non-reentrant recomputation
            # does not run again (it would see the empty partition); the reentrant one runs a real forward.
            parts.append(checkpoint(_module_chunk_logps, head, h, t, softcap, scale, use_reentrant=True))
        else:  # nothing upstream trains: the reentrant checkpoint would drop the head's own gradients
            parts.append(_module_chunk_logps(head, h, t, softcap, scale))
    return torch.cat(parts)


def unwrap(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` inside DDP / DeepSpeed / torch.compile / PEFT wrappers (LoRA layers stay in it)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _head_transform(config) -> tuple[float | None, float]:
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return softcap, float(scale) if isinstance(scale, int | float) else 1.0


def sequence_logps(model: nn.Module, batch: Mapping[str, torch.Tensor], *, chunk_size: int | None = None):
    """Summed log-probabilities of every response in `batch` under `model`.

    `model` is called through whatever wraps it (DDP, DeepSpeed, PEFT), so gradient synchronisation and
    adapters work as usual; a forward hook on its decoder takes the last hidden states and the model's own
    head only sees one position per row (`logits_to_keep=1`).

    Args:
        model: a causal LM, possibly wrapped.
        batch: a collated batch with `input_ids`, `attention_mask` (optional `position_ids`) of shape
            (rows, T) and the scoring plan `score_index`, `score_target`, `score_seq` (N,) and
            `response_lengths` (B, K); rows are response-major (row k*B + b is response k of example b).

    Returns:
        (B, K) float32: column k is the summed log-probability of response k.
    """
    inner = unwrap(model)
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    model_inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "doc_ids" in batch:  # packed / shared-prompt layouts: an explicit mask in the form the model takes
        model_inputs["attention_mask"] = grouped_attention_mask(batch, inner)
        model_inputs["position_ids"] = batch["position_ids"]
    else:
        model_inputs["attention_mask"] = batch.get("attention_mask")
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        model_inputs["logits_to_keep"] = 1
    handle = decoder.register_forward_hook(keep_hidden)
    try:
        model(**model_inputs)
    finally:
        handle.remove()

    hidden = captured["hidden"]
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["score_index"])
    softcap, scale = _head_transform(inner.config)
    token_logps = head_token_logps(
        flat, head, batch["score_target"], chunk_size=chunk_size, softcap=softcap, scale=scale
    )
    b, k = batch["response_lengths"].shape
    per_sequence = torch.zeros(k * b, dtype=torch.float32, device=token_logps.device)
    per_sequence = per_sequence.index_add(0, batch["score_seq"], token_logps)
    return per_sequence.view(k, b).T
