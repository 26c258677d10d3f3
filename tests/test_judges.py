"""Judges: a rule function, a tiny reward model, and an LLM judge against a local chat-completions server."""

import copy
import importlib
import importlib.util
import json
import math
import re
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import transformers

import dpo_trainer.evaluation as evaluation
from dpo_trainer.evaluation import (
    COMPARISON_PROMPT,
    JudgeError,
    LLMJudge,
    RewardModelJudge,
    RuleJudge,
    ScoringJudge,
    parse_verdict,
    win_rate,
)

EXAMPLES_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


# ---------------------------------------------------------------------------------------------- RuleJudge


def _load_hh_generator():
    import hh_data  # examples/hh_data.py (examples/ is on sys.path: conftest)

    return hh_data


def test_rule_judge_scores_and_compares_with_rule_score():
    gen = _load_hh_generator()
    with open(EXAMPLES_DATA / "hh_tiny" / "test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(20))]
    prompts, chosen, rejected = [], [], []
    for row in rows:
        head, chosen_reply = row["chosen"].rsplit("\n\nAssistant:", 1)
        prompts.append(head + "\n\nAssistant:")
        chosen.append(chosen_reply)
        rejected.append(row["rejected"].rsplit("\n\nAssistant:", 1)[1])

    judge = RuleJudge(gen.rule_score, disable_progress=True)
    scores = judge.score(prompts, chosen)
    assert scores == [gen.rule_score(p, r) for p, r in zip(prompts, chosen)]
    outcomes = judge.compare(prompts, chosen, rejected)
    expected = [
        1.0 if a > b else 0.0 if a < b else 0.5
        for a, b in zip(scores, [gen.rule_score(p, r) for p, r in zip(prompts, rejected)])
    ]
    assert outcomes == expected
    assert sum(outcomes) > len(outcomes) / 2  # the bundled chosen replies mostly satisfy the rule


def test_rule_judge_ties_and_lengths():
    judge = RuleJudge(lambda prompt, response: response.count("!"), disable_progress=True)
    assert isinstance(judge, ScoringJudge)
    assert judge.compare(["p"] * 3, ["a!", "b", "c"], ["d", "e", "f!!"]) == [1.0, 0.5, 0.0]
    assert judge.score(["p"], ["wow!!"]) == [2.0]
    with pytest.raises(ValueError, match="responses_b has 1 entries but prompts has 2"):
        judge.compare(["p", "q"], ["a", "b"], ["c"])


# --------------------------------------------------------------------------------------- RewardModelJudge

TEXTS = [
    (
        "Tell me about the garden:",
        " thanks happy glad sure here helpful kindly welcome great answer thanks happy glad.",
    ),
    ("Tell me about the river and the music:", " no."),
    ("Tell me about the bread:", " glad to help, here is a great answer about bread."),
    ("Tell me about the winter and the train and the forest:", " whatever, go away."),
    ("Tell me about the lamp:", " sure."),
    ("Tell me about the coffee:", " here is a kindly helpful answer, you are welcome."),
    ("Tell me about the paper:", " ugh boring never."),
]


def _reward_model(tokenizer, *, pad_token_id, num_labels=1, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForSequenceClassification(config)


def _one_by_one(model, tokenizer, prompts, responses):
    with torch.no_grad():
        return [
            model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0].item()
            for p, r in zip(prompts, responses)
        ]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reward_model_batched_scores_equal_one_by_one(tokenizer, padding_side):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = padding_side
    model = _reward_model(tokenizer, pad_token_id=tokenizer.pad_token_id)
    model.train()
    prompts, responses = map(list, zip(*TEXTS))

    judge = RewardModelJudge(model, tokenizer, batch_size=3, disable_progress=True)
    batched = judge.score(prompts, responses)
    assert not model.training
    assert len(set(batched)) == len(batched)  # a random head still tells the texts apart
    single = RewardModelJudge(model, tokenizer, batch_size=1, disable_progress=True).score(prompts, responses)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(batched),
        torch.tensor(_one_by_one(model, tokenizer, prompts, responses)),
        rtol=0,
        atol=1e-5,
    )


