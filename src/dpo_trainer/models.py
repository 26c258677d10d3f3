"""Models as the trainer receives them: loading, wrappers (DDP, DeepSpeed, torch.compile, PEFT, FSDP), LoRA set-up,
freezing and dropout, and the model facts the trainer reads (quantized compute dtype, MoE router loss).

Every question of the form "what is inside this wrapper?" is answered here, so the other modules never
test wrapper types themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ._compat import DROPOUT_MODULE_TYPES, compiled_inner

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- wrappers


def unwrap(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` inside DDP / DeepSpeed / torch.compile / PEFT wrappers (LoRA layers stay in it)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif (inner := compiled_inner(model)) is not None:  # torch.compile
            model = inner
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` itself is a `peft.PeftModel` (use `unwrap_to_peft` first for a wrapped one)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def unwrap_to_peft(model: nn.Module) -> nn.Module:
    """The `PeftModel` inside DDP / DeepSpeed wrappers (or `model` itself)."""
    while not is_peft_model(model) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether `module` was sharded by FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def is_fsdp2(accelerator) -> bool:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def hidden_size(model: nn.Module) -> int | None:
    config = getattr(unwrap(model), "config", None)
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return max(sizes)
    return getattr(config, "hidden_size", None)


def quantized_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The compute dtype of a bitsandbytes-quantized model, or None when the model is not quantized."""
    inner = unwrap(model)
    if not (getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False)):
        return None
    config = getattr(inner.config, "quantization_config", None)
    dtype = getattr(config, "bnb_4bit_compute_dtype", None)
    if isinstance(config, Mapping):
        dtype = config.get("bnb_4bit_compute_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


# ---------------------------------------------------------------- loading


def model_dtype(dtype):
    """`model_init_kwargs["dtype"]` as `from_pretrained` takes it: a torch dtype, "auto" or None."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in ("bfloat16", "float16", "float32"):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(
        f"DPOConfig.model_init_kwargs['dtype'] must be 'auto', 'bfloat16', 'float16', 'float32' or a torch dtype, "
        f"got {dtype!r}."
    )


def load_model(model, args, quantization_config=None) -> nn.Module:
    """A module as given, or one loaded from a name or path in float32 unless `model_init_kwargs` sets a dtype."""
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if "torch_dtype" in kwargs and "dtype" not in kwargs:  # transformers 4's name
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        kwargs["dtype"] = model_dtype(kwargs.get("dtype", "float32"))
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a name, a path or a torch module, got {type(model).__name__}.")
    return model


def check_load_arguments(model, args, quantization_config) -> None:
    """Refuse loading settings that cannot apply to `model` as given."""
    if quantization_config is not None:
        if "quantization_config" in (args.model_init_kwargs or {}):
            raise ValueError(
                "quantization_config is set both as a trainer argument and in DPOConfig.model_init_kwargs; "
                "set it in one place."
            )
        if not isinstance(model, str):
            raise ValueError(
                "quantization_config applies when the model is loaded from a name or path; quantize an "
                "already-built model when you load it (from_pretrained(..., quantization_config=...))."
            )
    if not isinstance(model, str) and args.model_init_kwargs is not None:
        logger.warning("DPOConfig.model_init_kwargs is ignored: the model is already instantiated.")


def load_tokenizer(model: nn.Module, args):
    """The tokenizer saved with `model`, found through its config's `_name_or_path` (as TRL does)."""
    from transformers import AutoTokenizer

    name = getattr(unwrap(model).config, "_name_or_path", "") or ""
    if not name:
        raise ValueError(
            "processing_class is None and the model's config names no checkpoint (_name_or_path is empty) "
            "to load a tokenizer from; pass processing_class=<your tokenizer>."
        )
    kwargs = {"trust_remote_code": args.trust_remote_code}
    revision = (args.model_init_kwargs or {}).get("revision")
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"processing_class is None and no tokenizer could be loaded from the model's _name_or_path "
            f"{name!r} ({type(error).__name__}: {error}); pass processing_class=<your tokenizer>."
        ) from error


