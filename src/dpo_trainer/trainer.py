"""`DPOTrainer`: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) as a `transformers.Trainer`.

The trainer only glues the pure pieces together: `data` turns rows into token ids and batches,
`logprobs.sequence_logps` scores responses, `reference.reference_logps` gives π_ref's scores, and
`losses` turns both into a loss. Each override of `Trainer` below is short and says why it exists.

Hooks meant for subclassing (e.g. in a notebook):
  * `policy_logps(model, batch) -> (B, K)`: summed log-probs of each response under the policy.
  * `reference_logps(batch) -> (B, K)`: the same under the reference (no gradient).
  * `dpo_loss(policy_logps, reference_logps) -> (losses (B,), rewards (B, K))`: the objective.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy
import pyarrow
import torch
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction, Trainer, set_seed

from . import __version__
from .attention import choose_attention, grouped_layout_unsupported, resolve_layout  # noqa: F401
from .callbacks import SyncRefModelCallback
from .checkpoints import (
    checkpoint_problem,
    last_complete_checkpoint,
    read_settings,
    settings_changes,
    write_settings,
)
from .config import DPOConfig
from .data import PaddedCollator, check_row_text, detect_format, to_example, tokenize_example, truncate_ids
from .data.batching import TokenBudgetBatchSampler, example_tokens
from .data.layouts import PAD_DOC, SHARED_BRANCH, GroupedCollator
from .engines import frozen_copy, policy_as_reference, prepare_reference, release_reference
from .guards import NonFiniteError, invalid_reference, nonfinite_parameters, reference_problem
from .logprobs import check_sequence_logps, is_fsdp_module, sequence_logps, unwrap
from .losses import RunningMean, ld_token_weights, plackett_luce_loss, preference_loss, wpo_weights
from .reference import (
    cache_dir_problem,
    cache_path,
    compute_dataset_reference_logps,
    default_cache_dir,
    disable_dropout,
    freeze,
    is_peft_model,
    load_cached,
    model_fingerprint,
    rows_fingerprint,
    save_cached,
    unwrap_to_peft,
)
from .reference import reference_logps as _reference_logps

logger = logging.getLogger(__name__)

MODEL_CARD_MARKER = "<!-- written by dpo_trainer -->"
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# TRL's per-token metrics: means over completion tokens (chosen and rejected for `entropy`), each divided by
# the token count named here; the counts are accumulated alongside and not logged.
TOKEN_METRICS = {
    "logits/chosen": "_tokens/chosen",
    "logits/rejected": "_tokens/rejected",
    "entropy": "_tokens/all",
    "mean_token_accuracy": "_tokens/chosen",
}
TOKEN_COUNTS = ("_tokens/chosen", "_tokens/rejected", "_tokens/all")


def _quantized_compute_dtype(model: nn.Module) -> torch.dtype | None:
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


def _read_text(path: str) -> str | None:
    """The text of the file at `path`, or None when there is none."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _named(dataset_name: str, function, *args, **kwargs):
    """Call `function`, prefixing the data errors it raises with the dataset's name."""
    try:
        return function(*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{dataset_name}: {error}") from error


def _model_dtype(dtype):
    """`model_init_kwargs["dtype"]` as `from_pretrained` takes it: a torch dtype, "auto" or None."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in ("bfloat16", "float16", "float32"):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(
        f"DPOConfig.model_init_kwargs['dtype'] must be 'auto', 'bfloat16', 'float16', 'float32' or a torch dtype, "
        f"got {dtype!r}."
    )


def _is_tokenized(columns) -> bool:
    return {"prompt_ids", "response_ids"} <= set(columns)


def _is_trl_tokenized(columns) -> bool:
    return {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns)


def _from_trl_columns(settings: dict):
    """Rows tokenized by TRL (`prompt_ids`, `chosen_ids`, `rejected_ids`) -> ours, truncated by our rules.

    TRL's `ref_chosen_logps` / `ref_rejected_logps` are not carried over: they belong to TRL's truncation and
    model, and are recomputed when `precompute_ref_log_probs` is set.
    """

    def convert(row, index):
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = row[column]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"row {index}, field {column!r}: expected a list of token ids")
        prompt, responses = truncate_ids(
            list(row["prompt_ids"]), [list(row["chosen_ids"]), list(row["rejected_ids"])], **settings
        )
        return {"prompt_ids": prompt, "response_ids": responses}

    return convert


def _check_text_only(columns, name: str) -> None:
    """TRL raises for image columns given to a text model; they must not be dropped silently."""
    found = [column for column in ("image", "images") if column in set(columns)]
    if found:
        raise ValueError(
            f"{name} has an {found[0]!r} column: it looks like vision-language data, but dpo_trainer trains "
            "text-only causal language models. Remove the column to train on the text alone."
        )


def _check_ranking(num_responses: int, args: DPOConfig, name: str) -> None:
    """Rankings (K > 2 responses) train with Plackett-Luce, which is defined for the sigmoid loss only."""
    losses = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if num_responses > 2 and (losses != ["sigmoid"] or args.label_smoothing):
        raise ValueError(
            f"{name} ranks {num_responses} responses per row, which trains with the Plackett-Luce loss; it "
            f"needs loss_type='sigmoid' and label_smoothing=0 (got {args.loss_type!r}, {args.label_smoothing})."
        )


def _prepare_streamed(dataset: IterableDataset, tokenizer, args: DPOConfig, name: str) -> IterableDataset:
    """Tokenize a streamed dataset lazily; checks that need the whole set are made per row as it is read."""
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"{name} is empty.")
    columns = list(first.keys())
    if _is_tokenized(columns):
        return dataset
    settings = {
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "truncation_mode": args.truncation_mode,
    }
    if _is_trl_tokenized(columns):
        convert = _from_trl_columns(settings)

        def tokenize(row, index):
            return _named(name, convert, row, index)

    else:
        _check_text_only(columns, name)
        fmt = _named(name, detect_format, columns)
        num_responses = len(_named(name, to_example, first, 0, fmt, tokenizer).responses)
        _check_ranking(num_responses, args, name)

        def tokenize(row, index):
            example = _named(name, to_example, row, index, fmt, tokenizer)
            if len(example.responses) != num_responses:
                raise ValueError(
                    f"{name} row {index}: {len(example.responses)} responses where row 0 has {num_responses}; "
                    "every row of a dataset must rank the same number of responses."
                )
            return _named(name, tokenize_example, example, tokenizer, index=index, **settings)

    warned = []

    def keep(row) -> bool:
        kept = min(map(len, row["response_ids"])) > 0
        if not kept and not warned:
            warned.append(True)
            logger.warning(
                "%s: skipping streamed rows whose response is truncated away entirely (max_length=%s); raise "
                "max_length or set max_prompt_length to keep them.",
                name,
                args.max_length,
            )
        return kept

    return dataset.map(tokenize, with_indices=True, remove_columns=columns).filter(keep)


class PairRowsMetrics:
    """Wraps a `compute_metrics` so it receives TRL's rows: predictions gathered per pair (N, T, K, V) and
    labels (N, T, K) become (K*N, T, V) and (K*N, T), every example's chosen row first, then the rejected rows."""

    def __init__(self, compute_metrics):
        self.compute_metrics = compute_metrics

    def __call__(self, prediction, **kwargs):
        def rows(array):
            if array is None:
                return None
            if isinstance(array, torch.Tensor):
                moved = array.movedim(2, 0)
            else:
                moved = numpy.moveaxis(numpy.asarray(array), 2, 0)
            return moved.reshape(-1, *moved.shape[2:])

        rows_prediction = EvalPrediction(
            predictions=rows(prediction.predictions),
            label_ids=rows(prediction.label_ids),
            inputs=prediction.inputs,
            losses=prediction.losses,
        )
        return self.compute_metrics(rows_prediction, **kwargs)


@dataclass
class WithPaddedView:
    """A collator that adds TRL's padded rows to another layout's batch, for `compute_metrics`.

    Adds ``padded_input_ids`` and ``padded_attention_mask`` (K*B, T), the ``input_ids`` /
    ``attention_mask`` of `PaddedCollator` (chosen rows, then rejected rows, right-padded).
    """

    collator: object
    padded: PaddedCollator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        view = self.padded(features)
        batch["padded_input_ids"], batch["padded_attention_mask"] = view["input_ids"], view["attention_mask"]
        return batch


class DPOTrainer(Trainer):
    """Trains `model` on preference data with DPO against a frozen reference.

    The arguments are TRL 1.16's `DPOTrainer`'s, in the same order.

    Args:
        model: a model id or local path (loaded with `AutoModelForCausalLM` and `args.model_init_kwargs`, in
            float32 unless they name a dtype, as in TRL), a `PreTrainedModel`, or a `peft.PeftModel`.
        ref_model: the reference π_ref (id, path or model). None picks the cheapest exact reference:
            the policy with its adapter disabled when training a PEFT adapter, the policy's own log-probs
            before training when `args.precompute_ref_log_probs`, else a frozen copy of the policy's
            weights as they are when the trainer is built. A separate reference is placed like the policy:
            a DeepSpeed inference engine (partitioned under ZeRO-3), FSDP2 shards, else the device with the
            run's autocast (`dpo_trainer.engines`; examples/accelerate/README.md).
        args: a `DPOConfig` (None: the defaults, writing to "<model name>-DPO").
        data_collator: as in `transformers.Trainer`; None picks the collator of the layout.
        train_dataset, eval_dataset: a `datasets.Dataset`, a streamed `datasets.IterableDataset` (tokenized
            as read; training then needs `args.max_steps`) or a list of dicts (eval: also a dict of them), in
            one of the formats of `dpo_trainer.data.formats`, or already tokenized (ours or TRL's columns).
            `train_dataset` is required, as in TRL.
        processing_class: the tokenizer; None loads it from the model's `config._name_or_path`.
        compute_metrics: called at evaluation, as in TRL, with an `EvalPrediction` of the policy's logits
            (2N, T, V) on the padded rows (the N chosen rows, then the N rejected rows) and those rows'
            `input_ids` as `label_ids` (2N, T), padded with -100 across batches; computed by an extra
            forward pass, only when it is given.
        callbacks, optimizers: as in `transformers.Trainer`.
        quantization_config: a `transformers.BitsAndBytesConfig` applied when `model` (and `ref_model`) is
            loaded from a name or path, e.g. 4-bit NF4 for QLoRA (with `peft_config`). The adapter weights
            are then kept in the config's compute dtype (`bnb_4bit_compute_dtype`), as in the QLoRA paper.
        peft_config: a `peft.PeftConfig`; the model is wrapped with `get_peft_model`.
    """

    _tag_names = ["dpo_trainer", "dpo"]

    def __init__(
        self,
        model: str | nn.Module,
        ref_model: str | nn.Module | None = None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:  # as TRL: output in "<model name>-DPO"
            name = (
                model
                if isinstance(model, str)
                else getattr(getattr(model, "config", None), "_name_or_path", "")
            )
            args = DPOConfig(output_dir=f"{(name or 'model').rstrip('/').split('/')[-1]}-DPO")
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a DPOConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError(
                "train_dataset is required (as in TRL): pass the preference rows to train on, even when you "
                "only mean to evaluate."
            )
        self._check_streaming(args, train_dataset, eval_dataset)
        if args.activation_offloading and not hasattr(torch.autograd.graph, "save_on_cpu"):
            raise ValueError("DPOConfig.activation_offloading=True needs torch.autograd.graph.save_on_cpu.")
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
        model = self._load_model(model, args, quantization_config)
        if processing_class is None:
            processing_class = self._load_tokenizer(model, args)
        self._check_tokenizer(processing_class, args.pad_token)

        if peft_config is not None:
            if is_peft_model(model):
                raise ValueError("model is already a PeftModel: pass peft_config=None to train its adapter.")
            from peft import get_peft_model

            set_seed(args.seed)  # the adapter's random init follows args.seed, like the rest of the run
            model = get_peft_model(model, peft_config)
            compute_dtype = _quantized_compute_dtype(model)
            if compute_dtype is not None:  # QLoRA: adapters in the compute dtype, not peft's float32
                for param in model.parameters():
                    if param.requires_grad:
                        param.data = param.data.to(compute_dtype)
        if is_peft_model(model) and args.gradient_checkpointing:
            # Checkpointed blocks of a frozen base see no input that requires grad: let the embeddings'
            # output require it, so the adapters inside the blocks get their gradients.
            model.enable_input_require_grads()

        if isinstance(ref_model, str):
            ref_model = self._load_model(ref_model, args, quantization_config)
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "ref_model must not be the policy itself; pass ref_model=None to get a frozen copy."
            )
        if ref_model is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
            ref_model = frozen_copy(model)  # π_ref = the policy's weights now, not a reload from disk
        if args.disable_dropout:
            disable_dropout(model)
        if ref_model is not None:
            freeze(ref_model)
            disable_dropout(ref_model)
        self.ref_model = ref_model
        # Full fine-tuning that precomputes from the policy itself: π_ref exists only before the first step.
        self._policy_scores_reference = ref_model is None and not is_peft_model(model)

        train_dataset = self.prepare_dataset(train_dataset, processing_class, args, "train_dataset")
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {
                key: self.prepare_dataset(value, processing_class, args, f"eval_dataset[{key!r}]")
                for key, value in eval_dataset.items()
            }
        else:
            eval_dataset = self.prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        self.router_aux_loss_coef, self.aux_loss_enabled = self._router_aux_loss_settings(args, model)
        self._router_aux_loss = None  # set by `policy_logps`, read by `compute_loss`
        self.layout = self._resolve_layout(args, model, ref_model)
        if self.aux_loss_enabled and self.layout != "padded":
            # the model computes its aux loss from a (rows, T) padding mask, which grouped layouts do not have
            logger.warning(
                "Layout %r is not available with the MoE router aux loss; using 'padded' "
                "(router_aux_loss_coef=0 turns the aux loss off).",
                self.layout,
            )
            self.layout = "padded"
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        self._check_positions([model, ref_model], datasets)  # before training, not an IndexError mid-run
        if self.layout != "padded":
            self._choose_attention(args, [model, ref_model], args.device.type)
        if data_collator is None:
            if self.layout == "padded":
                data_collator = PaddedCollator(processing_class.pad_token_id, args.pad_to_multiple_of)
            else:
                data_collator = GroupedCollator(
                    processing_class.pad_token_id, self.layout, args.pad_to_multiple_of
                )
                if compute_metrics is not None:  # compute_metrics sees TRL's padded rows (`prediction_step`)
                    data_collator = WithPaddedView(
                        data_collator, PaddedCollator(processing_class.pad_token_id, args.pad_to_multiple_of)
                    )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=None if compute_metrics is None else PairRowsMetrics(compute_metrics),
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # Training losses are normalised by the pairs of the whole optimizer step (`_get_num_items_in_batch`),
        # so batch 8 x 1 step, batch 2 x 4 steps and token-budget batches of any size weigh every pair alike.
        self.model_accepts_loss_kwargs = True
        # "train" or an evaluation's metric_key_prefix -> [per-metric sums (a tensor on the device), examples]
        self._metrics, self._eval_prefix = {}, "eval"
        # TRL's `num_tokens`: prompt + completion tokens trained on, counted as padded rows (`_metric_means`)
        self._total_train_tokens = 0
        self._data_fingerprint = None  # of the tokenized training rows, computed when first needed
        # the divergence guard's state (`_guard_optimizer_step`)
        if hasattr(self.model, "add_model_tags"):  # the hub model card's tags, as TRL's ("trl", "dpo")
            self.model.add_model_tags(self._tag_names)
        self._guard_flags, self._skipped_steps = {}, 0
        if self.ref_model is not None:
            # Placed like the policy: a DeepSpeed inference engine (partitioned under ZeRO-3), FSDP2 shards,
            # else the device with the run's autocast. Never given to an optimizer.
            self.ref_model = prepare_reference(self.ref_model, self.accelerator)
        if args.sync_ref_model:  # TR-DPO: the reference follows the policy every τ steps
            self.add_callback(SyncRefModelCallback.for_trainer(self))
        if args.check_logprobs:
            self._check_logprobs()
        if args.precompute_ref_log_probs:
            self._precompute_reference()

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _load_model(model, args: DPOConfig, quantization_config=None) -> nn.Module:
        """A module as given, or one loaded from a name or path in float32 unless `model_init_kwargs` sets a dtype."""
        if isinstance(model, str):
            kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            if "torch_dtype" in kwargs and "dtype" not in kwargs:  # transformers 4's name
                kwargs["dtype"] = kwargs.pop("torch_dtype")
            kwargs["dtype"] = _model_dtype(kwargs.get("dtype", "float32"))
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            return AutoModelForCausalLM.from_pretrained(model, **kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a name, a path or a torch module, got {type(model).__name__}.")
        return model

    @staticmethod
    def _load_tokenizer(model: nn.Module, args: DPOConfig):
        """The tokenizer saved with `model`, found through its config's `_name_or_path` (as TRL does)."""
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

    @staticmethod
    def _check_tokenizer(tokenizer, pad_token: str | None = None) -> None:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError(
                "processing_class has no eos_token: DPO appends EOS to every response so the model learns to "
                "stop. Set tokenizer.eos_token first."
            )
        if pad_token is not None:  # DPOConfig.pad_token (TRL's deprecated field)
            if pad_token not in tokenizer.get_vocab():
                raise ValueError(
                    f"DPOConfig.pad_token {pad_token!r} is not in the vocabulary of {type(tokenizer).__name__}; "
                    "add it to the tokenizer first or pick a token it has."
                )
            tokenizer.pad_token = pad_token
        if tokenizer.pad_token_id is None:
            # Padding is never scored nor attended, so EOS is a safe pad token.
            tokenizer.pad_token = tokenizer.eos_token
            logger.info(
                "processing_class has no pad_token; using eos_token %r for padding.", tokenizer.eos_token
            )

    @staticmethod
    def _check_streaming(args: DPOConfig, train_dataset, eval_dataset) -> None:
        """Refuse early what a streamed `datasets.IterableDataset` cannot do; TRL's dispatch setting for it."""
        evals = eval_dataset.items() if isinstance(eval_dataset, Mapping) else [("", eval_dataset)]
        streamed = [
            f"eval_dataset{f'[{k!r}]' if k else ''}" for k, d in evals if isinstance(d, IterableDataset)
        ]
        if isinstance(train_dataset, IterableDataset):
            streamed.insert(0, "train_dataset")
            if args.max_steps is None or args.max_steps <= 0:
                raise ValueError(
                    "train_dataset is a streamed datasets.IterableDataset, whose length is unknown: set "
                    "DPOConfig.max_steps to the number of optimizer steps to train."
                )
            if args.max_tokens_per_batch is not None:
                raise ValueError(
                    "DPOConfig.max_tokens_per_batch sorts the whole training set by length, which a streamed "
                    "train_dataset (datasets.IterableDataset) cannot offer; unset it or use a map-style Dataset."
                )
            if args.accelerator_config.dispatch_batches:
                logger.warning("dispatch_batches is set to False for a streamed train_dataset (as TRL does).")
            # accelerate's dispatch mode concatenates the batches of several processes, which fails for
            # batches of different shapes
            args.accelerator_config.dispatch_batches = False
        if streamed and args.precompute_ref_log_probs:
            raise ValueError(
                f"DPOConfig.precompute_ref_log_probs=True needs map-style datasets, but {', '.join(streamed)} "
                "is streamed (datasets.IterableDataset); set precompute_ref_log_probs=False or load the data "
                "without streaming."
            )

    @staticmethod
    def prepare_dataset(dataset, tokenizer, args: DPOConfig, name: str = "dataset"):
        """Rows in any supported format -> `prompt_ids`, `response_ids` (one tokenized row per example).

        A dataset already tokenized (with both columns) is returned as it is. A streamed
        `datasets.IterableDataset` is tokenized on the fly, as it is read.
        """
        if dataset is None:
            return None
        if isinstance(dataset, IterableDataset):
            return _prepare_streamed(dataset, tokenizer, args, name)
        if isinstance(dataset, list):
            if not dataset:
                raise ValueError(f"{name} is empty.")
            if not all(isinstance(row, Mapping) for row in dataset):
                raise TypeError(f"{name}: a list dataset must hold dicts (rows).")
            _check_text_only(dataset[0].keys(), name)
            for index, row in enumerate(
                dataset
            ):  # Arrow fails on these without the row, or converts a column
                _named(name, check_row_text, row, index)
            try:
                dataset = Dataset.from_list(list(dataset))
            except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
                # Arrow rejects mixed types before any row is checked: find the row and field ourselves.
                fmt = detect_format(dataset[0].keys())
                for index, row in enumerate(dataset):
                    _named(name, to_example, row, index, fmt, tokenizer)
                raise TypeError(f"{name}: the rows do not share one column type ({error}).") from error
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"{name} must be a datasets.Dataset, a datasets.IterableDataset or a list of dicts, got "
                f"{type(dataset).__name__}."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty.")
        if _is_tokenized(dataset.column_names):
            return dataset
        settings = {
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "truncation_mode": args.truncation_mode,
        }
        if _is_trl_tokenized(dataset.column_names):
            convert = _from_trl_columns(settings)

            def tokenize(row, index):
                return _named(name, convert, row, index)

        else:
            _check_text_only(dataset.column_names, name)
            fmt = detect_format(dataset.column_names)

            def tokenize(row, index):
                example = _named(name, to_example, row, index, fmt, tokenizer)
                return _named(name, tokenize_example, example, tokenizer, index=index, **settings)

        dataset = dataset.map(
            tokenize,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {name}",
        )
        counts = [len(responses) for responses in dataset["response_ids"]]
        if len(set(counts)) > 1:
            first = next(i for i, count in enumerate(counts) if count != counts[0])
            raise ValueError(
                f"{name} row {first}: {counts[first]} responses where row 0 has {counts[0]}; every row of a "
                "dataset must rank the same number of responses."
            )
        _check_ranking(counts[0], args, name)
        emptied = [i for i, responses in enumerate(dataset["response_ids"]) if min(map(len, responses)) == 0]
        if emptied:
            if len(emptied) == len(dataset):
                raise ValueError(
                    f"{name}: every row has a response truncated away entirely (max_length={args.max_length}); "
                    "raise max_length or set max_prompt_length."
                )
            logger.warning(
                "%s: dropping %d of %d rows whose response is truncated away entirely (first: row %d); raise "
                "max_length or set max_prompt_length to keep them.",
                name,
                len(emptied),
                len(dataset),
                emptied[0],
            )
            dropped = set(emptied)
            dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
        return dataset

    @staticmethod
    def _resolve_layout(args: DPOConfig, model: nn.Module, ref_model: nn.Module | None) -> str:
        """The layout to use: the requested one if the models' attention can take its mask, else padded."""
        return resolve_layout(args.layout, [model, ref_model])

    @staticmethod
    def _choose_attention(args: DPOConfig, models, device_type: str) -> None:
        """Switch models to FlexAttention for the grouped layouts where `args.flex_attention` asks."""
        choose_attention(models, args.flex_attention, device_type, args.layout)

    @staticmethod
    def _router_aux_loss_settings(args: DPOConfig, model: nn.Module) -> tuple[float, bool]:
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

    def _check_logprobs(self) -> None:
        """Refuse a policy or reference whose own logits `sequence_logps` does not reproduce, on the first two
        rows of the training (else evaluation) data (`logprobs.check_sequence_logps`)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return  # the engine holds the weights sharded: no plain forward pass before training starts
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if isinstance(dataset, Mapping):
            dataset = next(iter(dataset.values()), None)
        if dataset is None:
            return
        rows = [row for _, row in zip(range(2), dataset)]
        for model in (self.model, self.ref_model):
            if model is not None:
                check_sequence_logps(model, rows, self.data_collator)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        # `resume_from_checkpoint=True` takes the newest *complete* checkpoint, where Trainer would take the
        # newest folder even when a kill left it half-written (`dpo_trainer.checkpoints`).
        if self.args.on_nonfinite == "skip" and self.is_deepspeed_enabled:
            raise ValueError(
                "DPOConfig.on_nonfinite='skip' is not available under DeepSpeed, whose engine applies the "
                "gradients itself; use on_nonfinite='raise'."
            )
        if resume_from_checkpoint is True:
            found = [last_complete_checkpoint(self.args.output_dir) if self.is_world_process_zero() else None]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(found)  # every process resumes from rank 0's choice
            if found[0] is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint-N "
                    "folder (see the warnings above for those skipped)."
                )
            resume_from_checkpoint = found[0]
            logger.info("Resuming from %s", resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, str):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
            self._check_resume_settings(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def dpo_settings(self) -> dict:
        """What decides this run's result besides the model: saved with every checkpoint and model
        (`dpo_settings.json`) and compared when a run resumes."""
        args = self.args
        if self._data_fingerprint is None and isinstance(self.train_dataset, Dataset):
            columns = self.train_dataset.select_columns(["prompt_ids", "response_ids"])
            self._data_fingerprint = rows_fingerprint(columns)
        return {
            "beta": args.beta,
            "loss_type": args.loss_type,
            "label_smoothing": args.label_smoothing,
            "rpo_alpha": args.rpo_alpha,
            "layout": self.layout,
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "truncation_mode": args.truncation_mode,
            "precompute_ref_log_probs": args.precompute_ref_log_probs,
            "disable_dropout": args.disable_dropout,
            "data": self._data_fingerprint,
        }

    def _check_resume_settings(self, checkpoint: str) -> None:
        """Warn about DPO settings changed since `checkpoint` was saved; refuse a changed loss or data."""
        saved = read_settings(checkpoint)
        if saved is None:
            logger.warning("%s has no dpo_settings.json: the resumed settings go unchecked.", checkpoint)
            return
        refused, warned = settings_changes(saved, self.dpo_settings())
        if refused:
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was trained with other settings ({'; '.join(refused + warned)}). "
                "Resuming would mix two experiments; train into a fresh output_dir instead."
            )
        if warned:
            logger.warning("Resuming from %s with changed settings: %s.", checkpoint, "; ".join(warned))

    def _get_num_items_in_batch(self, batch_samples, device):
        # Pairs (examples) in the optimizer step, summed over processes: the training loss's denominator.
        pairs = sum(batch["response_lengths"].shape[0] for batch in batch_samples)
        return self.accelerator.gather(torch.tensor(pairs, device=device)).sum()

    def get_train_dataloader(self):
        # A token budget replaces the fixed batch size with batches of whole examples filling the budget.
        if self.args.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        lengths = [
            example_tokens(len(prompt), [len(r) for r in responses], self.layout)
            for prompt, responses in zip(dataset["prompt_ids"], dataset["response_ids"])
        ]
        sampler = TokenBudgetBatchSampler(
            lengths, self.args.max_tokens_per_batch, seed=self.args.data_seed or self.args.seed
        )
        columns = [c for c in ("prompt_ids", "response_ids", "ref_logps") if c in dataset.column_names]
        loader = torch.utils.data.DataLoader(
            dataset.select_columns(columns),
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def _set_signature_columns_if_needed(self):
        # Trainer would keep only columns named like model.forward's arguments; ours feed the collator.
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "response_ids", "ref_logps"]

    def _precompute_reference(self) -> None:
        """Add a `ref_logps` column to every dataset (cached on disk), then drop the reference model.

        Runs when the trainer is built, before `Trainer` prepares the policy for its engine: a separate
        reference is already prepared (`prepare_reference`), and the policy, when it is its own reference,
        is scored through `policy_as_reference` (a DeepSpeed inference engine, a sharded copy under FSDP),
        never through weights that ZeRO-3 has partitioned away.
        """
        # Every process walks the weights (gathering shards is collective); rank 0's key names the cache.
        reference = self.ref_model if self.ref_model is not None else self.model
        model_key = [model_fingerprint(reference, self.processing_class)]
        broadcast_object_list(model_key)
        model_key = model_key[0]
        settings = {"bf16": self.args.bf16, "fp16": self.args.fp16, "dtype": str(unwrap(self.model).dtype)}
        datasets = [("train", self.train_dataset)]
        if isinstance(self.eval_dataset, Mapping):
            datasets += [(f"eval[{key}]", value) for key, value in self.eval_dataset.items()]
        else:
            datasets.append(("eval", self.eval_dataset))
        cache_dir = self.args.ref_logps_cache_dir or default_cache_dir()
        # The first process of each node writes the cache (no shared filesystem assumed), if it can: checked
        # before the precompute, so a read-only folder costs a warning, never the computed values.
        writer = self.is_local_process_zero()
        if writer and (problem := cache_dir_problem(cache_dir)):
            logger.warning("Not caching reference log-probs: %s.", problem)
            writer = False
        values, pending = {}, []
        for name, dataset in datasets:
            if dataset is None:
                continue
            if "ref_logps" in dataset.column_names:  # given by the user: checked like computed ones
                self._check_reference_column(name, torch.tensor(dataset["ref_logps"]))
                continue
            path = cache_path(cache_dir, model_key, rows_fingerprint(dataset), settings)
            # Every process reads (and validates) its own view of the cache, e.g. per-node folders; all load
            # only when every process has valid values, else all compute.
            loaded = load_cached(path, len(dataset), len(dataset[0]["response_ids"]))
            if all(gather_object([loaded is not None])):
                values[name] = loaded
                logger.info("Loaded reference log-probs of %s from %s", name, path)
            else:
                pending.append((name, dataset, path))
        if pending:  # the reference is prepared only when something is left to compute
            with self._reference_scorer() as score:
                for name, dataset, path in pending:
                    values[name] = self._compute_reference_column(dataset, name, score)
                    self._check_reference_column(name, values[name])
                    if writer:
                        save_cached(path, values[name])
        self.accelerator.wait_for_everyone()
        results = {
            name: dataset.add_column("ref_logps", values[name].tolist())
            for name, dataset in datasets
            if name in values
        }
        self.train_dataset = results.get("train", self.train_dataset)
        if isinstance(self.eval_dataset, Mapping):
            self.eval_dataset = {k: results.get(f"eval[{k}]", v) for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = results.get("eval", self.eval_dataset)
        release_reference(self.ref_model)
        self.ref_model = None  # the values are in the data now; free the memory

    @staticmethod
    def _check_reference_column(name: str, values: torch.Tensor) -> None:
        """Reference log-probs must be finite and <= 0, wherever they come from (`dpo_trainer.guards`)."""
        problem = reference_problem(values)
        if problem:
            raise NonFiniteError(f"Reference log-probs of {name}: {problem}.")

    @contextlib.contextmanager
    def _reference_scorer(self):
        """batch -> (B, K) reference log-probs for precomputation, with the models prepared to compute them."""
        if self.ref_model is not None:
            yield self.reference_logps
            return
        with policy_as_reference(self.model, self.accelerator) as policy:
            if is_peft_model(unwrap_to_peft(policy)):  # the base model: the adapter disabled
                if policy is self.model:
                    yield self.reference_logps
                else:
                    yield lambda batch: _reference_logps(
                        policy, None, batch, chunk_size=self.args.logprob_chunk_size
                    )
                return

            def score(batch):
                with torch.no_grad():
                    return sequence_logps(policy, batch, chunk_size=self.args.logprob_chunk_size)

            was_training = policy.training
            policy.eval()  # a full-fine-tuning policy is its own reference before training: no dropout
            try:
                yield score
            finally:
                policy.train(was_training)

    def _compute_reference_column(self, dataset: Dataset, name: str, score) -> torch.Tensor:
        """(rows, K) reference log-probs: each process scores a contiguous share, gathered back in order.

        Every process runs the same number of forward passes (a process whose share ends early scores a
        filler batch and drops it): a sharded reference (ZeRO-3, FSDP) gathers weights with collectives.
        """
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        share = -(-len(dataset) // self.accelerator.num_processes)
        start = min(len(dataset), self.accelerator.process_index * share)
        rows = dataset.select(range(start, min(len(dataset), start + share)))
        loader = torch.utils.data.DataLoader(
            rows.select_columns(["prompt_ids", "response_ids"]),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.data_collator,
        )
        with self.compute_loss_context_manager():
            values = compute_dataset_reference_logps(
                (self._prepare_inputs(batch) for batch in loader),
                score,
                total=len(loader),
                desc=f"Reference log-probs ({name})",
                disable_progress=self.args.disable_tqdm or not self.is_local_process_zero(),
                num_responses=len(dataset[0]["response_ids"]),
            )
            fillers = -(-share // batch_size) - len(loader)
            if fillers > 0:
                columns = dataset.select(range(min(batch_size, len(dataset)))).select_columns(
                    ["prompt_ids", "response_ids"]
                )
                filler = self._prepare_inputs(self.data_collator(list(columns)))
                for _ in range(fillers):
                    score(filler)
        if self.accelerator.num_processes == 1:
            return values
        return torch.tensor([row for part in gather_object([values.tolist()]) for row in part])

    # ------------------------------------------------------------------ hooks for subclasses

    def policy_logps(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) summed log-probs of each response under the policy, with gradient.

        For a Mixture-of-Experts policy with the router aux loss on, the same forward pass also gives the
        model's own load-balancing loss, kept for `compute_loss`; with WPO, each response's aligned mean; and
        always the (B, K, 3) sums of the head's token statistics behind TRL's `logits/*`, `entropy` and
        `mean_token_accuracy` metrics (an override that keeps none logs no such metrics).
        """
        logps, *extra = sequence_logps(
            model,
            batch,
            chunk_size=self.args.logprob_chunk_size,
            return_aux_loss=self.aux_loss_enabled,
            return_wpo_logps=self.args.use_weighting,
            return_token_stats=True,
        )
        if self.aux_loss_enabled:
            self._router_aux_loss = extra.pop(0)
        if self.args.use_weighting:
            self._wpo_logps = extra.pop(0)
        self._token_stats = extra.pop(0)
        return logps

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) summed log-probs of each response under π_ref: precomputed, or computed without gradient."""
        return _reference_logps(self.model, self.ref_model, batch, chunk_size=self.args.logprob_chunk_size)

    def dpo_loss(
        self,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        response_lengths: torch.Tensor | None = None,
    ):
        """Per-example losses (B,) and detached implicit rewards β·log(π/π_ref) (B, K).

        Pairs (K = 2) use `args.loss_type` (weighted by `args.loss_weights`); rankings (K > 2) the
        Plackett-Luce loss (paper App. A.3). `response_lengths` (B, K), the scored tokens per response, feed
        the per-token losses (`sigmoid_norm`, `ipo_trl`, `sft`). `bco_pair`'s reward shift δ is the running
        mean of the training batches' mean rewards (over processes), kept here and not checkpointed.
        """
        args = self.args
        if policy_logps.shape[1] == 2:
            reward_shift = 0.0
            if "bco_pair" in ([args.loss_type] if isinstance(args.loss_type, str) else args.loss_type):
                if not hasattr(self, "_bco_reward_shift"):
                    self._bco_reward_shift = RunningMean()
                if (
                    self.model.training
                ):  # δ includes this batch, as in the BCO reference code; eval only reads it
                    batch_mean = (args.beta * (policy_logps - reference_logps)).detach().mean().reshape(1)
                    self._bco_reward_shift.update(self.accelerator.gather(batch_mean).mean().item())
                reward_shift = self._bco_reward_shift.mean
            lengths = (
                (None, None) if response_lengths is None else (response_lengths[:, 0], response_lengths[:, 1])
            )
            losses, chosen, rejected = preference_loss(
                policy_logps[:, 0],
                policy_logps[:, 1],
                reference_logps[:, 0],
                reference_logps[:, 1],
                beta=args.beta,
                loss_type=args.loss_type,
                label_smoothing=args.label_smoothing,
                loss_weights=args.loss_weights,
                chosen_lengths=lengths[0],
                rejected_lengths=lengths[1],
                f_divergence_type=args.f_divergence_type,
                f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                discopop_tau=args.discopop_tau,
                reward_shift=reward_shift,
            )
            if args.use_weighting:  # WPO: each pair's loss times its weight (`policy_logps` kept the means)
                aligned, self._wpo_logps = getattr(self, "_wpo_logps", None), None
                if aligned is None:
                    raise ValueError(
                        "use_weighting: policy_logps did not keep the WPO means (call DPOTrainer.policy_logps)."
                    )
                losses = losses * wpo_weights(aligned).to(losses.dtype)
            return losses, torch.stack([chosen, rejected], dim=1)
        if args.use_weighting:
            raise ValueError(
                "use_weighting (WPO) weighs pairs; rankings of K > 2 responses are not supported."
            )
        losses = plackett_luce_loss(policy_logps, reference_logps, beta=args.beta)
        return losses, (args.beta * (policy_logps - reference_logps)).detach()

    # ------------------------------------------------------------------ Trainer overrides

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's default calls model(**inputs) and reads .loss; DPO needs two scorings and a pairwise loss.
        if (
            self.args.ld_alpha is not None
        ):  # LD-DPO: tokens past the shared length weigh ld_alpha, in π and π_ref
            weights = ld_token_weights(inputs["score_seq"], inputs["response_lengths"], self.args.ld_alpha)
            inputs = {**inputs, "score_weight": weights}
        policy = self.policy_logps(model, inputs)
        aux_loss, self._router_aux_loss = self._router_aux_loss, None
        token_stats, self._token_stats = getattr(self, "_token_stats", None), None
        if self.aux_loss_enabled and aux_loss is None:
            raise ValueError("policy_logps did not keep the router aux loss (call DPOTrainer.policy_logps).")
        reference = self.reference_logps(inputs).to(policy.device)
        # the token counts go to a `dpo_loss` that takes them (a subclass's may not: the hook's older signature)
        takes_lengths = "response_lengths" in inspect.signature(self.dpo_loss).parameters
        extra = {"response_lengths": inputs["response_lengths"]} if takes_lengths else {}
        losses, rewards = self.dpo_loss(policy, reference, **extra)
        if self.args.rpo_alpha:
            # + alpha x the chosen response's mean token NLL (an emptied response counts one token)
            tokens = inputs["response_lengths"][:, 0].clamp_min(1).to(policy.dtype)
            losses = losses - self.args.rpo_alpha * policy[:, 0] / tokens
        if aux_loss is not None:
            # + coef x the MoE load-balancing loss (TRL's aux_loss): the batch's value on each of its pairs, so
            # the loss of a batch (and TRL's eval_loss) is its mean DPO loss + coef x aux_loss
            losses = losses + self.router_aux_loss_coef * aux_loss.to(losses.device, losses.dtype)
        self._flag_step("train" if model.training else "eval", losses, reference)
        mode = "train" if model.training else self._eval_prefix
        self._record_metrics(mode, policy.detach(), rewards, losses.detach(), aux_loss, token_stats, inputs)
        if model.training and num_items_in_batch is not None:
            # the mean over the step's pairs; DDP averages gradients over processes, hence the factor
            loss = losses.sum() * self.accelerator.num_processes / num_items_in_batch
        else:
            loss = losses.mean()
        return (loss, {"policy_logps": policy.detach(), "rewards": rewards}) if return_outputs else loss

    def _flag_step(self, mode: str, losses: torch.Tensor, reference: torch.Tensor) -> None:
        """OR this micro-step's problems into device flags [loss non-finite, reference invalid]: no host sync."""
        flags = torch.stack([~torch.isfinite(losses.detach()).all(), invalid_reference(reference)])
        current = self._guard_flags.get(mode)
        self._guard_flags[mode] = flags if current is None else current | flags

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer calls this once the step's gradients are final, just before the optimizer step: the place
        # for the divergence guard (`dpo_trainer.guards`).
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._guard_optimizer_step(model, grad_norm)
        return grad_norm

    def _guard_optimizer_step(self, model: nn.Module, grad_norm) -> None:
        """Raise, or drop the gradients (`on_nonfinite="skip"`), when the step's loss or grad norm is not finite.

        One host sync per optimizer step (the flags of all micro-steps and the grad norm, summed over the
        processes so that every process decides alike).
        """
        flags = self._guard_flags.pop("train", None)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32).reshape(1)
        device = flags.device if flags is not None else self.args.device
        flags = torch.zeros(2, dtype=torch.bool, device=device) if flags is None else flags
        values = torch.cat([flags.float(), (~torch.isfinite(norm.to(device))).float()])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        loss_bad, reference_bad, norm_bad = (value > 0 for value in values.tolist())
        step = self.state.global_step + 1
        if reference_bad:
            raise NonFiniteError(
                f"Step {step}: reference log-probs that are not finite or above 0 (a log-probability is <= 0); "
                "the reference model or the precomputed values are broken."
            )
        if not (loss_bad or norm_bad):
            return
        what = " and ".join(
            name for name, bad in (("loss", loss_bad), (f"gradient norm ({float(norm)})", norm_bad)) if bad
        )
        if self.args.on_nonfinite == "raise":
            raise NonFiniteError(
                f"Training diverged at step {step}: non-finite {what}. The optimizer did not apply this step, so "
                f"the weights (and every checkpoint) are those of step {step - 1}. Lower the learning rate, or "
                "set DPOConfig(on_nonfinite='skip') to skip such steps."
            )
        for parameter in model.parameters():  # the optimizer skips parameters without a gradient: no update
            parameter.grad = None
        self._skipped_steps += 1
        logger.warning("Step %d: non-finite %s; step skipped (no optimizer update).", step, what)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Never write a checkpoint or a model from NaN / inf weights (this process's shards, if sharded).
        bad = nonfinite_parameters(self.model)
        if bad:
            raise NonFiniteError(
                f"Refusing to save to {output_dir or self.args.output_dir} at step {self.state.global_step}: "
                f"non-finite weights in {', '.join(bad)}."
            )
        result = super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # the settings beside the weights: a resumed run is compared with them
            write_settings(output_dir or self.args.output_dir, self.dpo_settings())
        return result

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        # A dataset given here is prepared as in __init__ (tokenized, and with precomputed reference log-probs
        # when the run uses them); a dict of them is evaluated set by set, each under "<prefix>_<name>_".
        if isinstance(eval_dataset, Mapping):
            metrics = {}
            for key, value in eval_dataset.items():
                metrics.update(self.evaluate(value, ignore_keys, f"{metric_key_prefix}_{key}"))
            return metrics
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._prepare_eval_dataset(eval_dataset)
        # Before train(), Trainer prepares the policy for evaluation in ways training cannot start from: with
        # several processes accelerate then marks the policy prepared and train() never wraps it in DDP
        # (gradients are not synchronised); ZeRO 1-2 refuse to build an inference engine; ZeRO-3 leaves
        # one without optimizer that train() reuses; FSDP2 refuses a model without its optimizer. The
        # policy is evaluated through a temporary view instead: itself (with the run's autocast), a
        # DeepSpeed inference engine whose hooks are removed after, or a sharded copy under FSDP.
        if self.is_in_train or self._policy_prepared():
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        policy, models = self.model, list(self.accelerator._models)
        with policy_as_reference(policy, self.accelerator) as view, self.accelerator.autocast():
            # evaluation_loop calls `self.model` (the module inside a DeepSpeed engine, whose hooks stay on
            # it) and takes a non-empty `_models` / a set `deepspeed` for "already prepared".
            self.model, self.model_wrapped = self.accelerator.unwrap_model(view), view
            self.accelerator._models[:] = [view]
            self.deepspeed = view if self.is_deepspeed_enabled else None
            try:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self.model = self.model_wrapped = policy
                self.accelerator._models[:] = models
                self.deepspeed = None

    def _prepare_eval_dataset(self, dataset):
        """Tokenize a dataset given to `evaluate()`; add its reference log-probs when they are precomputed."""
        if self.args.precompute_ref_log_probs and isinstance(dataset, IterableDataset):
            raise ValueError(
                "DPOConfig.precompute_ref_log_probs=True needs map-style datasets; evaluate() was given a "
                "streamed datasets.IterableDataset."
            )
        dataset = self.prepare_dataset(dataset, self.processing_class, self.args, "eval_dataset")
        if not self.args.precompute_ref_log_probs or "ref_logps" in dataset.column_names:
            return dataset
        if self.ref_model is None and not is_peft_model(unwrap_to_peft(self.model)):
            if not self._policy_scores_reference or self.state.global_step > 0:
                raise ValueError(
                    "evaluate() was given a new dataset, but its reference log-probs cannot be computed: with "
                    "precompute_ref_log_probs=True the reference model is released once its values are computed "
                    "(and a fully fine-tuned policy is its own reference only before the first step). Pass this "
                    "dataset as eval_dataset when building the trainer, or set precompute_ref_log_probs=False."
                )
        with self._reference_scorer() as score:
            values = self._compute_reference_column(dataset, "evaluate", score)
        return dataset.add_column("ref_logps", values.tolist())

    def _policy_prepared(self) -> bool:
        """Whether Trainer has prepared the policy for training (engine, DDP, device and autocast)."""
        if self.is_deepspeed_enabled:
            return self.deepspeed is not None  # Trainer keeps the engine there once it has built it
        if self.is_fsdp_enabled:
            return is_fsdp_module(self.model)
        return self.model_wrapped is not self.model or getattr(self.model, "_is_accelerate_prepared", False)

    def training_step(self, *args, **kwargs):
        # DPOConfig.activation_offloading: the tensors autograd saves for backward wait in CPU memory.
        if not self.args.activation_offloading:
            return super().training_step(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return super().training_step(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Trainer's default expects logits and labels; evaluation here is the loss plus reward metrics. With a
        # `compute_metrics`, it gets what TRL gives it: the policy's logits (K*B, T, V) on the padded rows
        # (chosen rows, then rejected rows) and those rows' input_ids as labels, from an extra forward pass.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only:
                return loss.detach(), None, None
            input_ids = inputs.get(
                "padded_input_ids", inputs["input_ids"] if self.layout == "padded" else None
            )
            if input_ids is None:
                raise ValueError(
                    "compute_metrics needs the padded rows of each batch, which a custom data_collator for the "
                    f"{self.layout!r} layout does not give; add 'padded_input_ids' / 'padded_attention_mask' "
                    "(see dpo_trainer.trainer.WithPaddedView) or use DPOConfig(layout='padded')."
                )
            mask = inputs.get("padded_attention_mask", inputs.get("attention_mask"))
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        # Gathered per pair, (B, T, K, ...), so that Trainer's cut of a padded last batch keeps whole pairs;
        # `PairRowsMetrics` hands compute_metrics TRL's rows.
        k = inputs["response_lengths"].shape[1]
        logits = logits.detach().unflatten(0, (k, -1)).permute(1, 2, 0, 3)
        return loss.detach(), logits, input_ids.unflatten(0, (k, -1)).permute(1, 2, 0)

    def _record_metrics(
        self,
        mode: str,
        policy: torch.Tensor,
        rewards: torch.Tensor,
        losses: torch.Tensor,
        aux_loss: torch.Tensor | None = None,
        token_stats: torch.Tensor | None = None,
        batch: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add per-example sums and the example count to the accumulator of `mode`, on the device.

        `token_stats` (B, K, 3) are `sequence_logps`'s per-response sums of the head's token statistics;
        they are accumulated with the completion token counts of `batch` and divided in `_metric_means`.

        No host sync here: training sums stay per process and are all-reduced once, in `log`, so processes
        may hold batches of different sizes (`max_tokens_per_batch`). Evaluation gathers each batch with
        `gather_for_metrics`, which drops the examples accelerate repeats to even out the last batch, and
        keeps the per-example loss: Trainer's own eval loss averages batch means, repeats included.
        """
        chosen, rejected = rewards[:, 0], rewards[:, -1]  # rankings: best vs worst
        values = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "rewards/margins": chosen - rejected,
            "logps/chosen": policy[:, 0],
            "logps/rejected": policy[:, -1],
        }
        values["loss"] = losses
        if (
            token_stats is None or batch is None
        ):  # no statistics kept: zero tokens, so no token metrics logged
            token_stats, lengths = policy.new_zeros(*policy.shape, 3), torch.zeros_like(policy)
        else:
            lengths = batch["response_lengths"].to(policy.device, policy.dtype)
        values["logits/chosen"], values["logits/rejected"] = token_stats[:, 0, 0], token_stats[:, -1, 0]
        values["entropy"] = token_stats[:, :, 1].sum(dim=1)
        values["mean_token_accuracy"] = token_stats[:, 0, 2]
        values["_tokens/chosen"], values["_tokens/rejected"] = lengths[:, 0], lengths[:, -1]
        values["_tokens/all"] = lengths.sum(dim=1)
        if mode == "train":  # the batch's count on its first example (training sums are not gathered)
            values["num_tokens"] = torch.zeros_like(losses)
            if batch is not None:
                values["num_tokens"][0] = self._padded_token_count(batch)
        if aux_loss is not None:  # the batch's router aux loss, counted once per example like the others
            values["aux_loss"] = aux_loss.detach().to(losses.device, losses.dtype).expand(losses.shape[0])
        names = self._metric_names(mode)
        stacked = torch.stack([values[name] for name in names], dim=1)
        # float64 sums: exact enough over millions of examples (MPS has no float64)
        stacked = stacked.to(torch.float32 if stacked.device.type == "mps" else torch.float64)
        if mode != "train":
            stacked = self.accelerator.gather_for_metrics(stacked)
        entry = self._metrics.setdefault(mode, [torch.zeros_like(stacked[0]), 0])
        entry[0] += stacked.sum(dim=0)
        entry[1] += stacked.shape[0]  # known on the host: no sync

    def _padded_token_count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Prompt + completion tokens of the batch's pairs as padded rows (TRL's `attention_mask.sum()`), in any
        layout: `shared_prompt` holds each prompt once, where padded rows hold it once per response."""
        if "padded_attention_mask" in batch:
            return batch["padded_attention_mask"].sum()
        if "doc_ids" not in batch:
            return batch["attention_mask"].sum()
        real = batch["doc_ids"] != PAD_DOC
        count = real.sum()
        if self.layout == "shared_prompt":
            prompts = (real & (batch["branch_ids"] == SHARED_BRANCH)).sum()
            count = count + (batch["response_lengths"].shape[1] - 1) * prompts
        return count

    def _metric_names(self, mode: str) -> tuple[str, ...]:
        names = METRIC_NAMES + tuple(TOKEN_METRICS) + TOKEN_COUNTS
        names = names + ("num_tokens",) if mode == "train" else names + ("loss",)
        return names + ("aux_loss",) if getattr(self, "aux_loss_enabled", False) else names

    def _metric_means(self, mode: str, all_reduce: bool) -> dict[str, float]:
        """Means of `mode`'s accumulated metrics, then reset; `all_reduce` sums over processes first (every
        process must call it then). One host sync."""
        names = self._metric_names(mode)
        entry = self._metrics.pop(mode, None)
        if entry is None:
            totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.args.device)
        else:
            totals = torch.cat([entry[0], entry[0].new_tensor([entry[1]])])
        if all_reduce and self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        *sums, count = totals.tolist()
        if not count:
            return {}
        sums = dict(zip(names, sums))
        if mode == "train":
            self._total_train_tokens += round(sums.pop("num_tokens"))
        means = {}
        for name, total in sums.items():
            if name in TOKEN_METRICS:  # per completion token, as TRL's
                if sums[TOKEN_METRICS[name]] > 0:
                    means[name] = total / sums[TOKEN_METRICS[name]]
            elif name not in TOKEN_COUNTS:
                means[name] = total / count
        means["num_tokens"] = float(
            self._total_train_tokens
        )  # as TRL's, in evaluation too: tokens trained on
        return means

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # One accumulator per evaluation, reset at its start (predict() then evaluate() give the same metrics),
        # its means added to the returned metrics under the evaluation's prefix, as TRL names them.
        self._metrics.pop(metric_key_prefix, None)
        self._guard_flags.pop("eval", None)
        self._eval_prefix = metric_key_prefix
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if "eval" in self._guard_flags and bool(self._guard_flags.pop("eval")[1]):
            raise NonFiniteError(f"Evaluation ({metric_key_prefix}): reference log-probs not finite or > 0.")
        means = self._metric_means(metric_key_prefix, all_reduce=False)  # gathered batch by batch already
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in means.items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Adds the training metrics accumulated since the last log (one all-reduce; every process logs).
        # Evaluation metrics are added by `evaluation_loop`.
        if self.model.training and "loss" in logs:
            logs.update(self._metric_means("train", all_reduce=True))
            if self._skipped_steps:
                logs["nonfinite_skipped_steps"] = self._skipped_steps
        super().log(logs, start_time)

    @staticmethod
    def _check_positions(models, datasets: Mapping) -> None:
        """Refuse rows longer than a model's `max_position_embeddings` before training, not mid-run.

        Every layout gives a response the positions after its prompt, so a row needs prompt + longest
        response positions.
        """
        limits = []
        for model in models:
            inner = None if model is None else unwrap(model)
            limit = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
            if isinstance(limit, int) and limit > 0:
                limits.append((type(inner).__name__, limit))
        if not limits:
            return
        name, limit = min(limits, key=lambda item: item[1])
        named = []
        for key, value in datasets.items():
            if isinstance(value, Mapping):
                named += [(f"{key}[{k!r}]", v) for k, v in value.items()]
            else:
                named.append((key, value))
        for key, dataset in named:
            if not isinstance(dataset, Dataset):
                continue  # streamed: not known before training
            lengths = (
                len(prompt) + max(map(len, responses))
                for prompt, responses in zip(dataset["prompt_ids"], dataset["response_ids"])
            )
            for row, length in enumerate(lengths):
                if length > limit:
                    raise ValueError(
                        f"{key} row {row} (after tokenization and truncation) needs {length} positions, but "
                        f"{name} has max_position_embeddings={limit}; set DPOConfig.max_length <= {limit}."
                    )

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Saving also writes a model card naming the method and its settings. A PEFT model's save_pretrained
        # writes (or edits) README.md itself: PEFT's generic card is replaced by ours, and a README the user
        # wrote is put back exactly as it was.
        output_dir = output_dir or self.args.output_dir
        path = os.path.join(output_dir, "README.md")
        before = _read_text(path)
        super()._save(output_dir, state_dict)
        if before is not None and MODEL_CARD_MARKER not in before:
            if _read_text(path) != before:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(before)
            logger.warning("Not writing a model card: %s exists and was not written by dpo_trainer.", path)
            return
        if before is None and os.path.exists(path):
            os.remove(path)  # the card save_pretrained wrote (PEFT's), replaced by ours
        self.write_model_card(output_dir)

    def write_model_card(self, output_dir: str) -> str | None:
        """Write README.md describing the run, unless a README.md not written by this library is there."""
        path = os.path.join(output_dir, "README.md")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                if MODEL_CARD_MARKER not in handle.read():
                    logger.warning(
                        "Not writing a model card: %s exists and was not written by dpo_trainer.", path
                    )
                    return None
        base = unwrap(self.model)
        name = getattr(base.config, "_name_or_path", "") or base.config.model_type
        tags = list(dict.fromkeys(self._tag_names + list(getattr(base, "model_tags", None) or [])))
        reference = (
            "precomputed log-probs"
            if self.args.precompute_ref_log_probs
            else (
                "the base model (adapter disabled)"
                if is_peft_model(unwrap_to_peft(self.model))
                else "a frozen copy"
            )
        )
        names = [self.args.loss_type] if isinstance(self.args.loss_type, str) else self.args.loss_type
        weights = self.args.loss_weights or [None] * len(names)
        loss_label = " + ".join(f"`{n}`" if w is None else f"{w} x `{n}`" for n, w in zip(names, weights))
        card = f"""---
library_name: transformers
tags: [{", ".join(tags)}]
---
{MODEL_CARD_MARKER}
# {os.path.basename(os.path.abspath(output_dir))}

Trained from `{name}` with Direct Preference Optimization (DPO; Rafailov et al., 2023,
[arXiv:2305.18290](https://arxiv.org/abs/2305.18290)) using dpo_trainer {__version__}.

| setting | value |
|---|---|
| method | DPO |
| loss | {loss_label} |
| beta | {self.args.beta} |
| label_smoothing | {self.args.label_smoothing} |
| learning_rate | {self.args.learning_rate} |
| max_length / max_prompt_length | {self.args.max_length} / {self.args.max_prompt_length} |
| reference | {reference} |
| global step | {self.state.global_step} |
"""
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(card)
        return path
