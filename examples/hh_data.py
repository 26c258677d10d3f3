"""Generate hh_tiny: a small preference dataset in the raw Anthropic-HH format, written for this project.

    python examples/hh_data.py --out examples/data/hh_tiny --train 2000 --test 200 --seed 0

Each JSONL row is ``{"chosen": transcript, "rejected": transcript}`` with transcripts
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. Both share everything up to the last ``"\\n\\nAssistant:"``
(earlier turns of multi-turn rows included) and differ only in the final reply. As in Anthropic HH, both
replies come from one assistant and the better one is marked chosen: each reply is drawn from
``REPLY_MIX`` (a helpful, on-topic answer from a small knowledge base, a polite but vague reply, a
helpful answer about another topic, an evasive or a rude reply) and ``rule_score`` picks the chosen one, so a chosen reply is not
always a good one (two poor replies make a poor chosen one). ``examples/hh.py``'s rule judge is
``rule_score`` from here (``from hh_data import rule_score``, in ``examples/hh_judges.py``).

Standard library only; the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# topic -> question templates that fit its items, (item, concrete answer, short answer) triples, and tips:
# the knowledge base the helpful replies draw on, kept as data beside this file.
KNOWLEDGE_FILE = Path(__file__).resolve().parent / "data" / "hh_knowledge.json"


def _tuples(value):
    """JSON lists back to the tuples the generator was written with."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return value


TOPICS: dict[str, dict[str, tuple]] = _tuples(json.loads(KNOWLEDGE_FILE.read_text(encoding="utf-8")))

# Shared wording; none of these words count as topic keywords.
GENERIC_QUESTIONS = (
    "Can you give me some advice about {item}?",
    "What do you recommend for {item}?",
    "I have a question about {item}. What should I do?",
    "Could you help me with {item}?",
)
PREAMBLES = (
    "I'm a complete beginner.",
    "My friend told me it's easy but I'm not so sure.",
    "I tried once last month and it went badly.",
    "I have some free time this weekend and want to do it properly.",
    "I've searched online and I'm confused by all the different opinions.",
    "Quick question.",
    "This might be a silly question, but here goes.",
    "I want to surprise my family, so I need to get it right the first time.",
)
CLOSERS = (
    "Thanks!",
    "Please keep it short.",
    "Thanks in advance for your help.",
    "I'd appreciate a clear answer.",
)
OPENERS = ("Sure!", "Good question.", "Happy to help.", "Here's what works well:", "Of course.")

EVASIVE_REPLIES = (
    "I don't know, figure it out yourself.",
    "No idea. Look it up somewhere.",
    "I can't help with that. Ask someone else.",
    "Hmm, I don't know. There are so many opinions out there and it depends on so many things that I really can't say. Figure it out yourself.",
    "Not my problem, honestly. Look it up.",
    "Whatever works for you, I guess. I don't know.",
)
# Polite and on topic, but with nothing the asker can act on: the generic reply a weak assistant falls back on.
VAGUE_REPLIES = (
    "Good question. {Item} takes some practice, so start small and be patient with yourself.",
    "Sure! There are many ways to approach {item}, and with a little patience you will get there.",
    "Happy to help. {Item} is easier than it looks once you get started, so just give it a try.",
    "Of course. Everyone handles {item} a bit differently, so try a few things and see what suits you.",
)
RUDE_REPLIES = (
    "That's a stupid question.",
    "Ugh, {item}? Even a child knows that. Stop wasting my time.",
    "Seriously? What a dumb thing to ask. Go away.",
    "You clearly haven't tried at all. {Item} is obviously easy and asking me is pathetic.",
    "Only an idiot would need help with {item}. Leave me alone.",
    "Why would I waste my time on your {item} question? It's ridiculous.",
)

