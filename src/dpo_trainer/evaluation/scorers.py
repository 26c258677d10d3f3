"""Ground-truth rewards for the controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1, App. C.1).

Each scorer is a `ScoringJudge`: ``score(prompts, responses) -> list[float]``, higher is better, the
interface `RewardModelJudge`, `best_of_n` and the pair labelling take. The sentiment is read on
``prompt + response`` (the whole review, as the paper's classifier reads it).

- ``VaderScorer``: VADER's compound score in [-1, 1] (Hutto and Gilbert 2014; the ``vaderSentiment``
  package, a lexicon and rules, so it runs offline).
- ``ClassifierScorer``: one class of a sequence-classification model, its probability or its logit;
  the paper's ground truth is ``siebert/sentiment-roberta-large-english``'s POSITIVE class.

``make_scorer("vader")`` or ``make_scorer(path_or_hub_id)`` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from .judges.base import ScoringJudge, _check_lengths
from .judges.local import RewardModelJudge

CLASSIFIER_OUTPUTS = ("probability", "logit")


class VaderScorer(ScoringJudge):
    """VADER's compound sentiment of ``prompt + response`` (``on="text"``) or of the response alone
    (``on="response"``), in [-1, 1]; 1 is the most positive.

    >>> VaderScorer(disable_progress=True).score(["The film was"], [" wonderful."])[0] > 0.5
    True
    """

    def __init__(self, *, on: str = "text", disable_progress: bool = False):
        if on not in ("text", "response"):
            raise ValueError(f"on must be 'text' or 'response', got {on!r}")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as error:
            raise ImportError(
                "VaderScorer needs vaderSentiment: pip install vaderSentiment (or dpo_trainer[examples])"
            ) from error
        self.analyzer = SentimentIntensityAnalyzer()
        self.on = on
        self.disable_progress = disable_progress

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses=responses)
        pairs = tqdm(zip(prompts, responses), total=len(prompts), desc="vader", disable=self.disable_progress)
        return [
            float(
                self.analyzer.polarity_scores(prompt + response if self.on == "text" else response)[
                    "compound"
                ]
            )
            for prompt, response in pairs
        ]


class _ClassColumn(nn.Module):
    """A classifier seen as a one-output reward model: its forward returns ``.logits`` of shape (rows, 1),
    the chosen class's probability (softmax over classes) or raw logit."""

    def __init__(self, model: nn.Module, index: int, output: str):
        super().__init__()
        self.classifier = model
        self.index = index
        self.output = output
        self.config = SimpleNamespace(num_labels=1, pad_token_id=model.config.pad_token_id)

    def forward(self, **inputs):
        logits = self.classifier(**inputs).logits.float()  # (rows, classes)
        column = (
            logits.softmax(dim=-1)[:, self.index] if self.output == "probability" else logits[:, self.index]
        )
        return SimpleNamespace(logits=column[:, None])


class ClassifierScorer(RewardModelJudge):
    """One class of a sequence-classification model as the reward: its softmax probability
    (``output="probability"``, in [0, 1]) or its logit (``output="logit"``).

    ``label`` names the class (matched case-insensitively against ``config.id2label``, default
    "positive") or gives its index. Texts are tokenized, truncated, batched and padded as
    `RewardModelJudge` does.
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        label: str | int = "positive",
        output: str = "probability",
        batch_size: int = 16,
        max_length: int = 512,
        device: str | torch.device | None = None,
        disable_progress: bool = False,
    ):
        if output not in CLASSIFIER_OUTPUTS:
            raise ValueError(f"output must be one of {CLASSIFIER_OUTPUTS}, got {output!r}")
        self.label_index = class_index(model.config, label)
        super().__init__(
            _ClassColumn(model, self.label_index, output),
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            disable_progress=disable_progress,
        )
        # the classifier finds each row's last token by its own config's pad id (GPT-2-style heads)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_id

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, label: str | int = "positive", output: str = "probability",
                        tokenizer_kwargs: dict | None = None, **kwargs) -> ClassifierScorer:  # fmt: skip
        """Load the classifier and its tokenizer from a folder or the Hub; ``kwargs`` as in ``__init__``
        and, beyond those, to ``from_pretrained`` (e.g. ``dtype``)."""
        own = {
            k: kwargs.pop(k)
            for k in ("batch_size", "max_length", "device", "disable_progress")
            if k in kwargs
        }
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path_or_id, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path_or_id, **(tokenizer_kwargs or {}))
        return cls(model, tokenizer, label=label, output=output, **own)


def class_index(config, label: str | int) -> int:
    """The index of class ``label`` (a name, case-insensitive, or an index) in a classifier's config."""
    num_labels = config.num_labels
    if isinstance(label, int):
        if not 0 <= label < num_labels:
            raise ValueError(
                f"label index {label} is out of range for a classifier with {num_labels} classes"
            )
        return label
    names = {str(name).lower(): int(index) for index, name in config.id2label.items()}
    if label.lower() not in names:
        raise ValueError(
            f"the classifier has no class named {label!r}; its classes are {sorted(config.id2label.values())} "
            "(pass the name or the index as label)"
        )
    return names[label.lower()]


def make_scorer(name_or_path: str, *, label: str | int = "positive", output: str = "probability", **kwargs):
    """``"vader"``: `VaderScorer`; otherwise a sequence-classification model (folder or hub id): one
    output is read as a reward (`RewardModelJudge`), several through ``label`` (`ClassifierScorer`)."""
    if name_or_path.lower() == "vader":
        return VaderScorer(disable_progress=kwargs.get("disable_progress", False))
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    if config.num_labels == 1:
        return RewardModelJudge.from_pretrained(name_or_path, **kwargs)
    return ClassifierScorer.from_pretrained(name_or_path, label=label, output=output, **kwargs)
