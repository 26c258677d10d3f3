"""The reference model π_ref: one helper for training, evaluation and precomputation, and the on-disk cache.

Strategies, chosen by `DPOTrainer` (see its docstring):
  * a separate frozen model (`ref_model` given, or a frozen copy of the policy for full fine-tuning);
  * the policy itself with its PEFT adapter disabled (one copy of the base weights);
  * log-probs precomputed once before training and read from the batch (`ref_logps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .guards import NonFiniteError, reference_problem
from .logprobs import sequence_logps
from .models import disable_dropout, freeze, is_peft_model, unwrap, unwrap_to_peft

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the key covers the model config and the tokenizer
# config fields that name or place a model without changing what it computes
_UNHASHED_CONFIG_KEYS = (
    "_name_or_path",
    "transformers_version",
    "_commit_hash",
    "use_cache",
    "architectures",
)
# A cache temporary of a writer on another machine (whose process cannot be looked up) this old was left by a
# killed process; one of a writer on this machine is removed as soon as that process is gone.
STALE_TEMPORARY_S = 3600
# safetensors metadata field holding the key a cache file was written under (its name, less ".safetensors")
CACHE_KEY_FIELD = "dpo_trainer_cache_key"


@contextlib.contextmanager
def _adapter_disabled_eval(policy: nn.Module):
    """The policy's base weights in eval mode: adapters off and dropout off, restored on exit."""
    peft_model = unwrap_to_peft(policy)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


@contextlib.contextmanager
def _reference_adapter_eval(policy: nn.Module, reference_adapter: str):
    """The policy's frozen reference adapter active, in eval mode (TR-DPO with PEFT, `callbacks.REFERENCE_ADAPTER`).

    On exit the adapter that was active is active again, every parameter has its `requires_grad` back (peft's
    `set_adapter` makes the adapter it activates trainable and the others frozen) and the training mode is
    restored.
    """
    peft_model = unwrap_to_peft(policy)
    active, was_training = peft_model.active_adapter, peft_model.training
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]
    peft_model.eval()
    try:
        peft_model.set_adapter(reference_adapter)
        yield
    finally:
        peft_model.set_adapter(active)
        for param, flag in flags:
            param.requires_grad_(flag)
        peft_model.train(was_training)