# Phrases the rule penalises (matched on lower-cased text with straight apostrophes).
EVASIVE_PHRASES = (
    "don't know",
    "figure it out",
    "no idea",
    "look it up",
    "ask someone else",
    "can't help",
    "not my problem",
    "whatever",
    "can't say",
)
RUDE_PHRASES = (
    "stupid",
    "dumb",
    "idiot",
    "pathetic",
    "go away",
    "leave me alone",
    "wasting my time",
    "waste my time",
    "ridiculous",
    "even a child",
    "obviously",
)
PHRASE_PENALTY = 3.0
MAX_PROMPT_WORDS = 60

_COMMON_WORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from as is are was were be been it its
    this that these those you your i me my we our they their he she his her them do does did how what
    which who when where why can could should would will into over under up down out off about than so
    not no each every any some all more most much very just only also too one two three four five per
    six again against along another around automatically available bad because becomes begin bring call
    choose closed compare completely contact correct count create deal default delete drop during easier
    end everything expected explain explains extra feel feels find finish fixed follow form going great
    half hand has head helps home inside issue large late learn left length limit lots love lower makes
    making matter mix months move moving names needs never number order other outside own person
    possible put quarter questions raise ready report room search second secret see several shift show
    simple sit smaller soon space spot starting stays still store strong such taking tell thin through
    together tool top track true turn type using wait whether whole within without working world""".split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9][a-z0-9'/.-]*[a-z0-9]|[a-z0-9]", text.lower())


def _topic_text(spec: dict) -> str:
    pieces = list(spec["questions"]) + list(spec["tips"])
    for entry in spec["items"]:
        pieces += entry
    return " ".join(pieces).replace("{item}", " ")


def _keywords() -> dict[str, frozenset[str]]:
    """Words that appear in one topic's text and in no other topic's text or shared wording."""
    generic = (
        GENERIC_QUESTIONS + PREAMBLES + CLOSERS + OPENERS + EVASIVE_REPLIES + RUDE_REPLIES + VAGUE_REPLIES
    )
    shared = set(_words(" ".join(generic).replace("{item}", " ").replace("{Item}", " "))) | _COMMON_WORDS
    vocab = {name: set(_words(_topic_text(spec) + " " + name)) for name, spec in TOPICS.items()}
    keywords = {}
    for name, words in vocab.items():
        others = set().union(*(v for other, v in vocab.items() if other != name))
        keywords[name] = frozenset(w for w in words - others - shared if len(w) > 2 and not w.isdigit())
    return keywords


TOPIC_KEYWORDS: dict[str, frozenset[str]] = _keywords()


def _last_human_turn(prompt: str) -> str:
    text = prompt.rsplit("\n\nHuman:", 1)[-1]
    return text.split("\n\nAssistant:", 1)[0]


def prompt_topic(prompt: str) -> str | None:
    """The topic whose keywords appear most often in the prompt's last Human turn (None if no keyword)."""
    words = _words(_last_human_turn(prompt))
    hits = {name: sum(w in keywords for w in words) for name, keywords in TOPIC_KEYWORDS.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] > 0 else None


def rule_score(prompt: str, response: str) -> float:
    """Score a reply to an HH-style prompt; higher is better.

    score = (distinct keywords of the prompt's topic in the reply)
          - (distinct keywords of every other topic in the reply)
          - 3 * (evasive or rude phrases in the reply)

    The prompt's topic is read from its last Human turn (see ``prompt_topic``); with no recognisable
    topic every keyword counts as off-topic.
    """
    topic = prompt_topic(prompt)
    words = set(_words(response))
    on_topic = len(words & TOPIC_KEYWORDS[topic]) if topic else 0
    off_topic = sum(len(words & keywords) for name, keywords in TOPIC_KEYWORDS.items() if name != topic)
    text = response.lower().replace("\u2019", "'")
    phrases = sum(text.count(p) for p in EVASIVE_PHRASES + RUDE_PHRASES)
    return float(on_topic - off_topic - PHRASE_PENALTY * phrases)


