"""The LM head run in chunks: log-probabilities of given target tokens without a `(tokens, vocab)` logits tensor.

For a plain `nn.Linear` head a custom autograd function (`_LinearHeadLogProbs`) keeps only one chunk of logits
alive, in the forward pass and in the backward pass (which recomputes them), and stores a single float32
log-normaliser per token. Other heads (a LoRA-wrapped or quantized head), and a head whose weight an engine
keeps sharded outside the module's own forward (a DeepSpeed ZeRO-3 partition, an FSDP2 DTensor), run the
same chunks through the module under activation checkpointing, so the engine's hooks gather the weight for
each call and again for the recomputation in the backward pass. The same chunks give TRL's per-token
statistics (`TOKEN_STATS`) and WPO's `log sum_v p_v^2` (`head_log_sum_sq_probs`).

    log p(y_t | ...) = z_t[y_t] - logsumexp(z_t),   z_t = head(h_t), then the model's logit transform
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models import is_fsdp_module

# About 64M float32 logits (256 MiB) per chunk when the chunk size is chosen automatically.
AUTO_CHUNK_LOGITS = 1 << 26


def auto_chunk_size(vocab_size: int) -> int:
    """Scored tokens per LM-head chunk so that one chunk holds about `AUTO_CHUNK_LOGITS` logits."""
    return max(1, AUTO_CHUNK_LOGITS // vocab_size)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs a matmul in on `device_type`, or None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    # autocast's own rule: floating tensors go to the autocast dtype, float64 stays as it is
    if tensor is None or dtype is None or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def _logits(hidden: torch.Tensor, weight, bias, softcap: float | None, scale: float):
    """(n, V) float32 logits from inputs already in the matmul dtype, and tanh(z / c) when soft-capped."""
    raw = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        raw = raw * scale
    if softcap is None:
        return raw, None
    tanh = torch.tanh(raw / softcap)
    return softcap * tanh, tanh


# Columns of the per-token statistics `head_token_logps(..., return_stats=True)` gives (TRL's metrics).
TOKEN_STATS = ("mean_logit", "entropy", "is_top1")


@torch.no_grad()
def _token_stats(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, 3) float32 per row of (n, V) logits z: mean_v z_v, the entropy H = lse - sum_v softmax(z)_v z_v,
    and 1.0 where argmax_v z_v (the first maximum) is the target, else 0.0."""
    probs = torch.exp(logits - lse[:, None])
    entropy = lse - (probs * logits).sum(-1)
    top1 = (logits.argmax(-1) == targets).float()
    return torch.stack([logits.mean(-1), entropy, top1], dim=-1)