def reference_logps(
    policy: nn.Module,
    ref_model: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reference log-probs of every response in `batch`: (B, K) float32, no gradient.

    Uses `batch["ref_logps"]` when the batch carries precomputed values, else `ref_model`, else (a PEFT
    policy) the policy's reference adapter `callbacks.REFERENCE_ADAPTER` when it has one (TR-DPO's
    `sync_ref_model`), else the policy with its adapter disabled.
    """
    if "ref_logps" in batch:
        return batch["ref_logps"].float()
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, batch, chunk_size=chunk_size)
        peft_model = unwrap_to_peft(policy)
        if not is_peft_model(peft_model):
            raise ValueError(
                "No reference: pass ref_model, train a PEFT adapter, or precompute reference log-probs."
            )
        from .callbacks import REFERENCE_ADAPTER  # callbacks imports this module

        if REFERENCE_ADAPTER in peft_model.peft_config:
            with _reference_adapter_eval(policy, REFERENCE_ADAPTER):
                return sequence_logps(policy, batch, chunk_size=chunk_size)
        with _adapter_disabled_eval(policy):
            return sequence_logps(policy, batch, chunk_size=chunk_size)


# ---------------------------------------------------------------- precomputation and its cache


def model_fingerprint(model: nn.Module, tokenizer=None) -> str:
    """A hash of the reference: its config, the tokenizer, and the weights' names, shapes, dtypes and values.

    The config counts (the same weights with another `rope_theta` or activation compute other log-probs),
    except fields that only name the model (`_UNHASHED_CONFIG_KEYS`). The tokenizer's vocabulary and
    special tokens count when `tokenizer` is given. Adapter weights (names containing `lora_`) are left
    out, except those of the frozen reference adapter (`REFERENCE_ADAPTER`, a copy of an adapter given with
    the model): the reference is the base model, plus that adapter when there is one. Values are sampled
    (4096 evenly spaced values per tensor, plus their sum), which changes whenever training touches the tensor.
    """
    digest = hashlib.sha256()
    config = getattr(unwrap(model), "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in _UNHASHED_CONFIG_KEYS}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items())
        special = sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))
        digest.update(json.dumps([type(tokenizer).__name__, vocab, special]).encode())
    from .callbacks import REFERENCE_ADAPTER

    for name, tensor in _whole_state(model):
        if "lora_" in name and REFERENCE_ADAPTER not in name.split("."):
            continue
        if (
            tensor.is_meta
        ):  # not loaded on this process (FSDP's cpu_ram_efficient_loading): rank 0's key is used
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|meta".encode())
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{flat.float().sum().item():.8e}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def _whole_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `model`'s state dict with every tensor whole on every process.

    A ZeRO-3 partition is gathered for the moment it is read, an FSDP2 DTensor assembled; both are
    collectives, so every process must walk the same model. Other tensors are yielded as they are.
    """
    module = unwrap(model)
    parameters = dict(module.named_parameters())
    for name, tensor in module.state_dict().items():
        parameter = parameters.get(name)
        if parameter is not None and hasattr(parameter, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                yield name, parameter.detach().clone()
        elif hasattr(tensor, "full_tensor"):  # torch.distributed.tensor.DTensor (FSDP2)
            yield name, tensor.full_tensor()
        else:
            yield name, tensor


def rows_fingerprint(rows: Iterable[Mapping]) -> str:
    """A hash of the tokenized rows (`prompt_ids`, `response_ids`) in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["prompt_ids"], row["response_ids"]], separators=(",", ":")).encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "dpo_trainer", "ref_logps")


def cache_path(cache_dir: str | None, model_key: str, data_key: str, settings: Mapping) -> str:
    settings_key = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:12]
    name = f"v{CACHE_FORMAT_VERSION}-{model_key}-{data_key}-{settings_key}.safetensors"
    return os.path.join(cache_dir or default_cache_dir(), name)


def cache_key(path: str) -> str:
    """The key a cache file at `path` belongs to: its name (model, data and settings keys), stored inside it."""
    name = os.path.basename(path)
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def load_cached(path: str, num_rows: int, num_responses: int | None = None) -> torch.Tensor | None:
    """The cached (num_rows, K) float32 reference log-probs at `path`, or None to compute them.

    A file that cannot be read, was written under another key than its name's (copied or renamed from another
    run's cache: the key is stored inside the file) or holds unusable values (another shape or dtype, NaN or
    inf, a log-probability above 0) is named in a warning and deleted, so that it is recomputed and rewritten.
    """
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            stored = (handle.metadata() or {}).get(CACHE_KEY_FIELD)
        values = load_file(path)["ref_logps"]
    except Exception as error:  # safetensors raises its own error types for a corrupt file
        return _discard(path, f"it cannot be read ({type(error).__name__}: {error})")
    if stored != cache_key(path):
        written = "no key (not written by this version of dpo_trainer)" if stored is None else f"key {stored}"
        return _discard(
            path, f"it holds {written}, not its name's, {cache_key(path)}: copied from another run?"
        )
    expected = (num_rows, num_responses if num_responses is not None else values.shape[-1])
    if values.dim() != 2 or tuple(values.shape) != expected:
        return _discard(path, f"it holds shape {tuple(values.shape)} where {expected} is expected")
    if values.dtype != torch.float32:
        return _discard(path, f"it holds {values.dtype} where float32 is expected")
    problem = reference_problem(values)
    if problem:
        return _discard(path, problem)
    return values


def _discard(path: str, reason: str) -> None:
    logger.warning("Reference log-prob cache %s is unusable (%s): deleting it and recomputing.", path, reason)
    with contextlib.suppress(FileNotFoundError):  # another process may have deleted it first
        os.remove(path)
    return None


def _this_machine() -> str:
    """This machine as a cache temporary's name gives it: the host name, and the PID namespace where there is
    one (two containers may share a host name and a folder, not their processes)."""
    with contextlib.suppress(OSError):
        return f"{socket.gethostname()}@{os.readlink('/proc/self/ns/pid').strip('pid:[]')}"
    return socket.gethostname()


def _temporary_name(path: str) -> str:
    return f"{path}.tmp-{_this_machine()}-{os.getpid()}"


def _process_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this machine (POSIX; elsewhere never claimed)."""
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    return False


