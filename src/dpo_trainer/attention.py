"""What a model's attention can take, and the mask of the `packed` / `shared_prompt` layouts in that form.

The grouped layouts (`data/layouts.py`) describe attention with per-token ids instead of a mask:
``doc_ids`` (which group of the row), ``branch_ids`` (-1: the shared prompt, k: response k) and
``position_ids`` (the token's position in its own sequence). Query i may attend key j iff

    doc[i] == doc[j]  and  j <= i  and  branch[j] in (-1, branch[i])
    and, on a sliding-window layer of window w,  pos[i] - pos[j] < w

The window rule is transformers' own (`masking_utils.sliding_window_overlay`: ``kv > q - w``), applied to
positions rather than flat indices, as transformers does for packed rows: under `shared_prompt` a
response's positions continue its prompt's, so its window reaches back into the prompt exactly as it would
in its own padded row.

A model gets one mask per kind of layer (`config.layer_types`: Gemma-2/3, Qwen2/3 with
`max_window_layers`, GPT-OSS, Cohere2 ...; or all layers sliding when only `config.sliding_window` is set:
Mistral, Qwen3-MoE), as a dict ``{layer_type: mask}`` when the kinds differ, which transformers' decoders
use as given. The mask's form follows the attention implementation: a boolean (rows, 1, T, T) tensor for
SDPA, an additive float one for eager, a FlexAttention `BlockMask` for `flex_attention`.

Models whose layers mix tokens without an attention mask (state-space, convolution or linear-attention
layers: Mamba, LFM2, NemotronH), bidirectional or chunked attention, and attention implementations that
take no explicit mask cannot be served exactly: `grouped_layout_unsupported` names the reason and the
trainer falls back to the `padded` layout.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._compat import attn_implementation
from .data.layouts import PAD_DOC, SHARED_BRANCH
from .models import unwrap

logger = logging.getLogger(__name__)

# Implementations whose mask we build here; any other (flash attention, paged, kernels) takes no 4D mask.
# The grouped layouts' SDPA path: query-chunked, its mask built per chunk (see `chunked_sdpa_attention`).
CHUNKED_SDPA = "dpo_chunked_sdpa"
QUERY_CHUNK = 512  # queries per chunk: a chunk's mask is (QUERY_CHUNK, <= T), one row at a time
MASKED_IMPLEMENTATIONS = (None, "sdpa", "eager", "flex_attention", CHUNKED_SDPA)
# Layer kinds in `config.layer_types` served here: attention ones, and token-wise ones that mix nothing.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
TOKENWISE_LAYER_TYPES = ("mlp", "moe")
# Modules that mix tokens along the sequence without an attention mask (causal convolutions, SSM scans).
_SEQUENCE_MIXER = re.compile(
    r"Mamba|SSM|Ssm(?![a-z])|ShortConv|DeltaNet|Rwkv|RWKV|Recurrent|LinearAttention|LSTM|Hyena"
)
_TAKES_MASK_MAPPING = re.compile(r"isinstance\([^()]*attention_mask[^()]*,\s*dict\)")


class LayoutUnsupported(ValueError):
    """The model's attention cannot take the mask of a grouped layout; the message says why."""


@dataclass(frozen=True)
class MaskPlan:
    """How to hand a grouped layout's mask to one model.

    implementation: "sdpa", "eager" or "flex_attention".
    windows: (layer type, sliding window or None for full attention), one entry per distinct layer type.
    keyed: whether the model gets a dict ``{layer_type: mask}`` (its layers differ in window) or one mask.
    """

    implementation: str
    windows: tuple[tuple[str, int | None], ...]
    keyed: bool


@functools.cache
def _forward_takes_mask_mapping(decoder_class: type) -> bool:
    """Whether `decoder_class.forward` uses a dict `attention_mask` as given (transformers >= 4.53 decoders)."""
    try:
        source = inspect.getsource(decoder_class.forward)
    except (OSError, TypeError):
        return False
    return bool(_TAKES_MASK_MAPPING.search(source))