@torch.no_grad()
def _lse_and_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.logsumexp(logits, -1)` and `_token_stats` of (n, V) logits, sharing one exp over the chunk and
    taking the argmax from the max that logsumexp needs."""
    top, index = logits.max(dim=-1)  # the first maximum, as argmax
    exp = torch.exp(logits - top[:, None])
    total = exp.sum(-1)
    lse = top + torch.log(total)
    entropy = lse - (exp * logits).sum(-1) / total
    return lse, torch.stack([logits.mean(-1), entropy, (index == targets).float()], dim=-1)


class _LinearHeadLogProbs(torch.autograd.Function):
    """token_logps[n] = log_softmax(scale * (hidden[n] @ weight.T + bias), softcapped)[targets[n]], chunked.

    One dtype policy for the forward pass and the backward pass's recomputation: the matmuls run in
    `matmul_dtype` (the autocast dtype when the caller runs under autocast, else the inputs' own), the
    log-normaliser and the logits' gradient in float32, as plain autograd does for
    `log_softmax(F.linear(hidden, weight, bias).float())` under the same autocast. With `with_stats`, a
    second output, without gradient: (N, 3) `_token_stats` of the same logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, scale, matmul_dtype, with_stats):
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        stats = (
            hidden.new_empty(hidden.shape[0], len(TOKEN_STATS), dtype=torch.float32) if with_stats else None
        )
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(weight, matmul_dtype), _cast(bias, matmul_dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                chunk = slice(start, start + chunk_size)
                logits, _ = _logits(_cast(hidden[chunk], matmul_dtype), w, b, softcap, scale)
                if with_stats:
                    lse[chunk], stats[chunk] = _lse_and_token_stats(logits, targets[chunk])
                else:
                    lse[chunk] = torch.logsumexp(logits, dim=-1)
                out[chunk] = logits.gather(-1, targets[chunk, None]).squeeze(-1) - lse[chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap, ctx.scale, ctx.matmul_dtype = chunk_size, softcap, scale, matmul_dtype
        if not with_stats:
            return out
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats=None):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        multi_chunk = hidden.shape[0] > ctx.chunk_size
        acc_dtype = torch.float32 if multi_chunk else weight.dtype  # sum chunk gradients in float32
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(weight, ctx.matmul_dtype), _cast(bias, ctx.matmul_dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                chunk = slice(start, start + ctx.chunk_size)
                h = _cast(hidden[chunk], ctx.matmul_dtype)
                logits, tanh = _logits(h, w, b, ctx.softcap, ctx.scale)  # the forward's logits, recomputed
                g = grad_out[chunk, None]
                # d/dz [z[y] - logsumexp(z)] = onehot(y) - softmax(z)
                grad_logits = -g * torch.exp(logits - lse[chunk, None])
                grad_logits.scatter_add_(-1, targets[chunk, None], g)
                if tanh is not None:
                    grad_logits = grad_logits * (1 - tanh * tanh)
                grad_logits = grad_logits * ctx.scale
                if need_bias:
                    grad_bias += grad_logits.sum(0).to(acc_dtype)
                grad_logits = grad_logits.to(w.dtype)
                if need_hidden:
                    grad_hidden[chunk] = grad_logits @ w
                if need_weight:
                    grad_weight += (grad_logits.T @ h).to(acc_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


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


def _module_chunk_logps(head: nn.Module, hidden, targets, softcap, scale, with_stats=False):
    logits = head(hidden).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_stats:
        return logps
    return logps, _token_stats(logits.detach(), lse.detach(), targets)


def head_token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    scale: float = 1.0,
    return_stats: bool = False,
):
    """Log-probability of each target token under `log_softmax(head(hidden))`, computed in chunks.

    Args:
        hidden: (N, H) hidden states, one per scored token (the position that predicts it).
        head: the LM head; a plain `nn.Linear` with a whole weight takes the fused path (`fused_linear_head`),
            anything else is called per chunk. Under autocast the head's matmul runs in the autocast dtype
            in the forward pass and in the backward pass's recomputation alike; logsumexp in float32.
        targets: (N,) long, the token ids whose log-probabilities are wanted.
        chunk_size: rows per chunk; None chooses from the vocabulary size.
        softcap: Gemma-style final logit soft-capping `c * tanh(z / c)`, or None.
        scale: multiplier applied to the logits before soft-capping (e.g. Cohere's `logit_scale`).
        return_stats: also return, without gradient, (N, 3) float32 statistics of each row's logits z
            (columns `TOKEN_STATS`: mean_v z_v, the entropy of softmax(z), whether the target is argmax z),
            computed chunk by chunk from the same logits: no second pass through the head.

    Returns:
        (N,) float32 log-probabilities; with `return_stats`, also the (N, 3) statistics.
    """
    if fused_linear_head(head):  # also with no rows: the head's parameters then get zero gradients
        size = chunk_size or auto_chunk_size(head.out_features)
        matmul_dtype = autocast_dtype(hidden.device.type)
        return _LinearHeadLogProbs.apply(
            hidden, head.weight, head.bias, targets, size, softcap, scale, matmul_dtype, return_stats
        )
    if hidden.shape[0] == 0:  # still part of the graph, so that every trainable parameter gets a gradient
        connected = 0 * hidden.sum() + sum(0 * p.sum() for p in head.parameters() if p.requires_grad)
        logps = hidden.new_zeros(0, dtype=torch.float32) + connected
        return (logps, hidden.new_zeros(0, len(TOKEN_STATS), dtype=torch.float32)) if return_stats else logps
    vocab = getattr(head, "out_features", None) or 32768
    size = chunk_size or auto_chunk_size(vocab)
    parts = []
    args = (softcap, scale, return_stats)
    for start in range(0, hidden.shape[0], size):
        h, t = hidden[start : start + size], targets[start : start + size]
        if not torch.is_grad_enabled():
            parts.append(_module_chunk_logps(head, h, t, *args))
        elif not any(hasattr(p, "ds_id") for p in head.parameters()):
            parts.append(checkpoint(_module_chunk_logps, head, h, t, *args, use_reentrant=False))
        elif h.requires_grad:
            # ZeRO-3 gathers the weight in the module's forward hooks, which the non-reentrant recomputation
            # does not run again (it would see the empty partition); the reentrant one runs a real forward.
            parts.append(checkpoint(_module_chunk_logps, head, h, t, *args, use_reentrant=True))
        else:  # nothing upstream trains: the reentrant checkpoint would drop the head's own gradients
            parts.append(_module_chunk_logps(head, h, t, *args))
    if return_stats:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return torch.cat(parts)


@torch.no_grad()
def head_log_sum_sq_probs(
    hidden: torch.Tensor,
    head: nn.Module,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """(N,) float32 ``log sum_v p_v^2`` of ``p = softmax(head(hidden))`` per row, in chunks, without gradient.

    WPO's alignment term (Zhou et al. 2024, arXiv 2406.11827, Eq. 2): ``logsumexp(2 z) - 2 logsumexp(z)``.
    """
    vocab = getattr(head, "out_features", None) or 32768
    size = chunk_size or auto_chunk_size(vocab)
    parts = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden.shape[0], size):
        logits = head(hidden[start : start + size]).float() * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        parts.append(torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1))
    return torch.cat(parts)