def _dead_writer(name: str, machine: str) -> bool:
    """Whether the temporary `name` (`_temporary_name`) was written by a process of `machine` that is gone."""
    writer, _, pid = name.split(".tmp-", 1)[1].rpartition("-")
    return writer == machine and pid.isdigit() and int(pid) != os.getpid() and _process_gone(int(pid))


def cache_dir_problem(cache_dir: str) -> str | None:
    """Why reference log-probs cannot be cached in `cache_dir` (created if missing), or None.

    Also deletes temporaries that killed processes left there: at once where the writer ran on this machine
    and is gone, else once older than `STALE_TEMPORARY_S`.
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f".probe-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "wb") as handle:
            handle.write(b"0")
        os.remove(probe)
    except OSError as error:
        return f"{cache_dir} is not writable ({error})"
    now, machine = time.time(), _this_machine()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if ".tmp-" in name:
            with contextlib.suppress(OSError):
                if _dead_writer(name, machine) or now - os.path.getmtime(path) > STALE_TEMPORARY_S:
                    os.remove(path)
    return None


def save_cached(path: str, values: torch.Tensor) -> bool:
    """Write `values` to `path` atomically, with the key of its name inside (`load_cached` checks it); on
    failure warn, leave no temporary behind and return False."""
    tmp = _temporary_name(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(
            {"ref_logps": values.float().contiguous()}, tmp, metadata={CACHE_KEY_FIELD: cache_key(path)}
        )
        os.replace(tmp, path)  # never leaves a half-written cache file under the real name
        return True
    except OSError as error:
        logger.warning("Could not cache reference log-probs at %s (%s); training goes on.", path, error)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


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


# ---------------------------------------------------------------- precomputation for a trainer


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
    `engines.policy_as_reference`, never through weights that ZeRO-3 has partitioned away.
    """
    from .engines import policy_as_reference

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
    reference is already prepared (`engines.prepare_reference`), and the policy, when it is its own
    reference, is scored through `engines.policy_as_reference`.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    from .engines import release_reference

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


def build_reference(
    model: nn.Module, ref_model, args, quantization_config=None, adapter_given: bool = False
) -> nn.Module | None:
    """The frozen reference for `model`: `ref_model` loaded (a name or path) and frozen, else the cheapest
    exact one: None for a PEFT policy or when the values are precomputed from the policy, else a frozen copy
    of the policy's weights as they are now (not a reload from disk).

    A PEFT policy is its own reference: with the adapter disabled when the adapter is new (`peft_config`), or
    when `adapter_given` (a `PeftModel` passed in with its adapter) through a frozen copy of that adapter,
    added here as the adapter `REFERENCE_ADAPTER` (TRL's "ref" adapter), unless `args.peft_reference` is
    "base". Only then is π_ref the policy as given, e.g. the SFT adapter that DPO starts from.
    """
    from .engines import frozen_copy
    from .models import load_model

    if isinstance(ref_model, str):
        ref_model = load_model(ref_model, args, quantization_config)
    if ref_model is not None and ref_model is model:
        raise ValueError("ref_model must not be the policy itself; pass ref_model=None to get a frozen copy.")
    if ref_model is None and adapter_given and args.peft_reference == "copy":
        from .callbacks import add_reference_adapter

        policy_adapter = add_reference_adapter(model, "a PeftModel given with its adapter")
        logger.info(
            "The reference is a frozen copy of the given adapter %r (DPOConfig.peft_reference='copy'); "
            "peft_reference='base' uses the base model instead.",
            policy_adapter,
        )
    if ref_model is None and not is_peft_model(model) and not args.precompute_ref_log_probs:
        ref_model = frozen_copy(model)
    if ref_model is not None:
        freeze(ref_model)
        disable_dropout(ref_model)
    return ref_model