def pad_token_id(tokenizer, pad_token: str | None = None) -> int:
    """The id batches are padded with, without changing `tokenizer`.

    `pad_token` (`DPOConfig.pad_token`, TRL's field) if set, else the tokenizer's own pad token, else its EOS:
    padding is never scored nor attended, so EOS is a safe pad. The tokenizer is left as the caller gave it
    (and is saved so with the model).
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            "processing_class has no eos_token: DPO appends EOS to every response so the model learns to "
            "stop. Set tokenizer.eos_token first."
        )
    if pad_token is not None:
        vocab = tokenizer.get_vocab()
        if pad_token not in vocab:
            raise ValueError(
                f"DPOConfig.pad_token {pad_token!r} is not in the vocabulary of {type(tokenizer).__name__}; "
                "add it to the tokenizer first or pick a token it has."
            )
        return vocab[pad_token]
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    logger.info("processing_class has no pad_token; padding with eos_token %r.", tokenizer.eos_token)
    return tokenizer.eos_token_id


def apply_peft(model: nn.Module, peft_config, args) -> nn.Module:
    """`model` wrapped with `get_peft_model(model, peft_config)` (when `peft_config` is given), ready to train.

    The adapter's random initialisation is drawn from a generator forked from `args.seed`, so it follows the
    run's seed without reseeding the caller's global RNG. QLoRA adapters are kept in the quantized model's
    compute dtype (as in the QLoRA paper), not peft's float32. With gradient checkpointing the embeddings'
    output is made to require grad, so that checkpointed blocks of a frozen base pass gradients to the
    adapters inside them.
    """
    if peft_config is not None:
        if is_peft_model(model):
            raise ValueError("model is already a PeftModel: pass peft_config=None to train its adapter.")
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = get_peft_model(model, peft_config)
        compute_dtype = quantized_compute_dtype(model)
        if compute_dtype is not None:
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(compute_dtype)
    if is_peft_model(model) and args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


# ---------------------------------------------------------------- freezing and dropout


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
        if isinstance(module, DROPOUT_MODULE_TYPES):
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


# ---------------------------------------------------------------- what the trainer reads from a model


def router_aux_loss_settings(args, model: nn.Module) -> tuple[float, bool]:
    """(coefficient, enabled) of the MoE load-balancing loss, as TRL 1.16 decides them: enabled for a model
    whose config has `output_router_logits` when the coefficient (`args`, else the config's) is not 0."""
    config = unwrap(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    has_router = hasattr(text_config, "output_router_logits")
    if args.router_aux_loss_coef and not has_router:
        raise ValueError(
            f"DPOConfig.router_aux_loss_coef is {args.router_aux_loss_coef}, but {type(unwrap(model)).__name__} "
            "is not a Mixture-of-Experts model that returns its router logits: there is no aux loss to weight."
        )
    coef = args.router_aux_loss_coef
    if coef is None:
        coef = getattr(text_config, "router_aux_loss_coef", None) or 0.0
    return float(coef), has_router and coef != 0.0


def position_limit(models: Iterable[nn.Module | None]) -> tuple[str, int] | None:
    """(what limits, positions) of the model with the fewest usable positions, or None if none has a limit.

    A model's limit is its `max_position_embeddings`, or, with RoPE scaling, the length the scaling is declared
    to reach (`_rope_limit`); "what limits" names the model and the setting, for an error message.
    """
    limits = []
    for model in models:
        inner = None if model is None else unwrap(model)
        config = getattr(inner, "config", None)
        declared = getattr(config, "max_position_embeddings", None)
        if not isinstance(declared, int) or declared <= 0:
            continue
        name = type(inner).__name__
        scaled = _rope_limit(config, declared)
        if scaled is None:
            continue
        if scaled == declared:
            limits.append((f"{name} has max_position_embeddings={declared}", declared))
        else:
            limits.append(
                (
                    f"{name} reaches {scaled} positions (max_position_embeddings={declared}, RoPE scaled)",
                    scaled,
                )
            )
    return min(limits, key=lambda item: item[1]) if limits else None


# RoPE scalings (transformers' `modeling_rope_utils`) that recompute their frequencies for any longer input
# (dynamic NTK): no length is refused.
UNBOUNDED_ROPE_TYPES = ("dynamic",)


def _rope_limit(config, declared: int) -> int | None:
    """The positions a RoPE-scaled model reaches: max(`max_position_embeddings`, original x `factor`), where
    original is `original_max_position_embeddings` (transformers fills it with `max_position_embeddings` for
    YaRN); None for dynamic NTK scaling. `declared` where nothing is scaled.

    Configs disagree on whether `max_position_embeddings` is the pretrained length or the scaled one (YaRN in
    transformers and DeepSeek-V3, Llama 3.1 and Gemma 3: the scaled one; Qwen2.5's YaRN recipe and linear
    scaling as first documented: the pretrained one), so the larger reading is taken. RoPE positions are
    computed, not looked up in a table, so a longer row fails nowhere: this check only keeps rows within the
    declared context, and must not refuse one the scaling was set up for. Per-layer-type parameters (Gemma 3)
    give the largest limit of their layer types.
    """
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, Mapping):
        return declared
    per_layer_type = [value for value in parameters.values() if isinstance(value, Mapping)]
    limits = []
    for rope in per_layer_type or [parameters]:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in UNBOUNDED_ROPE_TYPES:
            return None
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings") or declared
        stretched = isinstance(factor, (int, float)) and factor > 1 and isinstance(original, (int, float))
        limits.append(max(declared, int(original * factor)) if stretched else declared)
    return max(limits)


def prepare_policy(model, args, processing_class=None, quantization_config=None, peft_config=None):
    """(policy, tokenizer, pad token id) for a trainer: `model` loaded, its tokenizer found, LoRA applied."""
    check_load_arguments(model, args, quantization_config)
    model = load_model(model, args, quantization_config)
    tokenizer = processing_class if processing_class is not None else load_tokenizer(model, args)
    pad_id = pad_token_id(tokenizer, args.pad_token)
    return apply_peft(model, peft_config, args), tokenizer, pad_id