def _layer_windows(model: nn.Module) -> list[tuple[str, int | None]]:
    """(layer type, window) of every layer, following transformers' `create_masks_for_generate` rule."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    name = type(model).__name__
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise LayoutUnsupported(f"{name} attends bidirectionally")
    if getattr(config, "attention_chunk_size", None) is not None:
        raise LayoutUnsupported(f"{name} uses chunked attention (attention_chunk_size)")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        kind = "full_attention" if window is None else "sliding_attention"
        layer_types = [kind] * int(getattr(config, "num_hidden_layers", 1) or 1)
    unknown = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES) - set(TOKENWISE_LAYER_TYPES))
    if unknown:
        raise LayoutUnsupported(
            f"{name} has {', '.join(map(repr, unknown))} layers, which mix tokens without an attention mask"
        )
    if "sliding_attention" in layer_types and not (isinstance(window, int) and window > 0):
        raise LayoutUnsupported(f"{name} has sliding-window layers but sliding_window={window!r}")
    return [
        (t, window if t == "sliding_attention" else None) for t in layer_types if t in ATTENTION_LAYER_TYPES
    ]


def mask_plan(model: nn.Module) -> MaskPlan:
    """How `model` (possibly wrapped) takes a grouped layout's mask; raises `LayoutUnsupported` with the reason."""
    inner = unwrap(model)
    name = type(inner).__name__
    implementation = attn_implementation(inner)
    if implementation not in MASKED_IMPLEMENTATIONS:
        raise LayoutUnsupported(f"its {implementation!r} attention takes no explicit attention mask")
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        raise LayoutUnsupported(f"{name}.forward takes no position_ids")
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else inner
    windows = dict(_layer_windows(inner))
    for module in decoder.modules():  # a hybrid model without `layer_types` (Mamba, Jamba-style ...)
        if isinstance(module, nn.Conv1d) or _SEQUENCE_MIXER.search(type(module).__name__):
            raise LayoutUnsupported(
                f"{name} has {type(module).__name__} layers, which mix tokens without an attention mask"
            )
    keyed = len(set(windows.values())) > 1
    if keyed and not _forward_takes_mask_mapping(type(decoder)):
        raise LayoutUnsupported(f"{type(decoder).__name__}.forward takes no per-layer-type attention masks")
    return MaskPlan(implementation or "sdpa", tuple(windows.items()), keyed)


