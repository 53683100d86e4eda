"""Shared plumbing for OpenAI-compatible HTTP APIs, standard library only (no `openai`, no `httpx`).

Used by the API model adapters (`pallm.evaluate.api_models`); the LLM judge
(`pallm.rewards.judge.make_llm_judge`) does the same things and can use it too:

    post_json(url, body, headers, timeout=..., retries=..., backoff=..., limiter=...) -> dict
        POST JSON, retry 429 / 5xx / network errors / timeouts with exponential backoff that
        honours `Retry-After`; raise `ApiError` when it gives up (`.status`, `.retryable`).
    RateLimiter(rpm)      requests-per-minute spacing shared by threads; a 429's Retry-After
                          pauses every thread, not only the one that got it.
    JsonlCache(path)      append-only JSON-lines cache {"key": ..., **record}; survives crashes.
    request_key(*parts)   sha256 over str/bytes parts (a cache key).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pallm.errors import PallmError

log = logging.getLogger("pallm.api")

# HTTP statuses worth another try: rate limited, request timeout, server-side trouble.
RETRYABLE_STATUS = {408, 409, 429}
MAX_WAIT = 120.0  # never sleep longer than this before one retry, whatever Retry-After says


class ApiError(PallmError):
    """A request that failed for good: `status` is the HTTP status (None for network errors),
    `retryable` whether the last failure was of a kind that is retried (then retries ran out)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status, self.retryable = status, retryable


def chat_completions_url(base_url: str) -> str:
    """`https://api.openai.com/v1` or `.../v1beta/openai/` -> `.../chat/completions`."""
    return base_url.rstrip("/") + "/chat/completions"


def json_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def request_key(*parts: str | bytes) -> str:
    """sha256 of the parts, each length-prefixed (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RateLimiter:
    """At most `rpm` request starts per minute (evenly spaced), across threads; `rpm=None` means no
    limit. `pause(seconds)` holds every caller back (used for a 429's Retry-After)."""

    def __init__(self, rpm: float | None = None):
        if rpm is not None and rpm <= 0:
            raise PallmError(f"rpm must be a positive number of requests per minute, got {rpm}.")
        self.interval = 60.0 / rpm if rpm else 0.0
        self.lock = threading.Lock()
        self.next_at = 0.0  # time.monotonic() of the next allowed start

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        if start > now:
            time.sleep(start - now)

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.next_at = max(self.next_at, time.monotonic() + seconds)


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The API's own error message (OpenAI/Gemini: {"error": {"message": ...}}), shortened."""
    try:
        raw = e.read()
    except Exception:  # noqa: BLE001 - a broken error body must not hide the status
        return ""
    try:
        msg = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = raw.decode("utf-8", "replace")
    msg = " ".join(str(msg).split())
    return f": {msg[:200]}" if msg else ""


def post_json(
    url: str,
    body: dict[str, Any] | bytes,
    headers: Mapping[str, str],
    *,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 1.0,
    max_wait: float = MAX_WAIT,
    limiter: RateLimiter | None = None,
    on_attempt: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """POST `body` as JSON and return the decoded JSON answer.

    Retried `retries` times: HTTP 408/409/429/5xx, refused or reset connections, timeouts (per
    socket operation). The wait before retry k (1-based) is backoff * 2**(k-1), or the server's
    Retry-After if longer, capped at `max_wait`; a Retry-After also pauses `limiter` so other threads
    sharing it back off too. Not retried: other HTTP errors (400, 401, 404, ...) and a 200 whose
    body is not JSON (it would come back the same). `on_attempt(k)` is called before each attempt
    (k = 0, 1, ...); `should_stop()` true aborts between attempts. Raises `ApiError`.
    """
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    error = ApiError("no attempt made")
    for attempt in range(retries + 1):
        if attempt:
            if should_stop is not None and should_stop():
                break
            wait = min(max(backoff * 2 ** (attempt - 1), getattr(error, "retry_after", 0.0) or 0.0), max_wait)
            log.info("%s: %s; retry %d/%d in %.1f s", url, error, attempt, retries, wait)
            time.sleep(wait)
        if limiter is not None:
            limiter.wait()
        if on_attempt is not None:
            on_attempt(attempt)
        try:
            req = urllib.request.Request(url, data=data, headers=dict(headers), method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            retryable = e.code in RETRYABLE_STATUS or e.code >= 500
            error = ApiError(f"HTTP {e.code}{_error_detail(e)}", status=e.code, retryable=retryable)
            after = parse_retry_after(e.headers)
            if after is not None:
                error.retry_after = after  # type: ignore[attr-defined]
                if limiter is not None:
                    limiter.pause(min(after, max_wait))
            if not retryable:
                raise error from None
            continue
        except (urllib.error.URLError, OSError) as e:  # refused, reset, DNS, timed out
            reason = getattr(e, "reason", None) or e
            error = ApiError(f"{type(e).__name__}: {reason}", retryable=True)
            continue
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(f"answer is not JSON: {raw[:80]!r}", status=200) from None
    raise error


class JsonlCache:
    """Append-only JSON lines, one {"key": ..., **record} per line; the last line of a key wins.

    Unreadable lines are skipped (a crash mid-write costs one entry, not the cache). Each append
    is one write of one line, so several threads or processes can share the file.
    """

    def __init__(self, path: str | Path):
        self.path, self.lock = Path(path), threading.Lock()
        self.data: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict) and isinstance(obj.get("key"), str):
                        self.data[obj["key"]] = obj
                except ValueError:
                    continue

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        obj = {"key": key, **record}
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self.lock:
            self.data[key] = obj
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
