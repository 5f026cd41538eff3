"""The `endpoint` judge: a judge behind an OpenAI-compatible chat-completions server (vLLM serving Llama-Guard-3,
an API scoring the StrongREJECT rubric), through httpx.

  - the prompt format (formats.py) makes each pair's messages and reads the judge's text;
  - up to `judge_concurrency` requests are in flight at once, each limited to `judge_timeout` seconds;
  - a request answered 429 or 5xx, or timed out, is retried up to `judge_retries` times, waiting the Retry-After
    header's time when the server sends one, else `judge_backoff` seconds doubled at each retry;
  - every judge output is cached on disk, keyed by the server and the whole request (the model, the format's
    messages, so the prompt and the answer, and the generation settings): a re-run sends no request. The cache
    holds the judge's text, so changing the threshold re-reads it without asking again;
  - the API key comes from the environment variable `api_key_env` names and goes only into the Authorization
    header: never into a setting, a report, the cache, a log or an error message.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.judges.base import Judge, Judgement, JudgeOptions
from antidote_llm.evaluation.judges.formats import prompt_format
from antidote_llm.runtime.loading import cache_dir

RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
MAX_RETRY_WAIT = 120.0  # seconds: the longest wait between two tries, whatever Retry-After says
CACHE_FILE = "endpoint.jsonl"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
INSTALL_HINT = "pip install 'antidote-llm[endpoint]'"


def retryable(status: int) -> bool:
    """Whether a request answered `status` is worth another try: rate limits, timeouts and server errors."""
    return status in RETRY_STATUSES or 500 <= status <= 599


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds, or an HTTP date (RFC 9110); None when absent or unreadable."""
    if header is None or not header.strip():
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(attempt: int, retry_after: str | None, backoff: float) -> float:
    """Seconds before retry number `attempt` (0 for the first): the server's Retry-After when it gives one, else
    `backoff` doubled at each retry; never more than MAX_RETRY_WAIT."""
    asked = retry_after_seconds(retry_after)
    return min(MAX_RETRY_WAIT, asked if asked is not None else backoff * 2 ** attempt)