def grouped_layout_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot run the packed / shared-prompt layouts exactly, or None if it can."""
    try:
        mask_plan(model)
    except LayoutUnsupported as error:
        return str(error)
    return None


def attention_allowed(
    doc_ids: torch.Tensor,
    branch_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """(rows, T, T) bool: query i may attend key j (the rule of the module docstring).

    Args:
        doc_ids, branch_ids, position_ids: (rows, T) long, from `GroupedCollator`.
        window: the sliding window (needs `position_ids`), or None for full causal attention.
    """
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    key_branch = branch_ids[:, None, :]
    visible = (key_branch == SHARED_BRANCH) | (key_branch == branch_ids[:, :, None])
    allowed = causal & same_doc & visible
    if window is not None:
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    return allowed


def flex_mask_mod(
    doc_ids: torch.Tensor,
    branch_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    window: int | None = None,
):
    """`attention_allowed` as a FlexAttention `mask_mod(b, h, q, kv) -> bool` over (rows, T) id tensors."""

    def mask_mod(b, h, q, kv):
        key_branch = branch_ids[b, kv]
        visible = (key_branch == SHARED_BRANCH) | (key_branch == branch_ids[b, q])
        return (kv <= q) & (doc_ids[b, q] == doc_ids[b, kv]) & visible

    if window is None:
        return mask_mod

    def windowed_mask_mod(b, h, q, kv):
        return mask_mod(b, h, q, kv) & (position_ids[b, q] - position_ids[b, kv] < window)

    return windowed_mask_mod


@dataclass(frozen=True)
class _GroupedIds:
    doc_ids: torch.Tensor  # (rows, T)
    branch_ids: torch.Tensor  # (rows, T)
    position_ids: torch.Tensor  # (rows, T)
    window: int | None
    chunk: int
    # per row, the segments' (start, end, key ranges they see in full); built once per batch (`_segments`)
    plan: list = field(default_factory=list, compare=False, repr=False)


def _ids_carrier(ids: _GroupedIds) -> torch.Tensor:
    """A (rows, 1, T, T) bool tensor of stride 0 (no memory) carrying `ids` to `chunked_sdpa_attention`.

    transformers passes a 4D mask to the attention function as given; all False, so that anything but
    `chunked_sdpa_attention` reading it attends nowhere rather than everywhere.
    """
    rows, width = ids.doc_ids.shape
    carrier = torch.zeros((), dtype=torch.bool, device=ids.doc_ids.device).expand(rows, 1, width, width)
    carrier.dpo_grouped_ids = ids
    return carrier


def _segments(ids: _GroupedIds) -> list[list[tuple[int, int, int, tuple[tuple[int, int], ...] | None]]]:
    """Per row, its segments (maximal runs of one group and branch) as (start, end, own_start, seen).

    A query of the segment sees the key ranges `seen` in full and the keys from `own_start` up to itself:
    the same group's earlier runs of the shared branch or of the segment's own (for a response: its prompt;
    for the prompt or a packed sequence: none), the one right before the segment joined to it (`own_start`
    < `start`, one slice of the keys instead of a copy). That is the module docstring's rule without the
    window. Padding (group -1) gets `seen` None: it attends nothing and its output is zero."""
    if ids.plan:
        return ids.plan
    doc, branch = ids.doc_ids, ids.branch_ids
    rows, width = doc.shape
    change = torch.ones(rows, width, dtype=torch.bool, device=doc.device)
    change[:, 1:] = (doc[:, 1:] != doc[:, :-1]) | (branch[:, 1:] != branch[:, :-1])
    found = change.nonzero().tolist()  # one host transfer per batch: the segment starts
    labels = torch.stack([doc[change], branch[change]], dim=1).tolist()
    starts: list[list[tuple[int, int, int]]] = [[] for _ in range(rows)]
    for (row, start), (group, kind) in zip(found, labels):
        starts[row].append((start, group, kind))
    plan = []
    for row in starts:
        segments, runs = [], {}  # group -> its earlier runs (start, end, branch)
        for index, (start, group, kind) in enumerate(row):
            end = row[index + 1][0] if index + 1 < len(row) else width
            if group == PAD_DOC:
                segments.append((start, end, start, None))
                continue
            earlier = runs.setdefault(group, [])
            seen = tuple((a, b) for a, b, k in earlier if k in (SHARED_BRANCH, kind))
            own_start = start
            if seen and seen[-1][1] == start:
                own_start, seen = seen[-1][0], seen[:-1]
            segments.append((start, end, own_start, seen))
            earlier.append((start, end, kind))
        plan.append(segments)
    ids.plan.extend(plan)
    return ids.plan


def _segment_chunk_attention(
    query, key, value, seen_keys, seen_values, q_pos, k_pos, window, scaling, dropout
):
    """SDPA of one row's query chunk over the keys it may see: `seen_*` (seen in full; may be empty) followed
    by its own segment from the start up to the chunk's end (causal, the chunk's queries last).

    query: (1, heads, c, d); key, value: (1, heads, n, d), n >= c, the own segment's keys up to the chunk's
    end; seen_keys, seen_values: tuples of (1, heads, m, d) ranges, concatenated here (inside the checkpoint,
    so the copy is recomputed, never kept); q_pos (c,), k_pos (all keys,): positions, for the window only.
    """
    if seen_keys:
        key, value = torch.cat([*seen_keys, key], dim=2), torch.cat([*seen_values, value], dim=2)
    c, n = query.shape[2], key.shape[2]
    # query i (0-based in the chunk) sees every key up to itself: the last c keys are the chunk's own
    if window is None:  # additive: zero over the keys seen in full, a causal block over the chunk's own
        mask = query.new_zeros(c, n)
        mask[:, n - c :] = torch.full((c, c), float("-inf"), dtype=query.dtype, device=query.device).triu(1)
    else:
        mask = (
            torch.arange(n, device=query.device)[None, :]
            <= torch.arange(n - c, n, device=query.device)[:, None]
        )
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )


def chunked_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA whose memory grows linearly in the row length T for the `packed` / `shared_prompt` layouts.

    Registered with transformers as `CHUNKED_SDPA`. Given a mask from `grouped_attention_mask`, each row's
    segments (`_segments`: the prompt, each response, each packed sequence) run `QUERY_CHUNK` queries at a
    time over only the keys they can see (a response: its prompt and itself, not the other responses), with
    a mask built from positions; each chunk is recomputed in the backward pass (activation checkpointing), so
    no (T, T) mask or score matrix exists, forward or backward; padding is not computed (its output is zero).
    Rows no longer than one chunk run as one call with the layout's whole mask. Any other mask (the `padded`
    layout, generation) goes to transformers' own SDPA attention unchanged.

    Args:
        query: (rows, heads, T, d); key, value: (rows, kv_heads, T, d); returns ((rows, T, heads, d), None).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    ids = getattr(attention_mask, "dpo_grouped_ids", None)
    if ids is None and isinstance(attention_mask, torch.Tensor) and not any(attention_mask.stride()):
        raise RuntimeError(  # a carrier copied on its way here (a wrapper moved or cast it): never guess
            f"{CHUNKED_SDPA}: the grouped layout's mask reached the attention without its token ids."
        )
    if ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        raise ValueError(
            f"{CHUNKED_SDPA} does not support attention soft-capping or sinks; use eager attention."
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    width = query.shape[2]
    if width <= ids.chunk:  # one call: its mask is at most (chunk, chunk) a row
        allowed = attention_allowed(ids.doc_ids, ids.branch_ids, ids.position_ids, ids.window)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None
    checkpointed = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    )
    positions = ids.position_ids
    rows = []
    for r, segments in enumerate(_segments(ids)):
        pieces = []
        for start, end, own_start, seen in segments:
            if seen is None:  # padding
                pieces.append(query.new_zeros(1, query.shape[1], end - start, value.shape[-1]))
                continue
            seen_keys = tuple(key[r : r + 1, :, a:b] for a, b in seen)
            seen_values = tuple(value[r : r + 1, :, a:b] for a, b in seen)
            seen_pos = [positions[r, a:b] for a, b in seen] if ids.window is not None else None
            for a in range(start, end, ids.chunk):
                b = min(a + ids.chunk, end)
                k_pos = torch.cat([*seen_pos, positions[r, own_start:b]]) if ids.window is not None else None
                args = (
                    query[r : r + 1, :, a:b],
                    key[r : r + 1, :, own_start:b],
                    value[r : r + 1, :, own_start:b],
                    seen_keys,
                    seen_values,
                    positions[r, a:b],
                    k_pos,
                    ids.window,
                    scaling,
                    dropout,
                )
                if checkpointed:  # keep no chunk's mask or scores
                    pieces.append(checkpoint(_segment_chunk_attention, *args, use_reentrant=False))
                else:
                    pieces.append(_segment_chunk_attention(*args))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register_chunked_sdpa() -> None:
    """Register `CHUNKED_SDPA` with transformers: our attention function, SDPA's mask for other layouts."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CHUNKED_SDPA, chunked_sdpa_attention)
    AttentionMaskInterface.register(CHUNKED_SDPA, sdpa_mask)


