"""Preference pairs from a policy's own samples: the data step of iterative (on-policy) DPO.

`on_policy_pairs` samples ``n`` responses per prompt from a policy (`sample_responses`), scores them with
any scorer (``score(prompts, responses) -> list[float]``: `RewardModelJudge`, `VaderScorer`, `RuleJudge`,
...) and pairs them by a rule (`select_pairs`); the rows are the library's standard format and train
`DPOTrainer` as they are. Repeating it with the newest policy is iterative DPO (Xiong et al. 2024,
"Iterative Preference Learning from Human Feedback", arXiv 2312.11456).

The work is done in chunks of prompts. Under ``accelerate launch`` / ``torchrun`` every process calls it
with the same arguments: each chunk's sampling is split across the processes, the main process scores it,
and every process gets the pairs one process gets at the same seed. With a ``cache_dir`` each finished
chunk is written to disk at once, so an interrupted or repeated call samples only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .best_of_n import Scorer, check_rule, select_pairs
from .sample_cache import (
    chunk_path,
    policy_fingerprint,
    read_chunk,
    scorer_fingerprint,
    settings_key,
    write_chunk,
    write_json,
)
from .sampling import sample_responses

logger = logging.getLogger(__name__)

COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
    "prompt_index",
    "chosen_index",
    "rejected_index",
)


@dataclasses.dataclass
class OnPolicyPairs:
    """What `on_policy_pairs` made.

    ``rows``: the pairs, each ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score",
    "prompt_index", "chosen_index", "rejected_index"}`` (indices: the prompt's position in the prompts
    given, the samples' numbers within it). ``samples[i]`` / ``scores[i]``: the ``n`` responses to prompt
    ``i`` and their scores, in sampling order. The counts: ``prompts``, ``samples`` (responses scored),
    ``pairs``, and the candidate pairs dropped: ``ties`` (equal scores; under ``"best_worst"`` a prompt
    whose samples all score alike), ``below_margin`` (scores differ by less than ``margin``) and
    ``identical`` (the same text scored differently, e.g. by a noisy judge: a pair that teaches nothing);
    ``prompts_without_pair``; ``sampled_prompts`` / ``cached_prompts``: prompts sampled by this call and
    read from ``cache_dir``. ``key``: the fingerprint of the settings the cache is kept under.
    """

    rows: list[dict]
    samples: list[list[str]]
    scores: list[list[float]]
    rule: str
    margin: float
    prompts: int
    pairs: int
    ties: int
    below_margin: int
    identical: int
    prompts_without_pair: int
    sampled_prompts: int = 0
    cached_prompts: int = 0
    key: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """The counts as a dict (for a log line or a summary file)."""
        counts = dict(prompts=self.prompts, samples=sum(len(responses) for responses in self.samples))
        for name in ("pairs", "ties", "below_margin", "identical", "prompts_without_pair"):
            counts[name] = getattr(self, name)
        counts.update(sampled_prompts=self.sampled_prompts, cached_prompts=self.cached_prompts)
        return counts

    def dataset(self):
        """The rows as a `datasets.Dataset` (the columns of ``COLUMNS``, also when there is no pair)."""
        import datasets

        if self.rows:
            return datasets.Dataset.from_list(self.rows)
        types = {"prompt": "string", "chosen": "string", "rejected": "string"}
        types.update(chosen_score="float64", rejected_score="float64")
        features = datasets.Features({name: datasets.Value(types.get(name, "int64")) for name in COLUMNS})
        return datasets.Dataset.from_dict({name: [] for name in COLUMNS}, features=features)


def on_policy_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    scorer: Scorer,
    *,
    n: int = 4,
    rule: str = "best_worst",
    margin: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    chunk_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    scorer_key: str | None = None,
    across_processes: bool | None = None,
    disable_progress: bool = False,
) -> OnPolicyPairs:
    """Sample ``n`` responses per prompt from ``model``, score them with ``scorer``, and pair them by ``rule``.

    The rule (`select_pairs`): ``"best_worst"``, each prompt's highest- against its lowest-scoring sample
    when they differ by at least ``margin`` (Xiong et al. 2024, "Iterative Preference Learning from Human
    Feedback", arXiv 2312.11456); or ``"margin"`` (alias ``"all"``), every pair whose scores differ by at
    least ``margin`` (Rafailov et al. 2023, arXiv 2305.18290, App. C.1: all N(N-1)/2 pairs, at
    ``margin=0``). Equal scores are ties and give no pair; among equal maxima (minima) the first sampled
    wins; rows come in prompt order, then in sampling order. Returns an `OnPolicyPairs`: the rows (the
    standard format plus the scores; ``.dataset()`` for a `datasets.Dataset`), all samples and scores, and
    the counts of prompts, samples, pairs and dropped ties.

    Sampling: `sample_responses` at ``temperature`` / ``top_p`` / ``max_new_tokens`` / ``batch_size``,
    prompts taken ``chunk_size`` at a time. The chunk of prompts starting at position ``start`` is sampled
    with ``seed`` when ``start == 0`` (so a call of one chunk samples what
    ``sample_and_score(..., seed=seed)`` samples) and otherwise with a seed hashed from ``(seed, start)``.
    So the samples depend on the prompts, the settings, ``seed`` and ``chunk_size``, not on the batch size
    (up to float rounding) nor on the number of processes. The scorer is called once per chunk, with each
    prompt repeated ``n`` times alongside its samples; a wrong number of scores or a non-finite score is a
    `ValueError` naming the prompt and the sample.

    Several processes (``across_processes``; ``None``: when ``torch.distributed`` is initialized or
    ``WORLD_SIZE`` > 1): every process calls this with the same arguments. Each chunk's sampling is split
    across them (`sample_responses`); the main process alone calls the scorer, on the whole chunk, and
    sends the scores to the others, so every process gets exactly the pairs one process gets (the same
    scorer call, even for a non-deterministic judge, and a remote judge is asked once). The scorer must
    therefore work on the main process alone (not be sharded across the processes).

    Resuming (``cache_dir``): each chunk's prompts, samples and scores are written, by the main process
    only and atomically (temporary file, then ``os.replace``), to ``cache_dir/<key>/chunk-<start>-*.json``
    as soon as they are scored. A later call with the
    same settings reads those chunks (the main process reads and sends them to the others) and samples
    only the rest. ``key`` hashes everything the samples and scores depend on: the policy's weights
    (adapter weights included) and config, the tokenizer, ``n``, ``temperature``, ``top_p``,
    ``max_new_tokens``, ``seed`` and the scorer (its type and settings, a model's weights, a rule's source;
    or ``scorer_key`` when given: pass one when the scorer's identity is not in its attributes, e.g. it
    reads a file). ``rule`` and ``margin`` are not in it: pairs are rebuilt from the cached scores.

    Progress: a tqdm bar over the prompts (main process; ``disable_progress`` hides it), and INFO log
    lines per chunk and at the end (logger ``dpo_trainer.evaluation.onpolicy``). Example::

        from dpo_trainer import DPOTrainer
        from dpo_trainer.evaluation import VaderScorer, on_policy_pairs

        made = on_policy_pairs(policy, tokenizer, prompts, VaderScorer(), n=4, rule="margin",
                               cache_dir="run/round1/samples")
        print(made.counts)  # {'prompts': ..., 'pairs': ..., 'ties': ..., ...}
        trainer = DPOTrainer(policy, args=config, train_dataset=made.dataset(), processing_class=tokenizer)
    """
    rule, prompts = _check_arguments(rule, margin, prompts, n, chunk_size, scorer)
    process_index, is_main, distributed = _processes(across_processes)
    key = run_dir = None
    if cache_dir is not None:
        scorer_id = scorer_key if scorer_key is not None else scorer_fingerprint(scorer)
        key, run_dir = _open_cache(
            cache_dir, is_main, policy=policy_fingerprint(model, tokenizer), scorer=scorer_id, n=n,
            temperature=float(temperature), top_p=float(top_p), max_new_tokens=max_new_tokens, seed=seed,
        )  # fmt: skip
    sampling = dict(
        temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, top_p=top_p
    )

    samples: list[list[str]] = []
    scores: list[list[float]] = []
    sampled = cached = 0
    starts = range(0, len(prompts), chunk_size)
    hidden = disable_progress or not is_main
    with tqdm(total=len(prompts), desc="On-policy pairs", unit="prompt", disable=hidden) as bar:
        for number, start in enumerate(starts):
            chunk = prompts[start : start + chunk_size]
            found = _cached_chunk(run_dir, key, start, chunk, n, is_main, distributed)
            if found is not None:
                chunk_samples, chunk_scores = found
                cached += len(chunk)
            else:
                chunk_samples = sample_responses(
                    model, tokenizer, chunk, num_samples=n, seed=_chunk_seed(seed, start),
                    disable_progress=True, across_processes=distributed, **sampling,
                )  # fmt: skip
                chunk_scores = _score_on_main(scorer, chunk, chunk_samples, start, n, is_main, distributed)
                if run_dir is not None and is_main:
                    write_chunk(run_dir, key, start, chunk, chunk_samples, chunk_scores)
                sampled += len(chunk)
            samples.extend(chunk_samples)
            scores.extend(chunk_scores)
            bar.update(len(chunk))
            if is_main:
                how = "read from the cache" if found is not None else "sampled and scored"
                span = f"prompts {start}-{start + len(chunk) - 1}"
                logger.info("on-policy pairs: chunk %d/%d (%s) %s", number + 1, len(starts), span, how)

    rows, counts = select_pairs(prompts, samples, scores, rule=rule, margin=margin)
    made = OnPolicyPairs(
        rows=rows, samples=samples, scores=scores, rule=rule, margin=float(margin), prompts=len(prompts),
        sampled_prompts=sampled, cached_prompts=cached, key=key, **counts,
    )  # fmt: skip
    if is_main:
        logger.info("on-policy pairs (%s, process %d): %s", rule, process_index, made.counts)
    return made


# ---------------------------------------------------------------- checks


def _check_arguments(rule, margin, prompts, n, chunk_size, scorer) -> tuple[str, list[str]]:
    """The rule's canonical name and the prompts as a list; a bad argument raises naming it."""
    rule = check_rule(rule, margin)
    prompts = _check_prompts(prompts)
    if n < 2:
        raise ValueError(f"n must be >= 2 to make a pair, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(f"scorer must have a score(prompts, responses) method, got {type(scorer).__name__}")
    return rule, prompts


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: there is nothing to sample")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
    return prompts


def _checked_scores(raw, chunk: list[str], n: int, start: int) -> list[list[float]]:
    """The scorer's flat output as ``n`` floats per prompt; errors name the prompt and the sample."""
    raw = list(raw)
    if len(raw) != len(chunk) * n:
        raise ValueError(
            f"the scorer returned {len(raw)} scores for {len(chunk) * n} responses "
            f"({len(chunk)} prompts from prompt {start}, {n} samples each)"
        )
    flat = []
    for position, value in enumerate(raw):
        index, number = start + position // n, position % n
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"the scorer returned {value!r}, not a number, for sample {number} of prompt {index} "
                f"({_excerpt(chunk[position // n])})"
            ) from None
        if not math.isfinite(value):
            raise ValueError(
                f"the scorer returned {value} for sample {number} of prompt {index} "
                f"({_excerpt(chunk[position // n])}); scores must be finite"
            )
        flat.append(value)
    return [flat[i : i + n] for i in range(0, len(flat), n)]


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------- scoring and processes


def _processes(across_processes: bool | None) -> tuple[int, bool, bool]:
    """(this process's index, whether it is the main one, whether the work is split across processes).

    ``None``: split when ``torch.distributed`` is initialized with several processes or ``WORLD_SIZE`` > 1
    (a launcher's variable; accelerate's ``PartialState`` then joins the run)."""
    if across_processes is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            across_processes = torch.distributed.get_world_size() > 1
        else:
            across_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not across_processes:
        return 0, True, False
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.is_main_process, state.num_processes > 1


def _open_cache(cache_dir, is_main: bool, **settings) -> tuple[str, str]:
    """``(key, folder)`` of the cache for ``settings``; the main process makes the folder and writes the
    settings there (``settings.json``), for whoever wonders what a folder holds."""
    key = settings_key(settings)
    run_dir = os.path.join(os.fspath(cache_dir), key)
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "settings.json"), settings)
    return key, run_dir


