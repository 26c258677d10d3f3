"""`DPOConfig`: the training arguments of `DPOTrainer`, documented once and validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .data.layouts import LAYOUTS
from .data.tokenize import TRUNCATION_MODES
from .launch import bf16_supported, use_cpu_for_launched_processes
from .losses import DEPRECATED_F_DIVERGENCES, check_loss_settings

PEFT_REFERENCES = ("copy", "base")

# DPOConfig's own fields by what they decide. Each field is in exactly one group (tests/test_checkpoints.py walks
# them all), so a new field cannot be left out of the settings a resumed run is compared with.
# The keyword arguments of `losses.preference_loss` (`loss_settings`):
LOSS_FIELDS = ("beta", "loss_type", "label_smoothing", "loss_weights", "f_divergence_type")
LOSS_FIELDS += ("f_alpha_divergence_coef", "discopop_tau")
# What the trainer adds around that loss: WPO weights, LD-DPO token weights, the RPO and MoE terms.
TRAINER_LOSS_FIELDS = ("use_weighting", "ld_alpha", "rpo_alpha", "router_aux_loss_coef")
# How rows become tokens (`data_settings`, with the loss fields that decide how rankings train).
DATA_FIELDS = ("max_length", "max_prompt_length", "truncation_mode")
# The settings a ranking of K > 2 responses (Plackett-Luce) cannot apply: `data.check_ranking` refuses them.
RANKING_FIELDS = ("loss_type", "label_smoothing", "loss_weights", "f_divergence_type", "use_weighting")
# What π_ref is and how the policy runs.
REFERENCE_FIELDS = ("precompute_ref_log_probs", "disable_dropout", "peft_reference")
REFERENCE_FIELDS += ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")
RESULT_FIELDS = LOSS_FIELDS + TRAINER_LOSS_FIELDS + DATA_FIELDS + REFERENCE_FIELDS
# Fields that change how a run is computed, stored or checked, never its result (every layout, chunk size,
# batch plan and precision of the LM head gives the same log-probs; tests/test_layouts.py and others).
NEUTRAL_FIELDS = ("ref_logps_cache_dir", "check_logprobs", "dataset_num_proc", "pad_to_multiple_of")
NEUTRAL_FIELDS += ("logprob_chunk_size", "layout", "padding_free", "flex_attention", "max_tokens_per_batch")
NEUTRAL_FIELDS += ("on_nonfinite", "model_init_kwargs", "trust_remote_code", "pad_token")
NEUTRAL_FIELDS += ("precompute_ref_batch_size", "activation_offloading")


@dataclass
class DPOConfig(TrainingArguments):
    r"""Arguments for `DPOTrainer`: every `transformers.TrainingArguments` field plus the DPO ones below.

    Every field of TRL 1.16's `DPOConfig` is accepted with TRL's meaning and default (`beta=0.1`,
    `learning_rate=1e-6` as in the paper, App. B; `max_length=1024`, `truncation_mode="keep_start"`,
    `logging_steps=10`, and among the `TrainingArguments` defaults TRL changes, `bf16` on unless `fp16` is set
    and `gradient_checkpointing` on), so a TRL script runs with its import changed and gets the same run.
    Where TRL's config refuses to be built (`bf16` left unset on a machine without bf16 and without
    `use_cpu=True`), this one trains in float32 and logs why. Turn them off with `bf16=False` (float32:
    about twice the activation and weight-copy memory of bf16 autocast on a GPU, exact log-probs) and
    `gradient_checkpointing=False` (no recomputation: ~20-30% faster steps, the activations of every layer
    kept). Deliberate differences from TRL are listed in docs/coming-from-trl.md.

    Parameters:
        beta: Strength of the KL penalty toward the reference model (the paper's β). Must be > 0. Smaller β
            lets the policy move further from the reference.
        loss_type: A loss name in `dpo_trainer.losses.LOSSES`, or a list of names combined with `loss_weights`
            (stored as a list, as in TRL). TRL's names compute TRL 1.16's numbers: `sigmoid` (paper Eq. 7),
            `ipo` (IPO Eq. 17 on per-token means), `hinge`, `robust`, `exo_pair`, `nca_pair`, `bco_pair` (BCO
            without reward shift), `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`,
            `sft`, `sigmoid_norm`. Where a paper writes another form, it has a name of its own: `cdpo`
            (conservative DPO, Mitchell 2023: DPO with label smoothing ε, which TRL's `sigmoid` ignores),
            `ipo_paper` (IPO Eq. 17 on summed log-probs), `bco_pair_paper` (BCO with the running reward shift δ,
            kept by the trainer; `dpo_trainer.losses` lists both forms with their equations). `ipo_trl` and
            `bco_pair_trl` are deprecated names of `ipo` and `bco_pair` (a `FutureWarning`; stored as the new
            name). Rows with K > 2 ranked responses always use the Plackett-Luce loss (paper App. A.3), which
            requires `["sigmoid"]` and refuses what it cannot apply (`label_smoothing`, `loss_weights`, another
            `f_divergence_type`, `use_weighting`) when the datasets are prepared.
        loss_weights: One weight per entry of `loss_type`; the pair's loss is the weighted sum (MPO uses
            `loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]`). None: all 1.
        label_smoothing: Assumed rate ε of flipped preference labels, in [0, 0.5). With `cdpo` it gives
            conservative DPO (ε = 0 is allowed and equals `sigmoid`), with `robust` the unbiased robust loss;
            `exo_pair` (which needs ε > 0; the EXO paper uses 1e-3), `aot` and `aot_unpaired` use it too.
            `sigmoid` does not (as in TRL; earlier releases of this library made it conservative DPO).
            Setting it for losses that all ignore it is an error (TRL trains on, ignoring it); with `sigmoid`
            the error names `loss_type="cdpo"`.
        f_divergence_type: The f-divergence regulariser of f-DPO (Wang et al. 2023, arXiv 2309.16240):
            `reverse_kl` (DPO), `forward_kl`, `js_divergence`, `alpha_divergence` (TRL 1.16's code,
            f'(u) = (u^(α-1) - 1)/(α - 1)) or `alpha_divergence_paper` (the paper's Table 1, f'(u) =
            (1 - u^-α)/α, as TRL's docs describe it; TRL's form at α is the paper's at 1 - α, the same at
            α = 0.5). `alpha_divergence_trl` is a deprecated name of `alpha_divergence` (a `FutureWarning`).
            Only losses built on the chosen-rejected score difference accept a non-default value.
        f_alpha_divergence_coef: α of the alpha divergence (TRL's default 0.5).
        discopop_tau: Temperature τ > 0 of the `discopop` loss (DiscoPOP paper: 0.05).
        use_weighting: WPO (Zhou et al. 2024, arXiv 2406.11827): each pair's loss times the product over its
            responses of exp(mean over tokens of log p_t - log Σ_v p_v²) under the policy, without gradient
            (`dpo_trainer.losses.wpo_weights`; one extra no-gradient pass of the LM head). Not with `aot`.
        ld_alpha: LD-DPO's α in [0, 1] (Liu et al. 2024, arXiv 2409.06411): in the summed log-probs of the
            policy and the reference, the tokens past the shorter response's length of each pair weigh α
            (`dpo_trainer.losses.ld_token_weights`). None: off (α = 1 is the same). Not with
            `precompute_ref_log_probs`, nor with the `sft` loss.
        sync_ref_model: TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): every `ref_model_sync_steps`
            optimizer steps set the reference to `ref_model_mixup_alpha` x policy + (1 - α) x reference
            (`dpo_trainer.reference.sync.SyncRefModelCallback`). Full fine-tuning mixes the frozen copy (or the
            `ref_model` given). With a PEFT adapter (which TRL refuses) the reference is a second, frozen
            adapter named "reference" on the same base model, started as a copy of the policy's adapter
            when the trainer is built; it is saved in a `reference/` subfolder and restored on resume. Not
            with `precompute_ref_log_probs`, DeepSpeed or FSDP.
        ref_model_mixup_alpha: TR-DPO's α in (0, 1]; 1 copies the policy into the reference (TRL: 0.6). With
            a PEFT adapter α = 1 makes the reference exactly the policy; for α < 1 the LoRA factors A and B are
            mixed each on its own, which is not the mix of the weight updates B·A (the product is bilinear).
        ref_model_sync_steps: TR-DPO's τ, optimizer steps between reference updates (TRL: 512).
        rpo_alpha: Add `rpo_alpha` x the chosen response's mean token negative log-likelihood under the
            policy to each pair's loss (TRL's `rpo_alpha`; Pang et al. 2024). It keeps the chosen responses
            likely while DPO widens the margin, against the drift of both log-probs downwards. None: off.
        max_length: Longest prompt + response in tokens, or None for no truncation (TRL's default 1024).
        max_prompt_length: Our extra (TRL has none): longest prompt kept when a row is longer than
            `max_length` (must then be smaller than `max_length`). None (default): cut the prompt only as far
            as `max_length` requires. The paper's reference implementation used 512 / 256.
        truncation_mode: Which end of an over-long prompt to keep: `keep_start` (TRL's default: the sequence
            is cut at its end, and a row whose prompt alone fills `max_length` is dropped) or `keep_end` (the
            paper's reference implementation: the turns closest to the response survive; TRL deprecates it).
        precompute_ref_log_probs: Compute the reference log-probs of every row once, before training, and
            drop the reference model afterwards. The values are cached on disk under `ref_logps_cache_dir`,
            keyed by fingerprints of the reference weights and the tokenized data, and reused next time.
        ref_logps_cache_dir: Where precomputed reference log-probs are cached. None means
            `$HF_HOME/dpo_trainer/ref_logps` (`~/.cache/huggingface/dpo_trainer/ref_logps`).
        disable_dropout: Set every dropout probability of the policy and reference to 0 (dropout modules and
            the attention dropout their attention layers keep), so that the policy equals the reference at
            step 0 and the implicit reward is deterministic. The model's config, which is saved, is unchanged.
        check_logprobs: When the trainer is built, score the first two rows with the chunked LM head and
            compare with the model's own `log_softmax(logits)`; a model whose logits it cannot reproduce (an
            unknown logit transform, an attention that does not take the layout's mask) is refused with a
            `ValueError`. Skipped under DeepSpeed and FSDP.
        router_aux_loss_coef: Weight of the Mixture-of-Experts load-balancing loss added to the training loss
            (TRL's field). None: the model config's own `router_aux_loss_coef`; 0 turns it off. Models whose
            config has `output_router_logits` then return the loss, logged as `aux_loss`; such a run uses the
            `padded` layout. Setting it for a model without a router is an error.
        dataset_num_proc: Processes used to tokenize the datasets (None: the calling process).
        pad_to_multiple_of: Round the padded length of each batch up to a multiple of this. `"auto"`
            (TRL's default): 128 on Neuron devices, which compile once per shape, else None.
        logprob_chunk_size: Scored tokens projected through the LM head at once. None picks a chunk of about
            64M logits (e.g. 512 tokens for a 128k vocabulary). Lower it to save memory.
        layout: How a batch is laid out for the forward pass; every layout gives the same log-probs.
            `padded`: 2B right-padded rows (chosen rows, then rejected). `packed`: sequences end to end with
            no padding. `shared_prompt`: `[prompt | chosen | rejected]`, the prompt run once per pair.
            `auto` (default): `shared_prompt` where the model's attention takes the layout's mask exactly,
            sliding windows included (SDPA, FlexAttention); `packed` for eager attention (its dense mask
            is never larger than padded's then); else `padded` (hybrid / state-space layers, attention
            kernels without a mask) with a message saying why (`dpo_trainer.attention`).
        padding_free: TRL's name for `layout="packed"`.
        flex_attention: Run the `packed` / `shared_prompt` layouts with FlexAttention (a `BlockMask` that
            skips the blocks no query may see, compiled by transformers) instead of query-chunked SDPA
            (`dpo_chunked_sdpa`: memory linear in the row length, no (T, T) mask). None (default): switch a
            model loaded with SDPA to FlexAttention on CUDA, where it made the full fine-tuning step 2.6x
            faster on an H200 (benchmarks/README.md); chunked SDPA on CPU. True: always (also on CPU,
            uncompiled and slow); False: never.
        max_tokens_per_batch: Fill each training batch with whole examples up to this many tokens (as laid
            out, so shared prompts count once) instead of `per_device_train_batch_size` examples, for even
            step cost. Batches then hold different numbers of pairs; the loss of an optimizer step is the
            mean over all its pairs (across accumulation steps and processes), and metrics are per-pair
            means, so nothing is weighted by batch.
        on_nonfinite: What a non-finite loss or gradient norm does to training (`dpo_trainer.guards`):
            `raise` (default) stops with an error naming the step, before the optimizer applies anything;
            `skip` drops that step's gradients (no optimizer update) and goes on, counting the skipped steps
            in the logs (`nonfinite_skipped_steps`). Invalid reference log-probs always raise. Steps the fp16 loss
            scaler skips while it finds its scale are not divergence: they are counted (`scaler_skipped_steps`)
            and training goes on; a scale that collapses (below `guards.MIN_LOSS_SCALE`, or
            `guards.MAX_SCALER_SKIPS_IN_A_ROW` skips in a row) raises `NonFiniteError` whatever this says.
        model_init_kwargs: Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` (or
            `ref_model`) is given as a name or path, e.g. `{"dtype": "bfloat16"}` (a JSON string on the command
            line). Without a `dtype` the model loads in float32, as in TRL (`"auto"`: the checkpoint's dtype).
            Its `revision` also selects the tokenizer's revision.
        trust_remote_code: Allow models and tokenizers whose code ships with the checkpoint (passed to
            `from_pretrained` of both).
        pad_token: Token used for padding (TRL's deprecated field); None: the tokenizer's pad token, else
            its EOS token. Must be in the tokenizer's vocabulary.
        precompute_ref_batch_size: Batch size of the reference precomputation (None: the per-device eval
            batch size; it runs without gradients). The values do not depend on it.
        activation_offloading: Keep the activations saved for backward in CPU memory during each training step
            (`torch.autograd.graph.save_on_cpu`, pinned on CUDA), trading transfer time for GPU memory.
        peft_reference: Our extra: π_ref when `model` is a `peft.PeftModel` that already carries an adapter (given
            with `peft_config=None` and no `ref_model`, e.g. a LoRA SFT adapter). `copy` (default, as TRL): a
            frozen copy of the adapter as given, named "reference", so π_ref is the SFT policy and the first
            loss is ln 2; it is saved in a `reference/` subfolder of each checkpoint and restored on resume.
            `base`: the base model with the adapter disabled (one adapter fewer to run). With `peft_config`
            the adapter is new and the reference is the base model either way.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper: 1e-6)."})
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X update steps (TRL's default 10); a float < 1 is a ratio."}
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass (TRL's default: on; ~20-30% slower)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. None (TRL's default): on unless fp16 is set; float32 on a machine "
            "without bf16 (no bf16 GPU and use_cpu=False), with a logged message."
        },
    )

    beta: float = field(default=0.1, metadata={"help": "KL penalty strength β; must be > 0."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Loss name(s) from dpo_trainer.losses; several are summed with loss_weights."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss type (None: all 1)."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Label-flip rate ε in [0, 0.5)."})
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-DPO regulariser.",
            "choices": [
                "reverse_kl",
                "forward_kl",
                "js_divergence",
                "alpha_divergence",
                "alpha_divergence_paper",
                "alpha_divergence_trl",  # deprecated name of alpha_divergence, kept for one release
            ],
        },
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "α of the alpha divergence."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO weighting of each pair."})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO α in [0, 1]: weight of the verbose tail."}
    )
    sync_ref_model: bool = field(default=False, metadata={"help": "TR-DPO reference updates."})
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO α: policy share of the update."}
    )
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO τ: steps between updates."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Weight of the chosen response's NLL added to the loss (TRL's name)."}
    )
    max_length: int | None = field(default=1024, metadata={"help": "Max prompt + response tokens."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Max prompt tokens when truncating (None: as max_length requires)."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "keep_start (TRL) or keep_end (the paper's code).",
            "choices": ["keep_start", "keep_end"],
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Precompute reference log-probs."}
    )
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Reference log-prob cache folder."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Zero every dropout probability."})
    check_logprobs: bool = field(
        default=True, metadata={"help": "Check the LM head's log-probs against the model's logits at start."}
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "MoE load-balancing loss weight (None: the model config's)."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Tokenization processes."})
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batch length to a multiple ('auto': 128 on Neuron, else none)."},
    )
    logprob_chunk_size: int | None = field(
        default=None, metadata={"help": "Scored tokens per LM-head chunk."}
    )
    layout: str = field(default="auto", metadata={"help": "auto, padded, packed or shared_prompt."})
    padding_free: bool = field(default=False, metadata={"help": "TRL's name for layout='packed'."})
    flex_attention: bool | None = field(
        default=None, metadata={"help": "FlexAttention for packed/shared_prompt (None: on CUDA)."}
    )
    max_tokens_per_batch: int | None = field(default=None, metadata={"help": "Token budget per batch."})
    on_nonfinite: str = field(
        default="raise", metadata={"help": "raise or skip on a non-finite loss or gradient norm."}
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained kwargs (a JSON string on the command line)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow checkpoint-shipped model and tokenizer code."}
    )
    pad_token: str | None = field(
        default=None, metadata={"help": "Padding token (None: the tokenizer's pad token, else EOS)."}
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the reference precomputation."}
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Keep saved activations in CPU memory during training steps."}
    )
    peft_reference: str = field(
        default="copy",
        metadata={
            "help": "Reference of a PeftModel given with its adapter: copy (a frozen copy of the adapter, as "
            "TRL) or base (the base model, the adapter disabled).",
            "choices": ["copy", "base"],
        },
    )

    def _check_loss_extras(self) -> None:
        """TRL's validation of the loss-family fields (TRL raises some of these in the trainer)."""
        if not (isinstance(self.discopop_tau, (int, float)) and self.discopop_tau > 0):
            raise ValueError(f"DPOConfig.discopop_tau must be > 0, got {self.discopop_tau!r}.")
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise ValueError(
                f"DPOConfig.f_alpha_divergence_coef must be finite, got {self.f_alpha_divergence_coef}."
            )
        if self.ld_alpha is not None:
            if not 0.0 <= self.ld_alpha <= 1.0:
                raise ValueError(f"DPOConfig.ld_alpha must be in [0, 1] or None, got {self.ld_alpha}.")
            if self.precompute_ref_log_probs:
                raise ValueError(
                    "DPOConfig.ld_alpha weighs each batch's tokens by the shorter response of each pair, which "
                    "precomputed (summed) reference log-probs cannot do; set precompute_ref_log_probs=False."
                )
            if "sft" in self.loss_type:
                raise ValueError(
                    "DPOConfig.ld_alpha with loss_type 'sft': TRL's sft loss ignores the LD-DPO weights, ours would "
                    "not; leave one of them out."
                )
        if self.use_weighting:
            if {"aot", "aot_unpaired"} & set(self.loss_type):
                raise ValueError(
                    "DPOConfig.use_weighting does not apply to 'aot' / 'aot_unpaired', which sort the pairs of "
                    "a batch (per-pair weights would be misaligned)."
                )
        if self.sync_ref_model:
            if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
                raise ValueError(
                    f"DPOConfig.ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}."
                )
            if not isinstance(self.ref_model_sync_steps, int) or self.ref_model_sync_steps < 1:
                raise ValueError(
                    f"DPOConfig.ref_model_sync_steps must be a positive integer, got {self.ref_model_sync_steps!r}."
                )
            if self.precompute_ref_log_probs:
                raise ValueError(
                    "DPOConfig.sync_ref_model=True updates the reference during training, which makes "
                    "precompute_ref_log_probs=True stale; set one of them off."
                )

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}.")
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = check_loss_settings(
            self.loss_type,
            loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            owner="DPOConfig.",
        )
        self.f_divergence_type = DEPRECATED_F_DIVERGENCES.get(self.f_divergence_type, self.f_divergence_type)
        self._check_loss_extras()
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise ValueError(f"DPOConfig.rpo_alpha must be >= 0 or None, got {self.rpo_alpha}.")
        if self.layout not in ("auto",) + LAYOUTS:
            raise ValueError(
                f"DPOConfig.layout must be one of auto, {', '.join(LAYOUTS)}; got {self.layout!r}."
            )
        if self.padding_free and self.layout not in ("auto", "packed"):
            raise ValueError(
                f"DPOConfig.padding_free=True means layout='packed'; it conflicts with {self.layout!r}."
            )
        if self.padding_free:
            self.layout = "packed"
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":
            # the command line passes the value as a string
            text = self.pad_to_multiple_of.strip().lower()
            if text in ("none", "null"):
                self.pad_to_multiple_of = None
            elif text.isdigit():
                self.pad_to_multiple_of = int(text)
            else:
                raise ValueError(
                    f"DPOConfig.pad_to_multiple_of must be a positive integer, 'auto' or None, got "
                    f"{self.pad_to_multiple_of!r}."
                )
        if self.flex_attention not in (None, True, False):
            raise ValueError(
                f"DPOConfig.flex_attention must be True, False or None (auto), got {self.flex_attention!r}."
            )
        names = (
            "max_length",
            "max_prompt_length",
            "pad_to_multiple_of",
            "logprob_chunk_size",
            "max_tokens_per_batch",
            "precompute_ref_batch_size",
        )
        for name in names:
            value = getattr(self, name)
            if name == "pad_to_multiple_of" and value == "auto":
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"DPOConfig.{name} must be a positive integer or None, got {value!r}.")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"DPOConfig.max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}), so that every response keeps at least one token."
            )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"DPOConfig.truncation_mode must be one of {', '.join(TRUNCATION_MODES)}; got {self.truncation_mode!r}."
            )
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"DPOConfig.dataset_num_proc must be >= 1 or None, got {self.dataset_num_proc}.")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"DPOConfig.on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}.")
        if self.peft_reference not in PEFT_REFERENCES:
            raise ValueError(
                f"DPOConfig.peft_reference must be one of {', '.join(PEFT_REFERENCES)}; got {self.peft_reference!r}."
            )
        self._resolve_trl_defaults()
        # after bf16 is resolved, so that one process and several train in the same precision
        use_cpu_for_launched_processes(self)
        super().__post_init__()
        if self.pad_to_multiple_of == "auto":
            # Neuron compiles once per input shape; padding bounds the number of compilations (as TRL does)
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None

    def _resolve_trl_defaults(self) -> None:
        """TRL's defaults for mixed precision and activation checkpointing, resolved before `TrainingArguments`.

        `bf16=None` means on unless `fp16` is set (TRL's rule). Where TRL's config would then refuse to be built
        (no bf16 GPU, XPU or NPU, and `use_cpu=False`: transformers' "Your setup doesn't support bf16/gpu"), it
        falls back to float32 and says so: on such a machine the run happens on the CPU anyway, and a user who
        asked for nothing should get a run, not an error. An explicit `bf16=True` is checked by transformers.
        `gradient_checkpointing=True` is carried to `activation_checkpointing` (transformers' new name) unless
        that is set, so TRL's default does not raise transformers' deprecation warning of the old name.
        """
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_supported(self.use_cpu)
            # said by the trainer that trains with it (`BF16_FALLBACK`), not by every parse or copy of a config
            self._bf16_fell_back = not self.fp16 and not self.bf16
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing

    def result_settings(self) -> dict:
        """Every DPO setting that decides a run's result besides the model and the data (`RESULT_FIELDS`):
        saved beside each checkpoint and compared when a run resumes (`checkpoints.run_settings`)."""
        return {name: getattr(self, name) for name in RESULT_FIELDS}

    def data_settings(self) -> dict:
        """Keyword arguments of `data.prepare_dataset` for this run: truncation, and the loss (for rankings)."""
        names = DATA_FIELDS + RANKING_FIELDS
        return {**{name: getattr(self, name) for name in names}, "num_proc": self.dataset_num_proc}

    def loss_settings(self) -> dict:
        """Keyword arguments of `losses.preference_loss` for this run."""
        return {name: getattr(self, name) for name in LOSS_FIELDS}
