"""Per-sequence log-probabilities of the scored tokens, without a `(batch, seq, vocab)` logits tensor.

The model runs up to its last hidden layer; only the hidden states named by the batch's scoring plan go
through the LM head, a chunk at a time (`lm_head`), after the model's own logit transform
(`logit_transforms`). `check_sequence_logps` refuses a model whose own logits say otherwise.

    log p(y | x) = sum_t [ z_t[y_t] - logsumexp(z_t) ],   z_t = head(h_t)       (paper Eq. 7, log π(y|x))
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import grouped_attention_mask
from .lm_head import head_log_sum_sq_probs, head_token_logps
from .logit_transforms import logit_transform
from .models import unwrap


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
            f"dpo_trainer.logit_transforms.LOGIT_TRANSFORMS), or its attention may not take {layout} layout's mask "
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
