"""Reference log-probs precomputed for a trainer: each dataset scored once before training (every process a
contiguous share, gathered in order), checked, cached on disk (`cache`), and added as a `ref_logps` column."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from ..guards import NonFiniteError, reference_problem
from ..logprobs import sequence_logps
from ..models import is_peft_model, unwrap, unwrap_to_peft
from ..placement import policy_as_reference, release_reference
from .cache import (
    cache_dir_problem,
    cache_path,
    default_cache_dir,
    load_cached,
    model_fingerprint,
    rows_fingerprint,
    save_cached,
)
from .scoring import reference_logps

logger = logging.getLogger(__name__)


def compute_dataset_reference_logps(
    batches: Iterable[Mapping[str, torch.Tensor]],
    logps_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    *,
    total: int | None,
    desc: str,
    disable_progress: bool = False,
    num_responses: int = 2,
) -> torch.Tensor:
    """Run `logps_fn` over `batches` in order and stack the results: (rows, K) float32 on CPU."""
    outputs = [torch.zeros(0, num_responses)]  # a process given no rows returns an empty (0, K)
    for batch in tqdm(batches, total=total, desc=desc, disable=disable_progress):
        outputs.append(logps_fn(batch).float().cpu())
    return torch.cat(outputs)


def check_reference_column(name: str, values: torch.Tensor) -> None:
    """Reference log-probs must be finite and <= 0, wherever they come from (`dpo_trainer.guards`)."""
    problem = reference_problem(values)
    if problem:
        raise NonFiniteError(f"Reference log-probs of {name}: {problem}.")


@contextlib.contextmanager
def reference_scorer(trainer):
    """batch -> (B, K) reference log-probs for precomputation, with the models prepared to compute them.

    A separate reference scores through `trainer.reference_logps`. The policy as its own reference (a PEFT
    policy with its adapter disabled, or a fully fine-tuned policy before its first step) is scored through
    `placement.policy_as_reference`, never through weights that ZeRO-3 has partitioned away.
    """
    if trainer.ref_model is not None:
        yield trainer.reference_logps
        return
    chunk_size = trainer.args.logprob_chunk_size
    with policy_as_reference(trainer.model, trainer.accelerator) as policy:
        if is_peft_model(unwrap_to_peft(policy)):  # the base model: the adapter disabled
            if policy is trainer.model:
                yield trainer.reference_logps
            else:
                yield lambda batch: reference_logps(policy, None, batch, chunk_size=chunk_size)
            return

        def score(batch):
            with torch.no_grad():
                return sequence_logps(policy, batch, chunk_size=chunk_size)

        was_training = policy.training
        policy.eval()  # a full-fine-tuning policy is its own reference before training: no dropout
        try:
            yield score
        finally:
            policy.train(was_training)


def compute_reference_column(trainer, dataset, name: str, score) -> torch.Tensor:
    """(rows, K) reference log-probs of `dataset`: each process scores a contiguous share, gathered in order.

    Every process runs the same number of forward passes (a process whose share ends early scores a
    filler batch and drops it): a sharded reference (ZeRO-3, FSDP) gathers weights with collectives.
    """
    from accelerate.utils import gather_object

    args, accelerator, collate = trainer.args, trainer.accelerator, trainer.data_collator
    batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
    share = -(-len(dataset) // accelerator.num_processes)
    start = min(len(dataset), accelerator.process_index * share)
    rows = dataset.select(range(start, min(len(dataset), start + share)))
    loader = torch.utils.data.DataLoader(
        rows.select_columns(["prompt_ids", "response_ids"]),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
    )
    with trainer.compute_loss_context_manager():
        values = compute_dataset_reference_logps(
            (trainer._prepare_inputs(batch) for batch in loader),
            score,
            total=len(loader),
            desc=f"Reference log-probs ({name})",
            disable_progress=args.disable_tqdm or not trainer.is_local_process_zero(),
            num_responses=len(dataset[0]["response_ids"]),
        )
        fillers = -(-share // batch_size) - len(loader)
        if fillers > 0:
            columns = dataset.select(range(min(batch_size, len(dataset)))).select_columns(
                ["prompt_ids", "response_ids"]
            )
            filler = trainer._prepare_inputs(collate(list(columns)))
            for _ in range(fillers):
                score(filler)
    if accelerator.num_processes == 1:
        return values
    return torch.tensor([row for part in gather_object([values.tolist()]) for row in part])


def precompute_reference(trainer) -> None:
    """Add a `ref_logps` column to every dataset of `trainer` (cached on disk), then drop the reference model.

    Runs when the trainer is built, before `Trainer` prepares the policy for its engine: a separate
    reference is already prepared (`placement.prepare_reference`), and the policy, when it is its own
    reference, is scored through `placement.policy_as_reference`.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    args = trainer.args
    # Every process walks the weights (gathering shards is collective); rank 0's key names the cache.
    reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
    model_key = [model_fingerprint(reference, trainer.processing_class)]
    broadcast_object_list(model_key)
    settings = {"bf16": args.bf16, "fp16": args.fp16, "dtype": str(unwrap(trainer.model).dtype)}
    datasets = [("train", trainer.train_dataset)]
    if isinstance(trainer.eval_dataset, Mapping):
        datasets += [(f"eval[{key}]", value) for key, value in trainer.eval_dataset.items()]
    else:
        datasets.append(("eval", trainer.eval_dataset))
    cache_dir = args.ref_logps_cache_dir or default_cache_dir()
    # The first process of each node writes the cache (no shared filesystem assumed), if it can: checked
    # before the precompute, so a read-only folder costs a warning, never the computed values.
    writer = trainer.is_local_process_zero()
    if writer and (problem := cache_dir_problem(cache_dir)):
        logger.warning("Not caching reference log-probs: %s.", problem)
        writer = False
    values, pending = {}, []
    for name, dataset in datasets:
        if dataset is None:
            continue
        if "ref_logps" in dataset.column_names:  # given by the user: checked like computed ones
            check_reference_column(name, torch.tensor(dataset["ref_logps"]))
            continue
        path = cache_path(cache_dir, model_key[0], rows_fingerprint(dataset), settings)
        # Every process reads (and validates) its own view of the cache, e.g. per-node folders; all load
        # only when every process has valid values, else all compute.
        loaded = load_cached(path, len(dataset), len(dataset[0]["response_ids"]))
        if all(gather_object([loaded is not None])):
            values[name] = loaded
            logger.info("Loaded reference log-probs of %s from %s", name, path)
        else:
            pending.append((name, dataset, path))
    if pending:  # the reference is prepared only when something is left to compute
        with reference_scorer(trainer) as score:
            for name, dataset, path in pending:
                values[name] = compute_reference_column(trainer, dataset, name, score)
                check_reference_column(name, values[name])
                if writer:
                    save_cached(path, values[name])
    trainer.accelerator.wait_for_everyone()
    results = {
        name: dataset.add_column("ref_logps", values[name].tolist())
        for name, dataset in datasets
        if name in values
    }
    trainer.train_dataset = results.get("train", trainer.train_dataset)
    if isinstance(trainer.eval_dataset, Mapping):
        trainer.eval_dataset = {k: results.get(f"eval[{k}]", v) for k, v in trainer.eval_dataset.items()}
    else:
        trainer.eval_dataset = results.get("eval", trainer.eval_dataset)
    release_reference(trainer.ref_model)
    trainer.ref_model = None  # the values are in the data now; free the memory


def add_reference_column(trainer, dataset):
    """`dataset` (tokenized, given to `evaluate()`) with its `ref_logps` column, when the run precomputes them."""
    from datasets import IterableDataset

    if not trainer.args.precompute_ref_log_probs:
        return dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset: evaluate() was given a "
            "streamed datasets.IterableDataset, and the reference log-probs are computed over a map-style "
            "dataset. Pass a map-style Dataset or set precompute_ref_log_probs=False."
        )
    if "ref_logps" in dataset.column_names:
        return dataset
    if trainer.ref_model is None and not is_peft_model(unwrap_to_peft(trainer.model)):
        if not trainer.policy_is_reference or trainer.state.global_step > 0:
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training has "
                "started: with precompute_ref_log_probs=True and no ref_model (full fine-tuning) the reference "
                "is released once its values are computed, and the policy is its own reference only before "
                "the first step. Pass this dataset as eval_dataset when building the trainer, pass a "
                "ref_model, or set precompute_ref_log_probs=False."
            )
    with reference_scorer(trainer) as score:
        values = compute_reference_column(trainer, dataset, "evaluate", score)
    return dataset.add_column("ref_logps", values.tolist())