def _question(rng: random.Random, topic: str, item: str) -> str:
    templates = TOPICS[topic]["questions"] + GENERIC_QUESTIONS
    parts = [rng.choice(PREAMBLES)] if rng.random() < 0.5 else []
    if rng.random() < 0.2:
        parts.append(rng.choice(PREAMBLES))
    parts.append(rng.choice(templates).format(item=item))
    if rng.random() < 0.3:
        parts.append(rng.choice(CLOSERS))
    return " ".join(dict.fromkeys(parts))  # dict keeps order and drops a repeated preamble


def _helpful(rng: random.Random, topic: str, entry: tuple[str, str, str]) -> str:
    """A short answer, or an optional opener + the full answer + up to two of the topic's tips."""
    _, answer, short_answer = entry
    if rng.random() < 0.25:
        return short_answer
    parts = [rng.choice(OPENERS)] if rng.random() < 0.5 else []
    parts.append(answer)
    tips = list(TOPICS[topic]["tips"])
    rng.shuffle(tips)
    parts += tips[: rng.choice((0, 0, 1, 2))]
    return " ".join(parts)


# How the assistant that wrote both replies of a row behaves: HH's two replies come from the same model,
# and the human marks the better one, so the chosen reply is itself often flawed. Here each reply is
# drawn from this mix, and the rule picks the better one as chosen.
REPLY_MIX = {"helpful": 0.4, "vague": 0.35, "off_topic": 0.05, "evasive": 0.1, "rude": 0.1}


def _reply(rng: random.Random, topic: str, entry: tuple[str, str, str]) -> str:
    """One reply of the assistant: helpful, vague, a helpful answer about another topic, evasive or rude."""
    kind = rng.choices(list(REPLY_MIX), weights=list(REPLY_MIX.values()))[0]
    if kind == "helpful":
        return _helpful(rng, topic, entry)
    if kind == "vague":
        return rng.choice(VAGUE_REPLIES).format(item=entry[0], Item=entry[0][0].upper() + entry[0][1:])
    if kind == "off_topic":
        other = rng.choice([name for name in TOPICS if name != topic])
        return _helpful(rng, other, rng.choice(TOPICS[other]["items"]))
    item = entry[0]
    pool = EVASIVE_REPLIES if kind == "evasive" else RUDE_REPLIES
    replies = rng.sample(pool, 2) if rng.random() < 0.4 else [rng.choice(pool)]
    return " ".join(replies).format(item=item, Item=item[0].upper() + item[1:])


def _row(rng: random.Random, question: str, topic: str, entry: tuple[str, str, str]) -> dict[str, str]:
    prompt = ""
    if rng.random() < 0.3:  # multi-turn: an earlier, already answered question shared by both replies
        earlier_topic = rng.choice(list(TOPICS))
        earlier_item, earlier_answer, _ = rng.choice(TOPICS[earlier_topic]["items"])
        earlier_question = rng.choice(TOPICS[earlier_topic]["questions"]).format(item=earlier_item)
        prompt = f"\n\nHuman: {earlier_question}\n\nAssistant: {earlier_answer}"
        if len(f"{prompt} {question}".split()) > MAX_PROMPT_WORDS:
            prompt = ""
    prompt += f"\n\nHuman: {question}\n\nAssistant:"
    # Two replies from the same assistant, the better one by the rule chosen (a tie draws the second again).
    first = _reply(rng, topic, entry)
    while True:
        second = _reply(rng, topic, entry)
        first_score, second_score = rule_score(prompt, first), rule_score(prompt, second)
        if first_score != second_score:
            break
    chosen, rejected = (first, second) if first_score > second_score else (second, first)
    return {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}


def make_rows(n_train: int, n_test: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and test rows; every final question is unique, so no test prompt appears in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n_train + n_test:
        topic = rng.choice(list(TOPICS))
        entry = rng.choice(TOPICS[topic]["items"])
        question = _question(rng, topic, entry[0])
        if question in seen:
            continue
        seen.add(question)
        rows.append(_row(rng, question, topic, entry))
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for train.jsonl and test.jsonl"
    )
    parser.add_argument("--train", type=int, default=2000, help="number of train rows")
    parser.add_argument("--test", type=int, default=200, help="number of test rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = make_rows(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)


if __name__ == "__main__":
    main()
