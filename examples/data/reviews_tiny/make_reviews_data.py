"""Generate reviews_tiny: short film reviews in the IMDb data set's format, written for this project.

    python examples/data/reviews_tiny/make_reviews_data.py --out examples/data/reviews_tiny \\
        --train 2000 --test 200 --seed 0

Each JSONL row is ``{"text": review, "label": 1 | 0}`` (positive / negative), the columns of the hub's
``imdb`` data set. A review opens with a neutral sentence about an invented film (so a 2-8 word prefix
says little about the sentiment), then gives one or two judgements of its acting, story, music and so
on, and often a closing verdict; a quarter of the reviews add a judgement of the other sentiment
("..., but the ending is clumsy."). Every film title, phrase and template is made up here; no review
text comes from IMDb or any other source.

Standard library only; the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TITLES = (
    "The Glass Orchard", "Night Ferry", "Paper Kingdoms", "The Last Lighthouse", "Copper Summer",
    "A House of Kites", "The Salt Road", "Midnight Atlas", "The Quiet Harbor", "Winter Orchestra",
    "The Iron Garden", "Blue Lanterns", "Small Hours", "The Clockmaker's Son", "River of Mirrors",
    "Distant Thunder", "The Velvet Circus", "Northbound", "The Amber Room", "Seven Bridges",
)  # fmt: skip
GENRES = ("drama", "comedy", "thriller", "western", "romance", "mystery", "war film", "family film")
PREMISES = (
    "a retired sailor", "two sisters who run a bakery", "a young detective", "a travelling band",
    "a family on a long road trip", "an old teacher and her student", "a small town during a flood",
    "a chess player in Vienna", "a pilot lost over the desert", "three friends who open a cafe",
)  # fmt: skip
OPENERS = (
    "I watched {title} last night with my brother.",
    "My friends and I saw {title} on Friday.",
    "{title} is a {genre} about {premise}.",
    "I went into {title} knowing nothing about it.",
    "This {genre} follows {premise}.",
    "We rented {title} for a quiet evening at home.",
    "I finally caught {title} at the local cinema.",
    "{title} tells the story of {premise}.",
)
ASPECTS = (
    "acting", "story", "music", "camera work", "dialogue", "ending", "cast", "script", "pacing",
    "lead actress", "soundtrack", "direction",
)  # fmt: skip
POSITIVE = (
    "wonderful", "superb", "brilliant", "beautiful", "moving", "excellent", "delightful", "charming",
    "great", "fantastic", "lovely", "touching",
)  # fmt: skip
NEGATIVE = (
    "awful", "dull", "terrible", "boring", "clumsy", "weak", "painful", "horrible", "bad", "stupid",
    "lazy", "annoying",
)  # fmt: skip
INTENSIFIERS = ("", "", "", "really ", "truly ", "very ")
JUDGEMENTS = (
    "The {aspect} is {adj}.",
    "The {aspect} was {intensifier}{adj}.",
    "I thought the {aspect} was {adj}.",
    "The {aspect} is {adj} and the {aspect2} is {adj2}.",
    "Honestly, the {aspect} felt {intensifier}{adj}.",
)
CONTRASTS = (", but the {aspect} is {adj}.", ", although the {aspect} was {adj}.")
VERDICTS = {
    1: (
        "I loved it.", "Highly recommended.", "A joy to watch.", "I would happily see it again.",
        "One of the best films this year.", "Go and see it.",
    ),
    0: (
        "I hated it.", "A waste of time.", "Avoid this one.", "I almost walked out.",
        "One of the worst films this year.", "Not worth the ticket.",
    ),
}  # fmt: skip


def judgement(rng: random.Random, label: int) -> str:
    words = POSITIVE if label else NEGATIVE
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    return rng.choice(JUDGEMENTS).format(
        aspect=aspect,
        aspect2=aspect2,
        adj=rng.choice(words),
        adj2=rng.choice(words),
        intensifier=rng.choice(INTENSIFIERS),
    )


def review(rng: random.Random, label: int) -> str:
    sentences = [
        rng.choice(OPENERS).format(
            title=rng.choice(TITLES), genre=rng.choice(GENRES), premise=rng.choice(PREMISES)
        )
    ]
    for _ in range(rng.choice((1, 1, 2))):
        sentence = judgement(rng, label)
        if rng.random() < 0.25:  # a judgement of the other sentiment, joined with "but"
            other = NEGATIVE if label else POSITIVE
            contrast = rng.choice(CONTRASTS).format(aspect=rng.choice(ASPECTS), adj=rng.choice(other))
            sentence = sentence[:-1] + contrast
        sentences.append(sentence)
    if rng.random() < 0.6:
        sentences.append(rng.choice(VERDICTS[label]))
    return " ".join(sentences)


def make_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append({"text": review(rng, label), "label": label})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
            for row in make_rows(n, rng):
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
