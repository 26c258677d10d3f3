"""`LLMJudge`: an LLM behind an OpenAI-compatible chat-completions endpoint, asked the paper's GPT-4 question
(App. C.2: `COMPARISON_PROMPT` for dialogue, `SUMMARIZATION_PROMPT` for summarization); `parse_verdict` reads
its reply. Requests are sent with the standard library, with a total deadline, bounded retries and a reply
cache on disk."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import math
import os
import random
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence

from tqdm.auto import tqdm

from .base import Judge, JudgeError, _check_lengths

# Rafailov et al. 2023 (arXiv 2305.18290), App. C.2: the GPT-4 win-rate prompt for dialogue (Anthropic-HH),
# as the paper gives it ("\" there only wraps long lines), with the two responses as placeholders.
COMPARISON_PROMPT = """For the following query to a chatbot, which response is more helpful?
Query: {query}
Response A:
{response_a}
Response B:
{response_b}
FIRST provide a one-sentence comparison of the two responses and explain which you feel is more \
helpful. SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your \
response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""

# App. C.2's GPT-4 prompt for summarization (TL;DR), the same way: the post is the query, the two summaries
# the responses. Its verdict line is "Preferred:", which parse_verdict reads like "More helpful:".
SUMMARIZATION_PROMPT = """Which of the following summaries does a better job of summarizing the most \
important points in the given forum post, without including unimportant or irrelevant details? A good \
summary is both precise and concise.
Post:
{query}
Summary A:
{response_a}
Summary B:
{response_b}
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. \
SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

# LLMJudge(task=...) -> its prompt
TASK_PROMPTS = {"dialogue": COMPARISON_PROMPT, "summarization": SUMMARIZATION_PROMPT}

# Status codes worth another try, as OpenAI's own client retries them: timeout, conflict, rate limit.
RETRY_STATUS = frozenset({408, 409, 429})
MAX_BACKOFF_S = 60.0


_VERDICT_QUOTES_OPEN = "\"'“‘<([{"
_VERDICT_QUOTES_CLOSE = "\"'”’>)]}.!,;:"
# "More helpful: A" (or the summarization prompt's "Preferred: A"), tolerant of case, spacing, quotes,
# brackets, "Response A" / "Summary A" and trailing punctuation; the letter must end the line, so
# "More helpful: a short answer" is not read as A.
_LABELLED_VERDICT = re.compile(
    rf"(?:more\s+helpful|preferred)\s*:\s*[{re.escape(_VERDICT_QUOTES_OPEN)}\s]*"
    rf"(?:response\s+|summary\s+)?([ab])"
    rf"[{re.escape(_VERDICT_QUOTES_CLOSE)}\s]*$",
    re.IGNORECASE | re.MULTILINE,
)
# Fallback: a line holding nothing but the letter ("B", "**B**", "Response B.").
_BARE_VERDICT = re.compile(
    rf"^[{re.escape(_VERDICT_QUOTES_OPEN)}\s]*(?:response\s+)?([ab])[{re.escape(_VERDICT_QUOTES_CLOSE)}\s]*$",
    re.IGNORECASE | re.MULTILINE,
)


def parse_verdict(reply: str) -> str | None:
    """ "A" or "B" from a judge's reply to ``COMPARISON_PROMPT`` (or ``SUMMARIZATION_PROMPT``), or None if
    it names neither.

    The last "More helpful:" (or "Preferred:") line decides; markdown emphasis, quotes, "Response A",
    lowercase and trailing punctuation are tolerated. Without one, the last line holding only the letter decides.

    >>> parse_verdict('Comparison: B is on topic.\\n**More helpful:** "response b".')
    'B'
    >>> parse_verdict("Comparison: A is concise.\\n\\nA") , parse_verdict("Both are fine.")
    ('A', None)
    """
    text = re.sub(r"[*_`#]", "", reply or "")
    for pattern in (_LABELLED_VERDICT, _BARE_VERDICT):
        letters = pattern.findall(text)
        if letters:
            return letters[-1].upper()
    return None


class LLMJudge(Judge):
    """An LLM behind an OpenAI-compatible chat-completions endpoint, asked the paper's comparison prompt.

    Each comparison is one ``POST {base_url}/chat/completions`` with body ``{"model", "messages":
    [{"role": "user", "content": prompt_template.format(query=..., response_a=..., response_b=...)}],
    "temperature"}``, sent one after another. As in the paper (App. C.2), the order in which the two
    responses are shown is random per comparison (``random.Random(seed)``, drawn across calls) and the
    verdict is mapped back, so a judge's preference for a position cancels out on average. The prompt is
    the paper's for ``task="dialogue"`` (``COMPARISON_PROMPT``) or ``task="summarization"``
    (``SUMMARIZATION_PROMPT``), unless ``prompt_template`` gives another.

    A reply naming neither response (see ``parse_verdict``), or a message whose ``content`` is null, is
    *unparsed*: its outcome is NaN, which ``win_rate`` leaves out and counts; ``unparsed`` counts them
    over the judge's life, the first one is warned about, and a ``compare`` call whose unparsed share
    exceeds ``max_unparsed`` raises ``JudgeError`` (after caching what it got).

    Each request has a total deadline of ``timeout`` seconds (connection, headers and body together: a
    server trickling bytes cannot stall it) and an answer is read up to ``max_response_bytes``. Status
    408/409/429/5xx, connection errors and timeouts are retried up to ``max_retries`` times (so
    ``max_retries + 1`` attempts), waiting ``retry_delay * 2**k`` seconds before retry k (at most 60); then
    ``JudgeError``. Any other error status, a redirect (never followed: the API key would go to another
    address), a too-large answer, or one that is not chat-completions JSON raises ``JudgeError`` at once.
    ``api_key`` defaults to the ``OPENAI_API_KEY`` environment variable and is sent as a bearer token when
    there is one; it is replaced by ``<redacted>`` in every error and warning, and a plain ``http://`` URL
    to another machine with a key is warned about. ``cache_file`` (a JSON-lines file) keeps every reply,
    keyed by model, temperature and the exact message, so that a rerun pays for no verdict twice and a
    failure loses none. ``disable_progress`` hides the tqdm bar.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_retries: int = 3,
        timeout: float = 30,
        seed: int = 0,
        prompt_template: str | None = None,
        task: str = "dialogue",
        retry_delay: float = 1.0,
        disable_progress: bool = False,
        max_response_bytes: int = 1_000_000,
        max_unparsed: float = 0.1,
        cache_file: str | os.PathLike | None = None,
    ):
        if max_retries < 0 or retry_delay < 0 or timeout <= 0 or max_response_bytes < 1:
            raise ValueError(
                "need max_retries >= 0, retry_delay >= 0, timeout > 0 and max_response_bytes >= 1, "
                f"got {max_retries}, {retry_delay}, {timeout}, {max_response_bytes}"
            )
        if not 0.0 <= max_unparsed <= 1.0:
            raise ValueError(f"max_unparsed must lie in [0, 1], got {max_unparsed}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if task not in TASK_PROMPTS:
            raise ValueError(f"task must be one of {sorted(TASK_PROMPTS)}, got {task!r}")
        prompt_template = TASK_PROMPTS[task] if prompt_template is None else prompt_template
        for field in ("query", "response_a", "response_b"):
            if "{" + field + "}" not in prompt_template:
                raise ValueError(f"prompt_template must contain the placeholder {{{field}}}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        base_url = base_url.rstrip("/")
        self.url = base_url if base_url.endswith("/chat/completions") else base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.temperature = temperature
        self.max_retries = max_retries
        self.timeout = timeout
        self.prompt_template = prompt_template
        self.retry_delay = retry_delay
        self.disable_progress = disable_progress
        self.max_response_bytes = max_response_bytes
        self.max_unparsed = max_unparsed
        self.unparsed = 0
        self._rng = random.Random(seed)
        self._warned = False
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if self.url.startswith("http://") and self.api_key and not _is_loopback(host):
            warnings.warn(
                f"{self.url} is plain http to another machine: the API key travels unencrypted; use https.",
                stacklevel=2,
            )
        self.cache_file = os.fspath(cache_file) if cache_file is not None else None
        self._cache = _read_reply_cache(self.cache_file) if self.cache_file else {}

    def compare(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> list[float]:
        """Per prompt 1.0 (A better), 0.0 (B better), or NaN when the reply named neither (unparsed)."""
        _check_lengths(prompts, responses_a=responses_a, responses_b=responses_b)
        outcomes, unparsed, example = [], 0, None
        items = tqdm(
            zip(prompts, responses_a, responses_b),
            total=len(prompts),
            desc="LLM judge",
            disable=self.disable_progress,
        )
        for prompt, response_a, response_b in items:
            swapped = self._rng.random() < 0.5
            first, second = (response_b, response_a) if swapped else (response_a, response_b)
            content = self.prompt_template.format(query=prompt, response_a=first, response_b=second)
            reply = self._cached_complete(content)
            verdict = parse_verdict(reply) if reply is not None else None
            if verdict is None:
                unparsed += 1
                example = "content: null" if reply is None else repr(reply[:200])
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        self._redact(
                            f"{self.url}: could not read a verdict ('More helpful: A' or 'B') from the reply "
                            f"{example}; left out of win rates (judge.unparsed counts them)"
                        ),
                        stacklevel=2,
                    )
                outcomes.append(math.nan)
                continue
            first_wins = verdict == "A"
            outcomes.append(1.0 if first_wins != swapped else 0.0)
        self.unparsed += unparsed
        if outcomes and unparsed / len(outcomes) > self.max_unparsed:
            raise JudgeError(
                self._redact(
                    f"{self.url}: {unparsed} of {len(outcomes)} replies named no verdict, more than "
                    f"max_unparsed={self.max_unparsed} (e.g. {example}); check the judge model and prompt"
                )
            )
        return outcomes

    def _cached_complete(self, content: str) -> str | None:
        """The reply to `content`, from `cache_file` when it is there, else asked and then cached."""
        key = hashlib.sha256(
            json.dumps([self.model, self.temperature, content], ensure_ascii=False).encode()
        ).hexdigest()
        if key in self._cache:
            return self._cache[key]
        reply = self._complete(content)
        if self.cache_file:
            self._cache[key] = reply
            with open(self.cache_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "reply": reply}) + "\n")
        return reply

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "<redacted>") if self.api_key else text

    def _complete(self, content: str) -> str | None:
        """The assistant message for one user message (None for `content: null`), retrying transient failures."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.retry_delay * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                status, location, raw = self._post(body, headers)
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out
                last_error = self._redact(f"{type(error).__name__}: {getattr(error, 'reason', error)}")
                continue
            if 200 <= status < 300:
                return self._message_content(raw)
            excerpt = self._redact(_excerpt(raw))
            if 300 <= status < 400:
                raise JudgeError(
                    self._redact(
                        f"{self.url} redirected (status {status}) to {location!r}; redirects are not followed, "
                        "so that the API key goes to no other address: set base_url to the final address"
                    )
                )
            if status in RETRY_STATUS or status >= 500:
                last_error = f"status {status}: {excerpt}"
                continue
            hint = "check the API key (api_key or OPENAI_API_KEY)" if status in (401, 403) else ""
            hint = hint or "check base_url and model"
            raise JudgeError(
                f"{self.url} answered status {status} for model {self.model!r}: {excerpt}; {hint}"
            )
        raise JudgeError(
            f"{self.url} failed {self.max_retries + 1} times (max_retries={self.max_retries}); "
            f"last: {last_error}"
        )

    def _post(self, body: bytes, headers: dict) -> tuple[int, str | None, bytes]:
        """(status, Location header, body) of one POST, all within `timeout` seconds, the body capped.

        A watchdog shuts the socket down at the deadline, which ends any read in progress; the read then
        fails and a `TimeoutError` is raised. Proxies from the environment are honoured (`getproxies`).
        """
        parts = urllib.parse.urlsplit(self.url)
        https = parts.scheme == "https"
        connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
            proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            connection = connection_class(proxy_parts.hostname, proxy_parts.port, timeout=self.timeout)
            if https:
                connection.set_tunnel(parts.hostname, parts.port)
            else:
                target = self.url  # a plain-http proxy takes the absolute URL
        else:
            connection = connection_class(parts.hostname, parts.port, timeout=self.timeout)
        expired, sockets = threading.Event(), []

        def expire():
            expired.set()
            for sock in sockets:  # the connection drops its socket once the response owns it: kept here
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        response = None
        try:
            connection.connect()
            sockets.append(connection.sock)
            if expired.is_set():
                raise TimeoutError(f"no connection within timeout={self.timeout}s")
            connection.request("POST", target, body=body, headers=headers)
            response = connection.getresponse()
            declared = response.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise JudgeError(self._too_large(f"declares {int(declared)} bytes, more than"))
            chunks, size = [], 0
            while chunk := response.read(65536):
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise JudgeError(self._too_large("sent more bytes than"))
                chunks.append(chunk)
            if expired.is_set():
                raise TimeoutError(f"no complete answer within timeout={self.timeout}s")
            return response.status, response.getheader("Location"), b"".join(chunks)
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError(f"no complete answer within timeout={self.timeout}s") from None
            raise
        finally:
            watchdog.cancel()
            if response is not None:
                response.close()
            connection.close()

    def _too_large(self, what: str) -> str:
        """`what` leads to the limit: "declares 5000 bytes, more than" or "sent more bytes than"."""
        return (
            f"{self.url}: the answer {what} max_response_bytes={self.max_response_bytes}; "
            "a chat completion is far smaller: check base_url"
        )

    def _message_content(self, raw: bytes) -> str | None:
        try:
            message = json.loads(raw)["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(
                self._redact(
                    f"{self.url} did not answer with chat-completions JSON "
                    f"({{'choices': [{{'message': ...}}]}}): "
                    f"{_excerpt(raw)}; check base_url (OpenAI-compatible servers usually end in /v1) and model"
                )
            ) from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_reply_cache(path: str) -> dict[str, str | None]:
    """{key: reply} from a JSON-lines reply cache; a line cut short by a kill is skipped."""
    cache = {}
    if not os.path.exists(path):
        return cache
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue
    return cache


def _excerpt(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return repr(text[:limit] + ("..." if len(text) > limit else ""))