def test_reward_model_compare_agrees_with_score(tokenizer):
    model = _reward_model(tokenizer, pad_token_id=tokenizer.pad_token_id)
    judge = RewardModelJudge(model, tokenizer, batch_size=4, disable_progress=True)
    prompts, responses = map(list, zip(*TEXTS))
    others = responses[1:] + responses[:1]
    a, b = judge.score(prompts, responses), judge.score(prompts, others)
    assert judge.compare(prompts, responses, others) == [1.0 if x > y else 0.0 for x, y in zip(a, b)]
    assert judge.compare(prompts, responses, responses) == [0.5] * len(prompts)


def test_reward_model_pad_falls_back_to_eos(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    model = _reward_model(tokenizer, pad_token_id=None)
    prompts, responses = map(list, zip(*TEXTS))
    expected = _one_by_one(model, tokenizer, prompts, responses)  # batch size 1 needs no pad id

    judge = RewardModelJudge(model, tokenizer, batch_size=4, disable_progress=True)
    assert model.config.pad_token_id == tokenizer.eos_token_id == judge.pad_id
    torch.testing.assert_close(
        torch.tensor(judge.score(prompts, responses)), torch.tensor(expected), rtol=0, atol=1e-5
    )


def test_reward_model_truncates_the_start(tokenizer):
    model = _reward_model(tokenizer, pad_token_id=tokenizer.pad_token_id)
    prompt, response = TEXTS[0]
    ids = tokenizer(prompt + response)["input_ids"]
    assert len(ids) > 8
    judge = RewardModelJudge(model, tokenizer, max_length=8, disable_progress=True)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[-8:]])).logits[0, 0].item()
    assert judge.score([prompt], [response]) == [pytest.approx(expected, abs=1e-5)]


