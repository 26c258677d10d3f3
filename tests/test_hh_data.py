"""The bundled hh_tiny dataset and its generator (examples/hh_data.py)."""

import json
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "examples" / "data"
SHIPPED = DATA_DIR / "hh_tiny"
# the arguments of the command in examples/data/README.md, less --out
ARGS = ["--train", "2000", "--test", "200", "--seed", "0"]
ASSISTANT = "\n\nAssistant:"


import hh_data as gen  # noqa: E402  (examples/ is on sys.path: conftest)


def _read(name):
    with open(SHIPPED / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rows():
    return {"train": _read("train.jsonl"), "test": _read("test.jsonl")}


def _split(transcript):
    head, reply = transcript.rsplit(ASSISTANT, 1)
    return head + ASSISTANT, reply


def test_shipped_files_equal_a_fresh_generation(tmp_path):
    gen.main(["--out", str(tmp_path), *ARGS])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_row_counts_and_size(rows):
    assert len(rows["train"]) == 2000 and len(rows["test"]) == 200
    total = sum((SHIPPED / name).stat().st_size for name in ("train.jsonl", "test.jsonl"))
    assert total < 2_000_000


def test_rows_share_the_prompt_up_to_the_last_assistant_turn(rows):
    for split, split_rows in rows.items():
        for i, row in enumerate(split_rows):
            assert set(row) == {"chosen", "rejected"}, (split, i)
            assert row["chosen"].startswith("\n\nHuman: "), (split, i)
            chosen_prompt, chosen_reply = _split(row["chosen"])
            rejected_prompt, rejected_reply = _split(row["rejected"])
            assert chosen_prompt == rejected_prompt, (split, i)
            assert chosen_reply != rejected_reply, (split, i)
            assert chosen_reply.startswith(" ") and rejected_reply.startswith(" "), (split, i)
            assert chosen_prompt.count("\n\nHuman: ") == chosen_prompt.count(ASSISTANT), (split, i)


def test_lengths_and_multi_turn_mix(rows):
    all_rows = rows["train"] + rows["test"]
    prompts = [_split(row["chosen"])[0] for row in all_rows]
    prompt_words = [len(p.split()) for p in prompts]
    reply_words = [len(_split(row[key])[1].split()) for row in all_rows for key in ("chosen", "rejected")]
    assert 5 <= min(prompt_words) and max(prompt_words) <= 65
    assert 4 <= min(reply_words) and max(reply_words) <= 60
    multi_turn = sum(p.count("\n\nHuman: ") > 1 for p in prompts)
    assert 0.15 < multi_turn / len(prompts) < 0.45


def test_rule_prefers_chosen(rows):
    for split, split_rows in rows.items():
        for i, row in enumerate(split_rows):
            prompt, chosen = _split(row["chosen"])
            _, rejected = _split(row["rejected"])
            assert gen.rule_score(prompt, chosen) > gen.rule_score(prompt, rejected), (split, i)


def test_both_replies_come_from_one_assistant_so_chosen_is_sometimes_vague(rows):
    vague = {
        reply.format(item=item, Item=item[0].upper() + item[1:])
        for reply in gen.VAGUE_REPLIES
        for spec in gen.TOPICS.values()
        for item, _, _ in spec["items"]
    }
    chosen = [_split(row["chosen"])[1].strip() for row in rows["train"]]
    rejected = [_split(row["rejected"])[1].strip() for row in rows["train"]]
    share = sum(reply in vague for reply in chosen) / len(chosen)
    assert 0.15 < share < 0.35  # what the SFT model learns to say at times, and DPO to avoid
    assert sum(reply in vague for reply in rejected) / len(rejected) > 0.3
    prompt = "\n\nHuman: How do I make rice?\n\nAssistant:"
    helpful = gen.TOPICS["cooking"]["items"][0][2]
    assert (
        0
        < gen.rule_score(prompt, gen.VAGUE_REPLIES[0].format(item="rice", Item="Rice"))
        < gen.rule_score(prompt, helpful)
    )


def test_no_test_prompt_in_train(rows):
    train_prompts = {_split(row["chosen"])[0] for row in rows["train"]}
    train_questions = {prompt.rsplit("\n\nHuman: ", 1)[1] for prompt in train_prompts}
    for row in rows["test"]:
        prompt = _split(row["chosen"])[0]
        assert prompt not in train_prompts
        assert prompt.rsplit("\n\nHuman: ", 1)[1] not in train_questions


def test_rule_score_by_hand():
    prompt = "\n\nHuman: I'm a complete beginner. How do I make rice?\n\nAssistant:"
    assert gen.prompt_topic(prompt) == "cooking"
    # cooking keywords: simmer, rice, salted ("water" and "minutes" occur in other topics too)
    helpful = gen.rule_score(prompt, " Simmer the rice in salted water for 18 minutes.")
    assert helpful == 3.0
    # two penalised phrases: "don't know", "figure it out"
    assert gen.rule_score(prompt, " I don’t know, figure it out yourself.") == -6.0
    assert gen.rule_score(prompt, " Plant tomatoes in full sun.") < 0 < helpful
    assert gen.rule_score(prompt, " Rice? That's a stupid question.") < 0
    assert gen.prompt_topic("\n\nHuman: Hello there.\n\nAssistant:") is None


def test_every_knowledge_base_entry_is_recognisable():
    assert len(gen.TOPICS) >= 8
    for topic, spec in gen.TOPICS.items():
        keywords = gen.TOPIC_KEYWORDS[topic]
        for item, answer, short_answer in spec["items"]:
            for template in spec["questions"] + gen.GENERIC_QUESTIONS:
                question = f"\n\nHuman: {template.format(item=item)}{ASSISTANT}"
                assert gen.prompt_topic(question) == topic, question
            for reply in (answer, short_answer):
                assert len(set(gen._words(reply)) & keywords) >= 2, reply
                assert not any(p in reply.lower() for p in gen.EVASIVE_PHRASES + gen.RUDE_PHRASES), reply
