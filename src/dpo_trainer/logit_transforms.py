"""What a model does to its LM head's output before the softmax (`LogitTransform`: a scale, Gemma's soft-cap),
per architecture (`LOGIT_TRANSFORMS`, keyed by model type); `logit_transform(model)` reads it from a model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .models import unwrap


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
