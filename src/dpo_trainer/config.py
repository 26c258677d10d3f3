"""`DPOConfig`: the training arguments of `DPOTrainer`, documented once and validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .data.layouts import LAYOUTS
from .data.tokenize import TRUNCATION_MODES
from .losses import loss_names


@dataclass
class DPOConfig(TrainingArguments):
    r"""Arguments for `DPOTrainer`: every `transformers.TrainingArguments` field plus the DPO ones below.

    Every field of TRL 1.16's `DPOConfig` is accepted with TRL's meaning and default (`beta=0.1`,
    `learning_rate=1e-6` as in the paper, App. B; `max_length=1024`, `truncation_mode="keep_start"`,
    `logging_steps=10`), so a TRL script runs with its import changed. Deliberate differences from TRL are
    listed in the README; among the `TrainingArguments` defaults TRL changes, `bf16` and
    `gradient_checkpointing` stay off here (float32 and no recomputation unless asked).

    Parameters:
        beta: Strength of the KL penalty toward the reference model (the paper's β). Must be > 0. Smaller β
            lets the policy move further from the reference.
        loss_type: Name of a loss in `dpo_trainer.losses.LOSSES` (built-ins: `sigmoid` (paper Eq. 7),
            `ipo`, `hinge`, `robust`). Rows with K > 2 ranked responses always use the Plackett-Luce loss
            (paper App. A.3), which requires `sigmoid`.
        label_smoothing: Assumed rate ε of flipped preference labels, in [0, 0.5). With `sigmoid` it gives
            conservative DPO, with `robust` the unbiased robust loss; `ipo` and `hinge` do not use it.
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
        disable_dropout: Set every dropout probability of the policy and reference to 0, so that the policy
            equals the reference at step 0 and the implicit reward is deterministic.
        dataset_num_proc: Processes used to tokenize the datasets (None: the calling process).
        pad_to_multiple_of: Round the padded length of each batch up to a multiple of this. `"auto"`
            (TRL's default): 128 on Neuron devices, which compile once per shape, else None.
        logprob_chunk_size: Scored tokens projected through the LM head at once. None picks a chunk of about
            64M logits (e.g. 512 tokens for a 128k vocabulary). Lower it to save memory.
        layout: How a batch is laid out for the forward pass; every layout gives the same log-probs.
            `padded`: 2B right-padded rows (chosen rows, then rejected). `packed`: sequences end to end with
            no padding. `shared_prompt`: `[prompt | chosen | rejected]`, the prompt run once per pair.
            `auto` (default): `shared_prompt` where the model's attention takes an explicit mask (SDPA,
            eager, FlexAttention), else `padded` with a message saying why.
        padding_free: TRL's name for `layout="packed"`.
        flex_attention: Run the `packed` / `shared_prompt` layouts with FlexAttention (a `BlockMask` that
            skips the blocks no query may see, compiled by transformers) instead of SDPA with a dense
            boolean mask. None (default): switch a model loaded with SDPA to FlexAttention on CUDA, where it
            made the full fine-tuning step 2.6x faster on an H200 (benchmarks/README.md); keep SDPA on CPU.
            True: always (also on CPU, uncompiled and slow); False: never.
        max_tokens_per_batch: Fill each training batch with whole examples up to this many tokens (as laid
            out, so shared prompts count once) instead of `per_device_train_batch_size` examples, for even
            step cost. Batches then hold different numbers of pairs; the loss of an optimizer step is the
            mean over all its pairs (across accumulation steps and processes), and metrics are per-pair
            means, so nothing is weighted by batch.
        on_nonfinite: What a non-finite loss or gradient norm does to training (`dpo_trainer.guards`):
            `raise` (default) stops with an error naming the step, before the optimizer applies anything;
            `skip` drops that step's gradients (no optimizer update) and goes on, counting the skipped steps
            in the logs (`nonfinite_skipped_steps`). Invalid reference log-probs always raise.
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
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper: 1e-6)."})
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X update steps (TRL's default 10); a float < 1 is a ratio."}
    )

    beta: float = field(default=0.1, metadata={"help": "KL penalty strength β; must be > 0."})
    loss_type: str = field(default="sigmoid", metadata={"help": "Loss name from dpo_trainer.losses."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label-flip rate ε in [0, 0.5)."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Weight of the chosen response's NLL added to the loss (TRL's name)."}
    )
    max_length: int | None = field(default=1024, metadata={"help": "Max prompt + response tokens."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Max prompt tokens when truncating (None: as max_length requires)."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "keep_start (TRL) or keep_end (the paper's code).", "choices": ["keep_start", "keep_end"]},
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Precompute reference log-probs."}
    )
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Reference log-prob cache folder."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Zero every dropout probability."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Tokenization processes."})
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad batch length to a multiple ('auto': 128 on Neuron, else none)."}
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

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}.")
        if self.loss_type not in loss_names():
            raise ValueError(
                f"DPOConfig.loss_type must be one of {', '.join(loss_names())}; got {self.loss_type!r}."
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise ValueError(f"DPOConfig.rpo_alpha must be >= 0 or None, got {self.rpo_alpha}.")
        if self.label_smoothing > 0 and self.loss_type in ("ipo", "hinge"):
            raise ValueError(
                f"DPOConfig.label_smoothing applies to the sigmoid and robust losses, not {self.loss_type!r}; "
                "set it to 0."
            )
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
        super().__post_init__()
        if self.pad_to_multiple_of == "auto":
            # Neuron compiles once per input shape; padding bounds the number of compilations (as TRL does)
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None