def _mask(batch: Mapping[str, torch.Tensor], implementation: str, window: int | None, dtype: torch.dtype):
    doc_ids, branch_ids, position_ids = batch["doc_ids"], batch["branch_ids"], batch["position_ids"]
    if implementation == CHUNKED_SDPA:
        return _ids_carrier(_GroupedIds(doc_ids, branch_ids, position_ids, window, QUERY_CHUNK))
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        rows, width = doc_ids.shape
        mask_mod = flex_mask_mod(doc_ids, branch_ids, position_ids, window)
        return create_block_mask(mask_mod, rows, None, width, width, device=doc_ids.device)
    allowed = attention_allowed(doc_ids, branch_ids, position_ids, window)[:, None]
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def grouped_attention_mask(batch: Mapping[str, torch.Tensor], model: nn.Module):
    """The attention mask of a `packed` / `shared_prompt` batch in the form `model` takes.

    One mask (tensor or `BlockMask`) when every layer attends alike, else a dict ``{layer_type: mask}``.
    Built once per batch and plan (cached in `batch` when it is a dict). Raises `LayoutUnsupported` for a
    model that cannot take it (the trainer checks this first and uses the `padded` layout instead).
    """
    inner = unwrap(model)
    plan = mask_plan(inner)
    key = f"_attention_mask_{plan.implementation}_{plan.windows}"
    if key in batch:
        return batch[key]
    by_window = {}
    for _, window in plan.windows:
        if window not in by_window:
            by_window[window] = _mask(batch, plan.implementation, window, inner.dtype)
    if plan.keyed:
        mask = {layer_type: by_window[window] for layer_type, window in plan.windows}
    else:
        mask = next(iter(by_window.values()))
    if isinstance(batch, dict):
        batch[key] = mask
    return mask