def _cached_chunk(run_dir, key, start, chunk, n, is_main, distributed):
    """``(samples, scores)`` of the chunk from the cache, else None: read by the main process and sent to
    the others, so that every process makes the same choice even where only the main one sees the files."""
    if run_dir is None:
        return None
    found = read_chunk(chunk_path(run_dir, start, chunk), key, start, chunk, n) if is_main else None
    return _broadcast(found) if distributed else found


def _broadcast(value):
    """The main process's ``value`` on every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _score_on_main(scorer, chunk, chunk_samples, start, n, is_main, distributed) -> list[list[float]]:
    """The chunk's scores, computed by the main process and sent to every process. A failure on the main
    process reaches every process (the others would otherwise wait for scores that never come)."""

    def score() -> list[list[float]]:
        flat_prompts = [prompt for prompt in chunk for _ in range(n)]
        flat_samples = [response for responses in chunk_samples for response in responses]
        return _checked_scores(scorer.score(flat_prompts, flat_samples), chunk, n, start)

    if not distributed:
        return score()
    message = None
    if is_main:
        try:
            message = ("scores", score())
        except Exception as error:
            _broadcast(("error", f"{type(error).__name__}: {error}"))
            raise
    kind, value = _broadcast(message)
    if kind == "error":
        raise RuntimeError(f"the scorer failed on the main process: {value}")
    return value


def _chunk_seed(seed: int, start: int) -> int:
    """``seed`` for the first chunk; for the chunk starting at prompt ``start`` a 63-bit hash of both, so
    that its prompts do not draw the noise of the first chunk's prompts at the same positions."""
    if start == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:chunk:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