def request_key(base_url: str, body: dict) -> str:
    """The cache key of one request: the server and the whole body (never the key, which is not in either)."""
    return hashlib.sha256(json.dumps([base_url, body], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def completion_text(payload) -> str | None:
    """The first choice's message content of a chat-completions answer ("" when the server gave none), or None
    when `payload` is not a chat completion."""
    try:
        content = payload["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else ""


def api_key(name: str | None) -> str | None:
    """The key in the environment variable `name` (None: a server without keys); only the name ever appears in a
    message."""
    if name is None:
        return None
    if not ENV_NAME.match(name):
        raise AntidoteError("--api-key-env takes the name of an environment variable (letters, digits and _), not a "
                            "key; the value given is not shown")
    key = os.environ.get(name, "").strip()
    if not key:
        raise AntidoteError(f"judge 'endpoint' reads its API key from the environment variable {name}, which is not "
                            f"set; set it, or name another with --api-key-env (none for a server without keys)")
    return key


class OutputCache:
    """Judge outputs on disk, one JSON line per request ({"key", "output"}), appended with one write each under
    O_APPEND (so processes sharing the file do not interleave lines); a torn last line is skipped on reading."""

    def __init__(self, folder: Path):
        self.path = folder / CACHE_FILE
        self._entries: dict[str, str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            entries = {}
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        record = json.loads(line)
                        entries[record["key"]] = record["output"]
                    except (ValueError, KeyError, TypeError):
                        continue
            self._entries = entries
        return self._entries

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, output: str) -> None:
        line = (json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(descriptor).st_size
                torn = size > 0 and os.pread(descriptor, 1, size - 1) != b"\n"  # a crash cut the last line short
                os.write(descriptor, b"\n" + line if torn else line)
            finally:
                os.close(descriptor)
            self._load()[key] = output


def _httpx():
    try:
        import httpx
    except ImportError:
        raise AntidoteError(f"judge 'endpoint' needs httpx: {INSTALL_HINT}") from None
    return httpx


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class EndpointClient:
    """Chat completions from one server: the Bearer key, the timeout, the connection limit, the retries; counts
    the requests it sent and the retries among them."""

    def __init__(self, base_url: str, key: str | None, *, concurrency: int, timeout: float, retries: int,
                 backoff: float):
        httpx = _httpx()
        self.base_url, self.retries, self.backoff = base_url, retries, backoff
        self.url = f"{base_url}/chat/completions"
        self.errors = (httpx.TimeoutException, httpx.TransportError)
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.counts = {"requests": 0, "retries": 0}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def check(self) -> None:
        """Before any work: the server answers (GET BASE_URL/models), and does not refuse the key."""
        try:
            response = self.http.get(f"{self.base_url}/models")
        except self.errors as exc:
            raise AntidoteError(f"cannot reach the judge endpoint {self.base_url}: {_reason(exc)}; check --base-url "
                                "and that the server is running") from None
        if response.status_code in (401, 403):
            raise AntidoteError(f"the judge endpoint {self.base_url} refused the API key ({response.status_code} "
                                f"{response.reason_phrase}); check the key or --api-key-env")

    def complete(self, body: dict) -> str:
        """The judge's text for one request, retried on 429, 5xx and timeouts; any other failure is one line."""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            last = attempt == self.retries
            try:
                response = self.http.post(self.url, json=body)
            except self.errors as exc:
                if last:
                    raise AntidoteError(f"the judge endpoint {self.url} failed {attempt + 1} times, last: "
                                        f"{_reason(exc)}; check the server or raise --judge-timeout") from None
                time.sleep(retry_delay(attempt, None, self.backoff))
                continue
            if response.status_code == 200:
                try:
                    text = completion_text(response.json())
                except ValueError:
                    text = None
                if text is None:
                    raise AntidoteError(f"the judge endpoint {self.url} answered something other than a chat "
                                        f"completion: {response.text[:120]!r}; check --base-url")
                return text
            if not retryable(response.status_code) or last:
                again = f" after {attempt} retries" if attempt else ""
                raise AntidoteError(f"the judge endpoint {self.url} answered {response.status_code} "
                                    f"{response.reason_phrase}{again}: {response.text[:200]!r}")
            time.sleep(retry_delay(attempt, response.headers.get("retry-after"), self.backoff))
        raise AssertionError("unreachable")  # the last attempt returns or raises


class EndpointJudge(Judge):
    """A judge served over HTTP: --judge-model names the served model, --base-url the server, --judge-format the
    prompt format. The key and the server are checked at construction, so a wrong one fails before any work."""

    name = "endpoint"

    def __init__(self, options: JudgeOptions):
        settings = options.endpoint
        if not options.model or not settings.base_url:
            raise AntidoteError("judge 'endpoint' needs --judge-model NAME (the served model) and --base-url URL (the "
                                "OpenAI-compatible server, e.g. http://localhost:8000/v1)")
        self.options, self.settings = options, settings
        self.format = prompt_format(settings.judge_format)
        self.client = EndpointClient(
            settings.base_url, api_key(settings.api_key_env), concurrency=settings.judge_concurrency,
            timeout=settings.judge_timeout, retries=settings.judge_retries, backoff=settings.judge_backoff,
        )
        self.client.check()
        self.cache = OutputCache(Path(settings.judge_cache) if settings.judge_cache else cache_dir() / "judges")
        self.cached = 0

    def body(self, prompt: str, answer: str) -> dict:
        """The request for one pair: greedy, the format's messages and completion budget."""
        return {"model": self.options.model, "messages": self.format.messages(prompt, answer), "temperature": 0,
                "max_tokens": self.format.max_tokens}

    def _ask(self, key: str, body: dict) -> str:
        text = self.client.complete(body)
        self.cache.put(key, text)
        return text

    def judge_batch(self, prompts: Sequence[str], answers: Sequence[str], *, progress: bool) -> list[Judgement]:
        bodies = [self.body(p, a) for p, a in zip(prompts, answers, strict=True)]
        keys = [request_key(self.settings.base_url, body) for body in bodies]
        outputs = {key: text for key in keys if (text := self.cache.get(key)) is not None}
        self.cached += sum(key in outputs for key in keys)
        missing = {key: body for key, body in zip(keys, bodies, strict=True) if key not in outputs}  # once each
        if missing:
            with ThreadPoolExecutor(max_workers=min(self.settings.judge_concurrency, len(missing))) as pool:
                futures = {pool.submit(self._ask, key, body): key for key, body in missing.items()}
                try:
                    for future in tqdm(as_completed(futures), total=len(futures), desc="judging (endpoint)",
                                       disable=not progress):
                        outputs[futures[future]] = future.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # what was answered is cached already
                    raise
        return [self.format.parse(outputs[key], self.options.threshold) for key in keys]

    def describe(self) -> dict:
        described = {"name": self.name, "model": self.options.model, "base_url": self.settings.base_url,
                     "format": self.settings.judge_format, "api_key_env": self.settings.api_key_env,
                     **self.client.counts, "cached": self.cached}
        if self.settings.judge_format == "strongreject":
            described["threshold"] = self.options.threshold
        return described