def resolve_layout(requested: str, models: Iterable[nn.Module | None], router_aux_loss: bool = False) -> str:
    """The layout to use: the requested one if every model's attention can take its mask, else `padded`.

    `auto` means `shared_prompt` (SDPA models get `CHUNKED_SDPA`, FlexAttention a `BlockMask`: memory
    linear in the row length), except for eager attention, which takes a dense (rows, 1, T, T) mask: a
    `shared_prompt` row (prompt + every response) can be twice as long as a padded one, so its mask and
    scores up to twice the padded layout's, while `packed` rows are never longer than padded ones and never
    more numerous. A refusal or a change is logged once, with the reason. With the MoE `router_aux_loss` on,
    the layout is `padded`: the model computes that loss from a (rows, T) padding mask, which grouped layouts
    do not have.
    """
    if requested == "padded":
        return "padded"
    if router_aux_loss:
        logger.warning(
            "Layout %r is not available with the MoE router aux loss; using 'padded' "
            "(router_aux_loss_coef=0 turns the aux loss off).",
            requested,
        )
        return "padded"
    models = [model for model in models if model is not None]
    for model in models:
        reason = grouped_layout_unsupported(model)
        if reason:
            logger.warning("Layout %r is not available (%s); using 'padded'.", requested, reason)
            return "padded"
    if requested != "auto":
        return requested
    eager = [type(unwrap(m)).__name__ for m in models if attn_implementation(unwrap(m)) == "eager"]
    if eager:
        logger.warning(
            "Layout 'auto': %s uses eager attention, whose dense (T, T) mask would make 'shared_prompt' rows "
            "cost up to twice the padded layout's memory; using 'packed' (never more than padded).",
            eager[0],
        )
        return "packed"
    return "shared_prompt"


def choose_attention(
    models: Iterable[nn.Module | None], flex: bool | None, device_type: str, layout: str
) -> None:
    """Pick each model's attention for a grouped layout: FlexAttention where `flex` asks, else chunked SDPA.

    `flex` is `DPOConfig.flex_attention`: None (auto) switches SDPA models to FlexAttention on CUDA only, where
    it is compiled and its `BlockMask` skips the blocks no query sees; True switches any model and raises
    `ValueError` if one cannot switch. SDPA models left over get `CHUNKED_SDPA` (same results as SDPA, memory
    linear in the row length; `padded` batches and generation run transformers' SDPA unchanged). Eager
    attention is the user's explicit choice and is kept.
    """
    wanted = flex if flex is not None else device_type == "cuda"
    for candidate in models:
        inner = None if candidate is None else unwrap(candidate)
        current = attn_implementation(inner)
        if inner is None or current in ("flex_attention", CHUNKED_SDPA):
            continue
        if wanted and (current == "sdpa" or flex) and _switch_to_flex(inner, current, flex, layout):
            continue
        if current == "sdpa":
            register_chunked_sdpa()
            inner.set_attn_implementation(CHUNKED_SDPA)
            logger.info("Layout %r: %s now uses query-chunked SDPA.", layout, type(inner).__name__)


def _switch_to_flex(inner: nn.Module, current: str | None, flex: bool | None, layout: str) -> bool:
    try:
        inner.set_attn_implementation("flex_attention")
    except (ValueError, ImportError, AttributeError) as error:
        if flex:
            raise ValueError(
                f"DPOConfig.flex_attention=True, but {type(inner).__name__} cannot use FlexAttention: {error}"
            ) from error
        logger.warning(
            "Keeping %s attention (FlexAttention is not available for %s: %s).",
            current,
            type(inner).__name__,
            error,
        )
        return False
    if attn_implementation(inner) == "flex_attention":
        logger.info("Layout %r: %s now uses FlexAttention.", layout, type(inner).__name__)
        return True
    if flex:
        raise ValueError(
            f"DPOConfig.flex_attention=True, but {type(inner).__name__} does not support switching its "
            "attention implementation."
        )
    return False
