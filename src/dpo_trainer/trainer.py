"""`DPOTrainer`: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) as a `transformers.Trainer`.

The glue between `models` (loading, wrappers, LoRA), `data` (rows to batches), `logprobs` (scoring),
`reference` (π_ref, live or precomputed), `losses`, `metrics`, `guards` and `model_card`; the private
`Trainer` methods it overrides are in `_compat`. Hooks meant for subclassing (e.g. in a notebook):
  * `policy_logps(model, batch) -> (B, K)`: summed log-probs of each response under the policy.
  * `reference_logps(batch) -> (B, K)`: the same under the reference (no gradient).
  * `dpo_loss(policy_logps, reference_logps, response_lengths) -> (losses (B,), rewards (B, K))`: the objective.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer

from . import model_card, models
from ._compat import TrainerOverrides, check_upstream
from .attention import choose_attention, resolve_layout
from .checkpoints import StopsAtTheEnd, resolve_resume, run_settings, write_settings
from .config import DPOConfig
from .data.batching import token_budget_loader
from .data.layouts import default_collator
from .data.prepare import check_positions, check_streaming, prepare_dataset, prepare_each
from .data.tokenized import TOKENIZED_COLUMNS
from .guards import NonFiniteError, StepGuard, check_finite_before_save
from .launch import BF16_FALLBACK
from .logprobs import check_models_logps, score_responses
from .losses import (
    RunningMean,
    ld_token_weights,
    needs_reward_shift,
    plackett_luce_loss,
    preference_loss,
    wpo_weights,
)
from .metrics import DPOMetrics, PairRowsMetrics, padded_rows
from .placement import evaluating_before_training, policy_prepared, prepare_reference
from .reference.cache import rows_fingerprint
from .reference.precompute import add_reference_column, precompute_reference
from .reference.scoring import build_reference
from .reference.scoring import reference_logps as _reference_logps
from .reference.sync import SyncRefModelCallback, load_reference_adapter
from .trl_config import trainer_args

logger = logging.getLogger(__name__)


class DPOTrainer(StopsAtTheEnd, TrainerOverrides, Trainer):
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
            run's autocast (`dpo_trainer.placement`; examples/accelerate/README.md).
        args: a `DPOConfig` (None: the defaults, writing to "<model name>-DPO").
        data_collator: as in `transformers.Trainer`; None picks the collator of the layout.
        train_dataset, eval_dataset: a `datasets.Dataset`, a streamed `datasets.IterableDataset` (tokenized
            as read; training then needs `args.max_steps`) or a list of dicts (eval: also a dict of them), in
            one of the formats of `dpo_trainer.data.formats`, or already tokenized (ours or TRL's columns).
            `train_dataset` is required, as in TRL.
        processing_class: the tokenizer; None loads it from the model's `config._name_or_path`. It is not
            changed: without a pad token, batches are padded with EOS (`models.pad_token_id`).
        compute_metrics: called at evaluation, as in TRL, with an `EvalPrediction` of the policy's logits
            (2N, T, V) on the padded rows (the N chosen rows, then the N rejected rows) and those rows'
            `input_ids` as `label_ids` (2N, T), padded with -100 across batches; computed by an extra
            forward pass, only when it is given.
        callbacks, optimizers: as in `transformers.Trainer`.
        quantization_config: a `transformers.BitsAndBytesConfig` applied when `model` (and `ref_model`) is
            loaded from a name or path, e.g. 4-bit NF4 for QLoRA (with `peft_config`). The adapter weights
            are then kept in the config's compute dtype (`bnb_4bit_compute_dtype`), as in the QLoRA paper.
        peft_config: a `peft.PeftConfig`; the model is wrapped with `get_peft_model`.

    What the trainer changes on what it is given, as `transformers.Trainer` does: the model it trains (its
    weights; dropout set to 0 with `args.disable_dropout`; for the grouped layouts, its attention
    implementation, logged), the global RNG (`Trainer` seeds it with `args.seed`), and, for a streamed
    `train_dataset`, `args.accelerator_config.dispatch_batches` (set to False, logged).
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
        check_upstream()
        args = trainer_args(args, model, train_dataset)
        check_streaming(args, train_dataset, eval_dataset)
        # a PeftModel given with its adapter (e.g. LoRA SFT): π_ref is a frozen copy of that adapter, as in TRL
        adapter_given = peft_config is None and isinstance(model, nn.Module) and models.is_peft_model(model)
        model, processing_class, self.pad_token_id = models.prepare_policy(
            model, args, processing_class, quantization_config, peft_config
        )
        self.ref_model = build_reference(model, ref_model, args, quantization_config, adapter_given)
        self.reference_description = model_card.describe_reference(model, ref_model, args)
        if args.disable_dropout:
            models.disable_dropout(model)
        # Full fine-tuning that precomputes from the policy itself: π_ref exists only before the first step.
        self.policy_is_reference = self.ref_model is None and not models.is_peft_model(model)

        train_dataset = prepare_dataset(
            train_dataset, processing_class, **args.data_settings(), name="train_dataset"
        )
        eval_dataset = prepare_each(eval_dataset, processing_class, "eval_dataset", **args.data_settings())
        self.router_aux_loss_coef, self.aux_loss_enabled = models.router_aux_loss_settings(args, model)
        self._router_aux_loss = None  # set by `policy_logps`, read by `compute_loss`
        self.layout = resolve_layout(args.layout, [model, self.ref_model], self.aux_loss_enabled)
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        check_positions(datasets, models.position_limit([model, self.ref_model]))  # not an IndexError mid-run
        if self.layout != "padded":
            choose_attention([model, self.ref_model], args.flex_attention, args.device.type, args.layout)
        if data_collator is None:  # compute_metrics sees TRL's padded rows (`prediction_step`)
            padded_view = compute_metrics is not None
            data_collator = default_collator(
                self.layout, self.pad_token_id, args.pad_to_multiple_of, padded_view
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
        # Training losses are normalised by the pairs of the whole optimizer step (`count_step_pairs`), so
        # batch 8 x 1 step, batch 2 x 4 steps and token-budget batches of any size weigh every pair alike.
        self.model_accepts_loss_kwargs = True
        self.metrics = DPOMetrics(self.accelerator, args.device, self.layout, self.aux_loss_enabled)
        self.guard = StepGuard(args.on_nonfinite, args.device)
        if getattr(args, "_bf16_fell_back", False):
            logger.warning(BF16_FALLBACK)
        if args.fp16 and args.device.type == "cpu" and not self.accelerator.native_amp:
            logger.warning(
                "DPOConfig.fp16=True on the CPU: accelerate runs no float16 autocast there, so training computes "
                "in float32. Use bf16=True (CPU autocast) or bf16=False to say so."
            )
        self._eval_prefix, self._data_fingerprint, self._bco_reward_shift = "eval", None, RunningMean()
        if hasattr(self.model, "add_model_tags"):  # the hub model card's tags, as TRL's ("trl", "dpo")
            self.model.add_model_tags(self._tag_names)
        if self.ref_model is not None:  # placed like the policy, never given to an optimizer
            self.ref_model = prepare_reference(self.ref_model, self.accelerator)
        if args.sync_ref_model:  # TR-DPO: the reference follows the policy every τ steps
            self.add_callback(SyncRefModelCallback.for_trainer(self))
        if args.check_logprobs and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled
        ):  # (engines: sharded)
            check_models_logps([self.model, self.ref_model], self.train_dataset, self.data_collator)
        if args.precompute_ref_log_probs:
            precompute_reference(self)

    @staticmethod
    def prepare_dataset(dataset, tokenizer, args: DPOConfig, name: str = "dataset"):
        """`data.prepare_dataset` with `args`' truncation and loss settings."""
        return prepare_dataset(dataset, tokenizer, **args.data_settings(), name=name)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        # Resuming: the newest complete checkpoint for True, written by the same kind of run (full or adapter)
        # with the same loss and data (`checkpoints.resolve_resume`); a run already at its last step trains
        # nothing (`checkpoints.StopsAtTheEnd`).
        self.guard.check_engine(self.is_deepspeed_enabled)
        adapter = models.is_peft_model(models.unwrap_to_peft(self.model))
        checkpoint = resolve_resume(
            resume_from_checkpoint, self.args.output_dir, self.accelerator, self.dpo_settings, adapter=adapter
        )
        return super().train(checkpoint, trial, ignore_keys_for_eval)

    def dpo_settings(self) -> dict:
        """What decides this run's result besides the model: saved with every checkpoint and model
        (`dpo_settings.json`) and compared when a run resumes."""
        if self._data_fingerprint is None and isinstance(self.train_dataset, Dataset):
            rows = self.train_dataset.select_columns(["prompt_ids", "response_ids"])
            self._data_fingerprint = rows_fingerprint(rows)
        return run_settings(self.args, self.layout, self._data_fingerprint)

    # ------------------------------------------------------------------ hooks for subclasses

    def policy_logps(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) summed log-probs of each response under the policy, with gradient.

        For a Mixture-of-Experts policy with the router aux loss on, the same forward pass also gives the
        model's own load-balancing loss, kept for `compute_loss`; with WPO, each response's aligned mean; and
        always the (B, K, 3) sums of the head's token statistics behind TRL's `logits/*`, `entropy` and
        `mean_token_accuracy` metrics (an override that keeps none logs no such metrics).
        """
        scores = score_responses(
            model,
            batch,
            chunk_size=self.args.logprob_chunk_size,
            return_aux_loss=self.aux_loss_enabled,
            return_wpo_logps=self.args.use_weighting,
            return_token_stats=True,
        )
        self._router_aux_loss, self._wpo_logps = scores.aux_loss, scores.wpo_logps
        self._token_stats = scores.token_stats
        return scores.logps

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) summed log-probs of each response under π_ref: precomputed, or computed without gradient."""
        return _reference_logps(self.model, self.ref_model, batch, chunk_size=self.args.logprob_chunk_size)

    def dpo_loss(self, policy_logps: torch.Tensor, reference_logps: torch.Tensor, response_lengths=None):
        """Per-example losses (B,) and detached implicit rewards β·log(π/π_ref) (B, K).

        Pairs (K = 2) use `args.loss_type` (weighted by `args.loss_weights`); rankings (K > 2) the
        Plackett-Luce loss (paper App. A.3). `response_lengths` (B, K), the scored tokens per response, feed
        the per-token losses (`sigmoid_norm`, `ipo`, `sft`). A loss that reads BCO's reward shift δ
        (`bco_pair_paper`: `losses.needs_reward_shift`) gets the running mean of the training batches' mean
        rewards (over processes), kept here and not checkpointed; TRL's `bco_pair` has no δ.
        """
        args = self.args
        if policy_logps.shape[1] != 2:
            if args.use_weighting:
                raise ValueError(
                    "use_weighting (WPO) weighs pairs; rankings of K > 2 responses are not supported."
                )
            losses = plackett_luce_loss(policy_logps, reference_logps, beta=args.beta)
            return losses, (args.beta * (policy_logps - reference_logps)).detach()
        reward_shift = 0.0
        if needs_reward_shift(args.loss_type):
            if self.model.training:  # δ includes this batch, as in the BCO reference code; eval only reads it
                batch_mean = (args.beta * (policy_logps - reference_logps)).detach().mean().reshape(1)
                self._bco_reward_shift.update(self.accelerator.gather(batch_mean).mean().item())
            reward_shift = self._bco_reward_shift.mean
        losses, chosen, rejected = preference_loss(
            *policy_logps.unbind(1),
            *reference_logps.unbind(1),
            **args.loss_settings(),
            chosen_lengths=None if response_lengths is None else response_lengths[:, 0],
            rejected_lengths=None if response_lengths is None else response_lengths[:, 1],
            reward_shift=reward_shift,
        )
        if args.use_weighting:  # WPO: each pair's loss times its weight (`policy_logps` kept the means)
            aligned, self._wpo_logps = getattr(self, "_wpo_logps", None), None
            if aligned is None:
                raise ValueError(
                    "use_weighting: policy_logps did not keep the WPO means (see DPOTrainer.policy_logps)."
                )
            losses = losses * wpo_weights(aligned).to(losses.dtype)
        return losses, torch.stack([chosen, rejected], dim=1)

    # ------------------------------------------------------------------ Trainer overrides

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's default calls model(**inputs) and reads .loss; DPO needs two scorings and a pairwise loss.
        if self.args.ld_alpha is not None:  # LD-DPO: tokens past the shared length weigh ld_alpha (π, π_ref)
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
        if (
            self.args.rpo_alpha
        ):  # + alpha x the chosen response's mean token NLL (an emptied response: 1 token)
            tokens = inputs["response_lengths"][:, 0].clamp_min(1).to(policy.dtype)
            losses = losses - self.args.rpo_alpha * policy[:, 0] / tokens
        if (
            aux_loss is not None
        ):  # + coef x the MoE load-balancing loss (TRL's aux_loss) of the batch, per pair
            losses = losses + self.router_aux_loss_coef * aux_loss.to(losses.device, losses.dtype)
        mode = "train" if model.training else self._eval_prefix
        self.guard.flag("train" if model.training else "eval", losses, reference)
        self.metrics.record(mode, policy.detach(), rewards, losses.detach(), aux_loss, token_stats, inputs)
        if model.training and num_items_in_batch is not None:
            # the mean over the step's pairs; DDP averages gradients over processes, hence the factor
            loss = losses.sum() * self.accelerator.num_processes / num_items_in_batch
        else:
            loss = losses.mean()
        return (loss, {"policy_logps": policy.detach(), "rewards": rewards}) if return_outputs else loss

    dataset_columns = TOKENIZED_COLUMNS  # what the collator reads; Trainer keeps these columns

    def count_step_pairs(self, batch_samples, device) -> torch.Tensor:
        """Pairs (examples) in the optimizer step, summed over processes: the training loss's denominator."""
        pairs = sum(batch["response_lengths"].shape[0] for batch in batch_samples)
        return self.accelerator.gather(torch.tensor(pairs, device=device)).sum()

    def after_checkpoint_loaded(self, checkpoint: str) -> None:
        """TR-DPO with LoRA: the reference adapter as the checkpoint saved it (`reference.sync.load_reference_adapter`)."""
        load_reference_adapter(models.unwrap_to_peft(self.model), checkpoint)

    def before_optimizer_step(self, model: nn.Module, grad_norm) -> None:
        """The divergence guard (`guards.StepGuard`), once the step's gradients are final."""
        self.guard.check(model, grad_norm, self.state.global_step + 1, self.accelerator)

    def save_weights(self, output_dir: str, state_dict=None, *, save) -> None:
        """Every save's weights (checkpoints and `save_model`), written by `save(output_dir, state_dict)`
        (Trainer's own), then the model card; a README.md the user wrote is kept as it was."""
        model_card.save_keeping_user_readme(
            output_dir, lambda: save(output_dir, state_dict), self.write_model_card
        )

    def get_train_dataloader(self):
        # A token budget replaces the fixed batch size with batches of whole examples filling the budget.
        if self.args.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        loader = token_budget_loader(self.train_dataset, self.layout, self.data_collator, self.args)
        # its batches are already a multiple of the process count (`TokenBudgetBatchSampler`): accelerate must not
        # complete a last round with repeated batches, which accelerate 1.8 also refuses for such a sampler
        even_batches, self.accelerator.even_batches = self.accelerator.even_batches, False
        try:
            return self.accelerator.prepare(loader)
        finally:
            self.accelerator.even_batches = even_batches

    def training_step(self, *args, **kwargs):
        # DPOConfig.activation_offloading: the tensors autograd saves for backward wait in CPU memory.
        if not self.args.activation_offloading:
            return super().training_step(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return super().training_step(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        check_finite_before_save(self.model, output_dir or self.args.output_dir, self.state.global_step)
        result = super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # the settings beside the weights: a resumed run is compared with them
            write_settings(output_dir or self.args.output_dir, self.dpo_settings())
        return result

    def write_model_card(self, output_dir: str) -> str | None:
        """Write README.md describing the run, unless a README.md not written by this library is there."""
        return model_card.write_model_card(
            output_dir,
            model=self.model,
            args=self.args,
            tags=self._tag_names,
            global_step=self.state.global_step,
            reference=self.reference_description,
        )

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
            eval_dataset = self.prepare_dataset(
                eval_dataset, self.processing_class, self.args, "eval_dataset"
            )
            eval_dataset = add_reference_column(self, eval_dataset)
        if self.is_in_train or policy_prepared(self):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        with evaluating_before_training(self):  # a temporary view of the policy (see `placement`)
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Trainer's default expects logits and labels; evaluation here is the loss plus reward metrics. With a
        # `compute_metrics`, it gets what TRL gives it: the policy's logits (K*B, T, V) on the padded rows
        # (chosen rows, then rejected rows) and those rows' input_ids as labels, from an extra forward pass.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only:
                return loss.detach(), None, None
            input_ids, mask = padded_rows(inputs, self.layout)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        # Gathered per pair, (B, T, K, ...), so that Trainer's cut of a padded last batch keeps whole pairs;
        # `PairRowsMetrics` hands compute_metrics TRL's rows.
        k = inputs["response_lengths"].shape[1]
        logits = logits.detach().unflatten(0, (k, -1)).permute(1, 2, 0, 3)
        return loss.detach(), logits, input_ids.unflatten(0, (k, -1)).permute(1, 2, 0)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # One accumulator per evaluation, reset at its start (predict() then evaluate() give the same metrics),
        # its means added to the returned metrics under the evaluation's prefix, as TRL names them.
        self.metrics.reset(metric_key_prefix)
        self.guard.flags.pop("eval", None)
        self._eval_prefix = metric_key_prefix
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.guard.reference_was_invalid("eval"):
            raise NonFiniteError(f"Evaluation ({metric_key_prefix}): reference log-probs not finite or > 0.")
        means = self.metrics.means(metric_key_prefix, all_reduce=False)  # gathered batch by batch already
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in means.items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Adds the training metrics accumulated since the last log (one all-reduce; every process logs), to the
        # end-of-training summary too, as TRL does: a run shorter than logging_steps logs them (and `aux_loss`)
        # there. Evaluation metrics are added by `evaluation_loop`.
        if self.model.training:
            logs.update(self.metrics.means("train", all_reduce=True))
            logs.update(self.guard.log_fields())
        super().log(logs, start_time)
