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
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import grouped_attention_mask
from .models import is_fsdp_module, unwrap

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


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its head's output before the softmax: `z = scale * head(h)`, then, when
    `softcap` is set, `z = softcap * tanh(z / softcap)` (Gemma-2's final logit soft-capping)."""

    scale: float = 1.0
    softcap: float | None = None


def _number(config, name: str, default: float | None) -> float | None:
    value = getattr(config, name, None)
    return default if value is None else float(value)


def _softcapped(name: str = "final_logit_softcapping"):
    return lambda config: LogitTransform(softcap=_number(config, name, None))


def _times(name: str):
    return lambda config: LogitTransform(scale=_number(config, name, 1.0))


def _divided_by(name: str):
    return lambda config: LogitTransform(scale=1.0 / _number(config, name, 1.0))


# The logit transforms of transformers' causal LMs (written against transformers 5.24: the lines of each
# `<Model>ForCausalLM.forward` between the LM head and the returned logits), keyed by the model type of the
# text config. Each entry is tested on a tiny model of its architecture (tests/test_head.py). A model not
# listed gets no transform; `check_sequence_logps` refuses it when its logits say otherwise.
LOGIT_TRANSFORMS = {
    "gemma2": _softcapped(),
    "gemma3_text": _softcapped(),
    "gemma4_text": _softcapped(),
    "vaultgemma": _softcapped(),
    "nanochat": _softcapped(),
    "beam": _softcapped(),
    "inkling2_text": _softcapped(),
    "recurrent_gemma": _softcapped("logits_soft_cap"),
    "cohere": _times("logit_scale"),
    "cohere2": _times("logit_scale"),
    "cohere2_moe": _times("logit_scale"),
    "granite": _divided_by("logits_scaling"),
    "granite_swa": _divided_by("logits_scaling"),
    "granitemoe": _divided_by("logits_scaling"),
    "granitemoe_swa": _divided_by("logits_scaling"),
    "granitemoeshared": _divided_by("logits_scaling"),
    "granitemoehybrid": _divided_by("logits_scaling"),
    "minicpm3": _divided_by("logits_scaling"),  # divides the hidden state before its bias-free head
    "hyperclovax": _times("logits_scaling"),  # Granite's name, the other way round
    "falcon_h1": _times("lm_head_multiplier"),
}


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transform `model` applies to its head's output (`LOGIT_TRANSFORMS`); none for other models."""
    config = unwrap(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    entry = LOGIT_TRANSFORMS.get(getattr(text_config, "model_type", None))
    return entry(text_config) if entry is not None else LogitTransform()


@dataclass
class ResponseScores:
    """What one forward pass of `score_responses` gives for a batch of B examples of K responses each.

    Attributes:
        logps: (B, K) float32, column k the summed log-probability of response k (with gradient).
        aux_loss: the scalar Mixture-of-Experts load-balancing loss of the pass (with gradient), when asked.
        wpo_logps: (B, K) WPO's aligned means (no gradient), when asked.
        token_stats: (B, K, 3) float32 sums of the head's `TOKEN_STATS` (no gradient), when asked.
    """

    logps: torch.Tensor
    aux_loss: torch.Tensor | None = None
    wpo_logps: torch.Tensor | None = None
    token_stats: torch.Tensor | None = None


def sequence_logps(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, chunk_size: int | None = None
) -> torch.Tensor:
    """(B, K) float32 summed log-probabilities of every response in `batch` under `model` (`score_responses`)."""
    return score_responses(model, batch, chunk_size=chunk_size).logps


def score_responses(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int | None = None,
    return_aux_loss: bool = False,
    return_wpo_logps: bool = False,
    return_token_stats: bool = False,
) -> ResponseScores:
    """Summed log-probabilities of every response in `batch` under `model`, and what the same pass can add.

    `model` is called through whatever wraps it (DDP, DeepSpeed, PEFT), so gradient synchronisation and
    adapters work as usual; a forward hook on its decoder takes the last hidden states and the model's own
    head only sees one position per row (`logits_to_keep=1`).

    Args:
        model: a causal LM, possibly wrapped.
        batch: a collated batch with `input_ids`, `attention_mask` (optional `position_ids`) of shape
            (rows, T) and the scoring plan `score_index`, `score_target`, `score_seq` (N,) and
            `response_lengths` (B, K); rows are response-major (row k*B + b is response k of example b).
            An optional `score_weight` (N,) weighs each scored token's log-prob in the sums.
        return_aux_loss: also return the Mixture-of-Experts router's load-balancing loss of this forward
            pass (the model's own `aux_loss`, requested with `output_router_logits=True`). Other calls ask
            MoE models for no router logits, whatever their config says. Needs a `padded` batch: the model
            computes the loss from a (rows, T) padding mask.
        return_wpo_logps: also return, without gradient, each response's mean over its tokens of
            `log p_t - log sum_v p_v^2` (WPO's aligned log-probs, `head_log_sum_sq_probs`).
        return_token_stats: also return, without gradient, (B, K, 3) float32 sums over each response's
            scored tokens of the head's per-token statistics (`TOKEN_STATS`: mean logit over the vocabulary,
            entropy, target is the argmax), taken from the same chunks of logits as the log-probs.

    Returns:
        `ResponseScores`: the (B, K) log-probs, and the aux loss, WPO means and token statistics asked for
        (None otherwise).
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
    parameters = inspect.signature(inner.forward).parameters
    if "logits_to_keep" in parameters:
        model_inputs["logits_to_keep"] = 1
    if "output_router_logits" in parameters:
        model_inputs["output_router_logits"] = return_aux_loss
    elif return_aux_loss:
        raise ValueError(
            f"{type(inner).__name__}.forward takes no output_router_logits: it has no router aux loss."
        )
    if return_aux_loss and "doc_ids" in batch:
        raise ValueError(
            "The router aux loss needs a padded batch: the model computes it from a (rows, T) padding mask, "
            "and a packed / shared-prompt batch carries a (rows, 1, T, T) attention mask."
        )
    handle = decoder.register_forward_hook(keep_hidden)
    try:
        outputs = model(**model_inputs)
    finally:
        handle.remove()

    hidden = captured["hidden"]
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["score_index"])
    transform = logit_transform(inner)
    token_logps = head_token_logps(
        flat,
        head,
        batch["score_target"],
        chunk_size=chunk_size,
        softcap=transform.softcap,
        scale=transform.scale,
        return_stats=return_token_stats,
    )
    if return_token_stats:
        token_logps, token_stats = token_logps
    b, k = batch["response_lengths"].shape
    per_sequence = torch.zeros(k * b, dtype=torch.float32, device=token_logps.device)
    unweighted_logps = token_logps
    if batch.get("score_weight") is not None:  # per-token weights, e.g. LD-DPO's (`losses.ld_token_weights`)
        token_logps = token_logps * batch["score_weight"].to(token_logps.dtype)
    per_sequence = per_sequence.index_add(0, batch["score_seq"], token_logps)
    scores = ResponseScores(logps=per_sequence.view(k, b).T)
    if return_aux_loss:
        scores.aux_loss = torch.as_tensor(outputs.aux_loss, dtype=torch.float32, device=token_logps.device)
    if return_wpo_logps:
        log_sum_sq = head_log_sum_sq_probs(
            flat.detach(), head, chunk_size=chunk_size, softcap=transform.softcap, scale=transform.scale
        )
        aligned = torch.zeros(k * b, dtype=torch.float32, device=token_logps.device)
        aligned = aligned.index_add(0, batch["score_seq"], unweighted_logps.detach() - log_sum_sq)
        counts = batch["response_lengths"].T.reshape(-1).clamp_min(1).to(aligned.dtype)
        scores.wpo_logps = (aligned / counts).view(k, b).T
    if return_token_stats:
        sums = token_stats.new_zeros(k * b, token_stats.shape[1]).index_add(
            0, batch["score_seq"], token_stats
        )
        scores.token_stats = sums.view(k, b, -1).transpose(0, 1)
    return scores


# Largest mean difference per scored token (nats) between `sequence_logps` and the model's own logits that
# `check_sequence_logps` accepts: float32 rounding, or 16-bit rounding of the same computation (measured on
# SmolLM2-135M: 2e-5 in float32, 0.035 in bfloat16, where batching alone changes the rounding). A missing
# transform of a real model (Granite's logits / 8..16, Gemma's soft-capping at 30, Cohere's x 0.0625) is
# off by nats per token.
CHECK_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-3}
CHECK_TOLERANCE_16BIT = 0.25


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _plain_logps(model: nn.Module, features: Sequence[Mapping], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) summed response log-probs from `log_softmax(model(...).logits)`, each prompt + response run
    alone (no padding), and (B, K) scored-token counts. Only the response's logits are kept when the model
    takes `logits_to_keep`, so a 128k vocabulary costs (response length, 128k) floats, not (T, 128k)."""
    keep = "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
    b, k = len(features), len(features[0]["response_ids"])
    totals = torch.zeros(b, k, dtype=torch.float64)
    counts = torch.zeros(b, k, dtype=torch.float64)
    for i, row in enumerate(features):
        for j, response in enumerate(row["response_ids"]):
            ids = torch.tensor([row["prompt_ids"] + response], device=device)
            kwargs = {"logits_to_keep": len(response) + 1} if keep else {}
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0, -len(response) - 1 : -1]
            logps = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(response, device=logps.device)
            totals[i, j] = logps.gather(-1, targets[:, None]).double().sum().item()
            counts[i, j] = len(response)
    return totals, counts


def check_sequence_logps(
    model: nn.Module, features: Sequence[Mapping], collator=None, *, rows: int = 2
) -> float:
    """Refuse `model` when `sequence_logps` does not reproduce its own `log_softmax(logits)`.

    The first `rows` tokenized examples (`prompt_ids`, `response_ids`) are collated by `collator` (the
    training layout; None: `padded`) and scored by `sequence_logps`, and each sequence runs alone through a
    plain forward pass (eval mode, no gradient) whose logits give the oracle. A head transform missing from
    `LOGIT_TRANSFORMS`, or an attention that does not take the layout's mask, shows up as a difference.

    Returns:
        the largest mean difference per scored token (nats).

    Raises:
        ValueError: naming the model class and the size of the difference, when it exceeds the tolerance
            of the model's dtype (`CHECK_TOLERANCE`).
    """
    from .data.collate import PaddedCollator

    inner = unwrap(model)
    features = [
        {"prompt_ids": list(row["prompt_ids"]), "response_ids": [list(r) for r in row["response_ids"]]}
        for row in itertools.islice(features, rows)
    ]
    if not features:
        raise ValueError("check_sequence_logps needs at least one tokenized row.")
    collator = collator if collator is not None else PaddedCollator(pad_token_id=0)
    parameter = next(inner.parameters())
    device = parameter.device
    batch = {
        key: value.to(device) if torch.is_tensor(value) else value
        for key, value in collator(features).items()
        if key != "score_weight"  # plain sums of log-probs, whatever per-token weights training uses
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = sequence_logps(model, batch).double().cpu()
            oracle, counts = _plain_logps(model, features, device)
    finally:
        model.train(was_training)
    per_token = ((ours - oracle).abs() / counts.clamp_min(1)).nan_to_num(float("inf"))
    worst = float(per_token.max())
    dtype = _floating_dtype(inner)
    tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE_16BIT)
    if worst > tolerance:
        b, k = divmod(int(per_token.argmax()), per_token.shape[1])
        layout = "a packed / shared-prompt" if "doc_ids" in batch else "the padded"
        raise ValueError(
            f"{type(inner).__name__}: the log-probs dpo_trainer computes differ from the model's own "
            f"log_softmax(logits) by {worst:.4g} nats per token (row {b}, response {k}: {float(ours[b, k]):.4f} "
            f"against {float(oracle[b, k]):.4f}; tolerance {tolerance:g} for {dtype}). Its forward may transform "
            f"the logits in a way dpo_trainer does not know (known: {logit_transform(inner)}; see "
            f"dpo_trainer.logprobs.LOGIT_TRANSFORMS), or its attention may not take {layout} layout's mask "
            "(try DPOConfig(layout='padded')). Training would be silently wrong; DPOConfig(check_logprobs=False) "
            "skips this check."
        )
    return worst


def check_models_logps(models, dataset, collate, rows: int = 2) -> None:
    """`check_sequence_logps` for every model given (None skipped) on the first `rows` rows of `dataset`."""
    first = [row for _, row in zip(range(rows), dataset)]
    for model in models:
        if model is not None:
            check_sequence_logps(model, first, collate)