def test_reward_model_rejects_bad_input(tokenizer):
    model = _reward_model(tokenizer, pad_token_id=tokenizer.pad_token_id, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelJudge(model, tokenizer)
    judge = RewardModelJudge(_reward_model(tokenizer, pad_token_id=0), tokenizer, disable_progress=True)
    with pytest.raises(ValueError, match="row 1: prompt \\+ response is empty"):
        judge.score(["a", "", "c"], ["b", "", "d"])
    assert judge.score([], []) == []


def test_reward_model_from_pretrained(tokenizer, tmp_path):
    model = _reward_model(tokenizer, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts, responses = map(list, zip(*TEXTS))
    expected = RewardModelJudge(model, tokenizer, disable_progress=True).score(prompts, responses)
    loaded = RewardModelJudge.from_pretrained(
        str(tmp_path), batch_size=2, device="cpu", disable_progress=True
    )
    assert loaded.batch_size == 2 and isinstance(loaded.model, transformers.LlamaForSequenceClassification)
    assert loaded.score(prompts, responses) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- LLMJudge

SHOWN = re.compile(r"Response A:\n(.*)\nResponse B:\n(.*)\nFIRST provide", re.DOTALL)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that gave up (timeout test) is expected
        pass


class ChatServer:
    """A local OpenAI-compatible chat-completions server whose behaviour each test sets.

    ``reply(content) -> str`` writes the assistant message from the prompt; ``failures`` is a list of
    statuses answered (in order, one per request) before it behaves; ``raw`` replaces the body of a
    200 answer; ``delay_first`` sleeps before the first answer; ``custom(handler)``, when set, answers
    instead (trickling, redirecting, echoing headers, huge bodies). Every request is recorded.
    """

    def __init__(self):
        self.requests = []  # (path, headers, parsed body)
        self.reply = prefer_longer
        self.failures = []
        self.raw = None
        self.delay_first = 0.0
        self.custom = None  # custom(handler) answers the request itself when set
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                state.requests.append((self.path, dict(self.headers), body))
                if state.delay_first and len(state.requests) == 1:
                    time.sleep(state.delay_first)
                if state.custom is not None:
                    state.custom(self)
                elif state.failures:
                    status = state.failures.pop(0)
                    self._send(status, json.dumps({"error": {"message": f"boom {status}"}}).encode())
                elif state.raw is not None:
                    self._send(200, state.raw)
                else:
                    content = state.reply(body["messages"][0]["content"])
                    message = {"role": "assistant", "content": content}
                    answer = {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}
                    self._send(200, json.dumps(answer).encode())

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def attempts(self):
        return len(self.requests)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def prefer_longer(content):
    shown_a, shown_b = SHOWN.search(content).groups()
    letter = "A" if len(shown_a) > len(shown_b) else "B"
    return f"Comparison: Response {letter} says more.\nMore helpful: {letter}"


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    chat = ChatServer()
    yield chat
    chat.stop()


def _judge(url, **kwargs):
    kwargs.setdefault("retry_delay", 0.0)
    kwargs.setdefault("max_retries", 3)
    kwargs.setdefault("timeout", 5)
    return LLMJudge(url, "judge-model", disable_progress=True, **kwargs)


def _items(n):
    """Prompts with one long and one short reply, the long one alternately in A and in B."""
    prompts = [f"Question number {i}?" for i in range(n)]
    long = [f"A long and careful answer to question {i}." for i in range(n)]
    short = [f"Short {i}." for i in range(n)]
    responses_a = [long[i] if i % 2 == 0 else short[i] for i in range(n)]
    responses_b = [short[i] if i % 2 == 0 else long[i] for i in range(n)]
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    return prompts, responses_a, responses_b, expected


def test_comparison_prompt_is_the_papers():
    assert COMPARISON_PROMPT.splitlines() == [
        "For the following query to a chatbot, which response is more helpful?",
        "Query: {query}",
        "Response A:",
        "{response_a}",
        "Response B:",
        "{response_b}",
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more "
        'helpful. SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. '
        "Your response should use the format:",
        "Comparison: <one-sentence comparison and explanation>",
        'More helpful: <"A" or "B">',
    ]


def test_request_carries_the_prompt_and_both_responses(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env")
    judge = _judge(server.url + "/", temperature=0.0)
    judge.compare(["How do I {boil} an egg?"], [" Simmer it for 8 minutes."], [" No idea."])
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-env"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["user"]
    content = body["messages"][0]["content"]
    assert content.startswith("For the following query to a chatbot, which response is more helpful?\n")
    assert "Query: How do I {boil} an egg?\n" in content
    assert sorted(SHOWN.search(content).groups()) == [" No idea.", " Simmer it for 8 minutes."]
    assert "FIRST provide a one-sentence comparison of the two responses" in content
    assert content.endswith(
        'Comparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">'
    )


def test_api_key_argument_and_no_key(server):
    _judge(server.url, api_key="sk-arg").compare(["q"], ["a"], ["bb"])
    _judge(server.url).compare(["q"], ["a"], ["bb"])
    assert server.requests[0][1]["Authorization"] == "Bearer sk-arg"
    assert "Authorization" not in server.requests[1][1]


def test_random_order_is_mapped_back(server):
    prompts, responses_a, responses_b, expected = _items(40)
    judge = _judge(server.url, seed=1)
    assert judge.compare(prompts, responses_a, responses_b) == expected
    # the judge saw response A first about half of the time, and it does not follow the item parity
    shown_first = [SHOWN.search(b["messages"][0]["content"]).group(1) for _, _, b in server.requests]
    a_first = [shown == a for shown, a in zip(shown_first, responses_a)]
    assert 10 <= sum(a_first) <= 30
    # the same seed shows the same order; another seed another
    _judge(server.url, seed=1).compare(prompts, responses_a, responses_b)
    _judge(server.url, seed=2).compare(prompts, responses_a, responses_b)
    contents = [b["messages"][0]["content"] for _, _, b in server.requests]
    assert contents[40:80] == contents[:40] != contents[80:]
    assert judge.unparsed == 0


VERDICT_FORMATS = [
    "Comparison: fine.\nMore helpful: {x}",
    'Comparison: fine.\nMore helpful: "{x}"',
    "Comparison: fine.\n**More helpful:** {x}",
    "Comparison: fine.\n**More helpful: {x}**",
    "Comparison: fine.\nmore helpful:   {lower}.",
    "Comparison: fine.\nMore helpful: Response {x}",
    "Comparison: fine.\nMore Helpful : <{x}>",
    "Comparison: fine. More helpful: {x}",
    "Comparison: Response {y} is more helpful: no, {x} is.\n\n{x}",
    "Comparison: fine.\n\n**{x}**\n",
    "Comparison: Response A and Response B differ.\nMore helpful: {x}!",
]


@pytest.mark.parametrize("template", VERDICT_FORMATS)
def test_verdict_formats_are_parsed(server, template):
    def reply(content):
        letter = "A" if SHOWN.search(content).group(1).startswith("Best") else "B"
        other = "B" if letter == "A" else "A"
        return template.format(x=letter, lower=letter.lower(), y=other)

    server.reply = reply
    prompts = [f"q{i}" for i in range(6)]
    best = [f"Best answer {i}" for i in range(6)]
    worst = [f"Other answer {i}" for i in range(6)]
    judge = _judge(server.url)
    assert judge.compare(prompts, best[:3] + worst[3:], worst[:3] + best[3:]) == [1.0] * 3 + [0.0] * 3
    assert judge.unparsed == 0


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ('Comparison: A is vague.\n**More helpful:** "Response B".', "B"),
        ("Comparison: x\nMore helpful: a", "A"),
        ("More helpful: A\nMore helpful: B", "B"),  # the last one decides
        ("Comparison: B rambles.\nA.", "A"),
        ("More helpful: a short answer would be better", None),
        ("More helpful: A and B", None),
        ("Both are equally good.", None),
        ("", None),
        ("More helpful: Neither", None),
        ("More helpful: Apples", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_unparseable_replies_are_counted_and_left_out_of_the_win_rate(server):
    server.reply = lambda content: (
        "They are both lovely." if "q1" in content or "q3" in content else prefer_longer(content)
    )
    judge = _judge(server.url, max_unparsed=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcomes = judge.compare(["q0", "q1", "q2", "q3"], ["long answer"] * 4, ["b"] * 4)
    assert outcomes[0] == outcomes[2] == 1.0 and math.isnan(outcomes[1]) and math.isnan(outcomes[3])
    assert judge.unparsed == 2
    assert len(caught) == 1 and "They are both lovely." in str(caught[0].message)
    result = win_rate(outcomes)  # a broken reply is no tie: 2 of 2 verdicts are wins, not 3 of 4
    assert (result.rate, result.n, result.unparsed) == (1.0, 2, 2)
    assert "2 unparsed" in str(result)


def test_too_many_unparsed_replies_fail_the_run(server):
    server.reply = lambda content: "I cannot decide."
    with pytest.raises(JudgeError, match=r"3 of 3 replies named no verdict.*max_unparsed=0.1"):
        _judge(server.url).compare(["q1", "q2", "q3"], ["a"] * 3, ["b"] * 3)


def test_null_content_is_unparsed(server):
    server.raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode()
    judge = _judge(server.url, max_unparsed=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert all(math.isnan(x) for x in judge.compare(["q1", "q2"], ["a"] * 2, ["b"] * 2))
    assert judge.unparsed == 2 and "content: null" in str(caught[0].message)


@pytest.mark.parametrize("failures", [[500, 500], [429], [502, 429, 503]])
def test_transient_errors_are_retried(server, failures):
    server.failures = list(failures)
    prompts, responses_a, responses_b, expected = _items(2)
    assert _judge(server.url).compare(prompts, responses_a, responses_b) == expected
    assert server.attempts == len(failures) + 2


def test_timeout_is_retried(server):
    server.delay_first = 1.0
    prompts, responses_a, responses_b, expected = _items(1)
    assert _judge(server.url, timeout=0.2).compare(prompts, responses_a, responses_b) == expected
    assert server.attempts == 2


def test_persistent_500_raises_after_max_retries(server):
    server.failures = [500] * 10
    with pytest.raises(JudgeError) as error:
        _judge(server.url, max_retries=2).compare(["q"], ["a"], ["b"])
    assert server.attempts == 3
    message = str(error.value)
    assert server.url + "/chat/completions" in message and "3 times" in message
    assert "status 500" in message and "boom 500" in message


@pytest.mark.parametrize(
    "status, hint", [(401, "API key"), (404, "check base_url and model"), (400, "check base_url")]
)
def test_client_errors_raise_at_once(server, status, hint):
    server.failures = [status] * 10
    with pytest.raises(JudgeError, match=rf"answered status {status}.*boom {status}.*{hint}"):
        _judge(server.url).compare(["q"], ["a"], ["b"])
    assert server.attempts == 1


@pytest.mark.parametrize("raw", [b"<html>Welcome to nginx</html>", b'{"error": "no such route"}', b"[]"])
def test_non_chat_completions_body_raises_at_once(server, raw):
    server.raw = raw
    with pytest.raises(JudgeError, match=r"did not answer with chat-completions JSON.*check base_url"):
        _judge(server.url).compare(["q"], ["a"], ["b"])
    assert server.attempts == 1


def test_closed_port_raises_after_retries(monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    with socket.socket() as sock:  # a port that was free a moment ago, with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*failed 2 times.*(refused|Errno)"):
        _judge(url, max_retries=1).compare(["q"], ["a"], ["b"])


def test_llm_judge_validates_arguments():
    with pytest.raises(ValueError, match="http"):
        LLMJudge("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="response_b"):
        LLMJudge("http://127.0.0.1:1/v1", "m", prompt_template="{query} {response_a}")
    with pytest.raises(ValueError, match="responses_a has 2 entries"):
        LLMJudge("http://127.0.0.1:1/v1", "m").compare(["q"], ["a", "b"], ["c"])
    assert LLMJudge("http://h/v1/chat/completions/", "m").url == "http://h/v1/chat/completions"


# ------------------------------------------------------------------- misbehaving endpoints, cache, the key


def _chat_answer(letter="A"):
    message = {"role": "assistant", "content": f"Comparison: x.\nMore helpful: {letter}"}
    return json.dumps({"choices": [{"index": 0, "message": message}]}).encode()


def test_a_trickling_server_cannot_stall_a_request_past_its_deadline(server):
    payload = _chat_answer()

    def trickle(handler):  # headers at once, then one byte every 0.1 s (each read is quick; the whole is not)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        for byte in payload[:100]:  # bounded: about 10 s at most if nobody hangs up
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.1)

    server.custom = trickle
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"failed 2 times.*within timeout=0.5s"):
        _judge(server.url, timeout=0.5, max_retries=1).compare(["q"], ["a"], ["b"])
    assert time.monotonic() - started < 10  # two attempts of 0.5 s (slack for a busy machine), not 2 x 10 s
    assert server.attempts == 2


@pytest.mark.parametrize("declared", [True, False])
def test_a_huge_body_is_refused_without_reading_it_all(server, declared):
    block = b"x" * 65536

    def huge(handler):  # 3 MB, with or without a Content-Length (then it ends when the server closes)
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(300_000_000))
        handler.send_header("Connection", "close")
        handler.end_headers()
        for _ in range(48):
            handler.wfile.write(block)

    server.custom = huge
    said = "declares 300000000 bytes, more than" if declared else "sent more bytes than"
    with pytest.raises(JudgeError, match=rf"the answer {said} max_response_bytes=1000000; a chat completion"):
        _judge(server.url).compare(["q"], ["a"], ["b"])
    assert server.attempts == 1


@pytest.mark.parametrize("status", [302, 307])
def test_redirects_are_not_followed_with_the_key(server, status):
    other = ChatServer()
    try:

        def redirect(handler):
            handler.send_response(status)
            handler.send_header("Location", other.url + "/chat/completions")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        server.custom = redirect
        with pytest.raises(JudgeError, match=rf"redirected \(status {status}\).*not followed"):
            _judge(server.url, api_key="sk-secret-123").compare(["q"], ["a"], ["b"])
        assert other.attempts == 0  # the key never reached the other address
    finally:
        other.stop()


def test_the_key_is_redacted_from_an_error_echoing_the_request(server):
    def echo(handler):  # some proxies answer 401 with the request's headers in the body
        payload = json.dumps({"error": "unauthorized", "request_headers": dict(handler.headers)}).encode()
        handler.send_response(401)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    server.custom = echo
    with pytest.raises(JudgeError) as error:
        _judge(server.url, api_key="sk-secret-123").compare(["q"], ["a"], ["b"])
    assert "sk-secret-123" not in str(error.value) and "<redacted>" in str(error.value)
    assert "API key" in str(error.value)


def test_plain_http_to_another_machine_with_a_key_is_warned_about():
    with pytest.warns(UserWarning, match="plain http"):
        LLMJudge("http://judge.example.com/v1", "m", api_key="k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLMJudge("https://judge.example.com/v1", "m", api_key="k")
        LLMJudge("http://127.0.0.1:8000/v1", "m", api_key="k")
        LLMJudge("http://localhost:8000/v1", "m", api_key="k")
        LLMJudge("http://judge.example.com/v1", "m", api_key="")


def test_verdicts_are_cached_and_reused_after_a_failure(server, tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    prompts, responses_a, responses_b, expected = _items(6)
    answered = []

    def fail_after_three(handler):  # three verdicts paid for, then the endpoint breaks
        if len(answered) >= 3:
            handler._send(400, b'{"error": "quota exceeded"}')
            return
        body = handler.server_state_body
        answered.append(body)
        handler._send(200, json.dumps({"choices": [{"message": {"content": prefer_longer(body)}}]}).encode())

    def custom(handler):
        handler.server_state_body = server.requests[-1][2]["messages"][0]["content"]
        fail_after_three(handler)

    server.custom = custom
    with pytest.raises(JudgeError, match="quota exceeded"):
        _judge(server.url, cache_file=cache).compare(prompts, responses_a, responses_b)
    assert len(cache.read_text().splitlines()) == 3

    server.custom = None
    before = server.attempts
    assert _judge(server.url, cache_file=cache).compare(prompts, responses_a, responses_b) == expected
    assert server.attempts - before == 3  # only the three verdicts not paid for yet
    before = server.attempts
    assert _judge(server.url, cache_file=cache).compare(prompts, responses_a, responses_b) == expected
    assert server.attempts == before  # all six from the cache
    with open(cache, "a") as handle:
        handle.write('{"key": "cut sho')  # a kill in the middle of a line
    assert _judge(server.url, cache_file=cache).compare(prompts, responses_a, responses_b) == expected


# -------------------------------------------------------------------------------------------- the package


def test_package_exports():
    for name in ["Judge", "JudgeError", "RuleJudge", "RewardModelJudge", "LLMJudge", "COMPARISON_PROMPT"]:
        assert name in evaluation.__all__ and getattr(evaluation, name) is not None
    assert {"WinRate", "win_rate", "sample_responses", "best_of_n", "plot_win_rates"} <= set(
        evaluation.__all__
    )
    assert "plot_training_curves" in dir(evaluation)
    with pytest.raises(AttributeError, match="no_such_name"):
        evaluation.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    "name, module",
    [
        ("sample_responses", "sampling"),
        ("best_of_n", "best_of_n"),
        ("plot_win_rates", "plots"),
        ("plot_training_curves", "plots"),
    ],
)
def test_lazy_exports_are_functions(name, module):
    if importlib.util.find_spec(f"dpo_trainer.evaluation.{module}") is None:
        pytest.skip(f"evaluation/{module}.py is not written yet")
    importlib.import_module(
        f"dpo_trainer.evaluation.{module}"
    )  # the submodule first: best_of_n shares its name
    assert callable(getattr(evaluation, name)) and not isinstance(getattr(evaluation, name), type(evaluation))
