"""Judges that score on this machine: `RuleJudge` (a pure scoring function) and `RewardModelJudge` (a local
sequence-classification model with one output, the reward)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import transformers
from tqdm.auto import tqdm

from .base import ScoringJudge, _check_lengths


class RuleJudge(ScoringJudge):
    """A scoring judge from a pure function ``score_fn(prompt, response) -> float`` (higher is better).

    ``disable_progress`` hides the tqdm bar shown while scoring.
    """

    def __init__(self, score_fn: Callable[[str, str], float], *, disable_progress: bool = False):
        self.score_fn = score_fn
        self.disable_progress = disable_progress

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses=responses)
        pairs = tqdm(
            zip(prompts, responses), total=len(prompts), desc="rule judge", disable=self.disable_progress
        )
        return [float(self.score_fn(prompt, response)) for prompt, response in pairs]


class RewardModelJudge(ScoringJudge):
    """A reward model: a sequence-classification model with one output, read on ``prompt + response``.

    The texts are tokenized as the tokenizer does by default (special tokens included); a text longer
    than ``max_length`` tokens loses the start of its prompt (a leading BOS is kept), since the reward is
    read at the last token. Texts are scored ``batch_size`` at a time, grouped by length and padded on
    the right by the judge itself whatever ``tokenizer.padding_side`` says, so a score does not depend
    on the batch it is in (up to float rounding). The padding id is the model's ``config.pad_token_id``,
    else the tokenizer's pad token, else its EOS token; when the config has none, it is set on the
    config, because the model finds each row's last token by it. The model is put in eval mode (and
    moved to ``device`` if given) and runs without gradient. ``disable_progress`` hides the tqdm bar.
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int = 512,
        device: str | torch.device | None = None,
        disable_progress: bool = False,
    ):
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"a reward model has one output (num_labels=1), this one has {model.config.num_labels}"
            )
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        pad_id = model.config.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_id is None:
                raise ValueError("neither the model config nor the tokenizer has a pad or EOS token id")
            model.config.pad_token_id = pad_id
        if device is not None:
            model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.max_length = max_length
        self.disable_progress = disable_progress

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        batch_size: int = 16,
        max_length: int = 512,
        device: str | torch.device | None = None,
        disable_progress: bool = False,
        tokenizer_kwargs: dict | None = None,
        **model_kwargs,
    ) -> RewardModelJudge:
        """Load the model (``model_kwargs``, e.g. ``dtype``) and tokenizer from a folder or the Hub."""
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path_or_id, **model_kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path_or_id, **(tokenizer_kwargs or {}))
        return cls(
            model,
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            disable_progress=disable_progress,
        )

    def _token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) <= self.max_length:
            return ids
        bos_id = self.tokenizer.bos_token_id
        if bos_id is not None and ids[0] == bos_id:
            return ids[:1] + ids[len(ids) - self.max_length + 1 :]
        return ids[len(ids) - self.max_length :]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses=responses)
        ids = [self._token_ids(prompt + response) for prompt, response in zip(prompts, responses)]
        for row, row_ids in enumerate(ids):
            if not row_ids:
                raise ValueError(f"row {row}: prompt + response is empty, there is no token to score")
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        scores = [0.0] * len(ids)
        with tqdm(total=len(ids), desc="reward model", disable=self.disable_progress) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, i in enumerate(rows):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    attention_mask[row, : len(ids[i])] = 1
                logits = self.model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                ).logits
                for i, value in zip(rows, logits[:, 0].float().tolist()):
                    scores[i] = value
                bar.update(len(rows))
        return scores
