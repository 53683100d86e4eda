"""API audio models (GPT-4o-audio, Gemini 2.5 Pro) as evaluation baselines, behind the same
prompt, the same parser and the same `Prediction` records as PALLM's own models.

    models = available_api_models(cache_dir="cache/api")   # {name: ApiAudioModel | why it is skipped}
    for name, m in models.items():
        if isinstance(m, str):
            print(m)                                          # "OPENAI_API_KEY not set: gpt-4o-audio skipped"
            continue
        preds = m.predict(rows, "classify", PromptConfig(), labels, progress=cb)
        metrics = classification_metrics(preds, rows, labels)

Both go through an OpenAI-compatible chat-completions endpoint (OpenAI itself; Google's
`.../v1beta/openai/`) with the clip as an `input_audio` content part (base64 16 kHz mono 16-bit
wav) followed by the text prompt. Plain `urllib` (see `pallm.api`): no SDK needed.

Every successful answer is appended to a JSON-lines cache (key: sha256 of model, generation
settings, prompt and wav bytes), so an interrupted evaluation resumes without paying twice. A row
that still fails after the retries becomes an unparsable prediction (output "", label None: counted
as wrong) and is logged; it is not cached, so the next run asks again. A rejected key (401/403) or an
unknown model (404) stops the whole run with a `PallmError` instead: every row would fail the same way.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from pallm.api import ApiError, JsonlCache, RateLimiter, chat_completions_url, json_headers, post_json, request_key
from pallm.data.audio import SAMPLE_RATE
from pallm.data.manifest import Row
from pallm.errors import PallmError
from pallm.evaluate.predict import Prediction, row_audio, to_prediction
from pallm.prompts.format import PromptConfig, build_prompt, label_set

log = logging.getLogger("pallm.evaluate.api")

OPENAI_BASE_URL = "https://api.openai.com/v1"
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"
DEFAULT_CACHE_DIR = "cache/api"

# name -> (model id, default base_url, env var holding the key, env var that may override base_url)
API_MODELS: dict[str, tuple[str, str, str, str]] = {
    "gpt-4o-audio": ("gpt-4o-audio-preview", OPENAI_BASE_URL, "OPENAI_API_KEY", "OPENAI_BASE_URL"),
    "gemini-2.5-pro": ("gemini-2.5-pro", GEMINI_BASE_URL, "GEMINI_API_KEY", "GEMINI_BASE_URL"),
}

# Statuses that mean "every request of this run will fail": stop instead of failing row by row.
_FATAL = {401: "the API rejected the key", 403: "the key is not allowed to use this model",
          404: "model or endpoint not found"}


def wav_bytes(audio: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """Mono float samples -> a 16-bit PCM wav file in memory (clipped to [-1, 1] first: the
    resampler can overshoot, and out-of-range floats would wrap around in 16 bits)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def message_text(message: dict[str, Any]) -> str:
    """The assistant message's text: a string, a list of text parts, or None (-> "")."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise TypeError(f"unexpected message content of type {type(content).__name__}")


class ApiAudioModel:
    """One API model behind an OpenAI-compatible chat-completions endpoint.

    name: label in reports; model: the API's model id; base_url: the endpoint root (…/v1);
    api_key_env: env var holding the key (read when the object is made); max_concurrency:
    requests in flight; rpm: requests per minute (None: no limit; Retry-After is always honoured);
    timeout: seconds per socket operation; retries: extra attempts on 429/5xx/timeouts/network
    errors; backoff: first retry wait in seconds (doubles each retry); cache_dir: where
    `<name>.jsonl` caches answers (None: no cache); temperature, max_tokens (None: not sent) and
    system (a system message, None: none) go into the request and into the cache key.
    """

    def __init__(
        self,
        name: str,
        model: str,
        base_url: str,
        api_key_env: str | None,
        max_concurrency: int = 4,
        rpm: float | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        *,
        backoff: float = 1.0,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        system: str | None = None,
    ):
        if max_concurrency < 1:
            raise PallmError(f"{name}: max_concurrency must be at least 1, got {max_concurrency}.")
        self.name, self.model, self.base_url = name, model, base_url
        self.api_key_env = api_key_env
        self.url = chat_completions_url(base_url)
        api_key = os.environ.get(api_key_env) if api_key_env else None
        self.headers = json_headers(api_key)
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, timeout, retries, backoff
        self.limiter = RateLimiter(rpm)
        self.temperature, self.max_tokens, self.system = temperature, max_tokens, system
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.cache = JsonlCache(Path(cache_dir) / f"{safe}.jsonl") if cache_dir is not None else None
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "failures": 0}
        self.errors: dict[str, str] = {}  # row id -> why it failed, for the last predict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ApiAudioModel({self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    # --- one request ---------------------------------------------------------------------------

    def _settings(self) -> str:
        return f"{self.model}|{self.system}|{self.temperature}|{self.max_tokens}"

    def cache_key(self, prompt: str, wav: bytes) -> str:
        """sha256 of model (+ system, temperature, max_tokens), prompt and the wav bytes."""
        return request_key(self._settings(), prompt, wav)

    def request_body(self, prompt: str, wav: bytes) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode("ascii"), "format": "wav"}},
            {"type": "text", "text": prompt},
        ]})
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def _count(self, key: str, k: int = 1) -> None:
        with self._lock:
            self.stats[key] += k

    def complete(self, prompt: str, wav: bytes, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """One request (with retries) -> {"output": text, "finish_reason": ..., "usage": ...}.
        Raises ApiError."""

        def attempt(k: int) -> None:
            self._count("requests")
            if k:
                self._count("retries")

        payload = post_json(self.url, self.request_body(prompt, wav), self.headers, timeout=self.timeout,
                            retries=self.retries, backoff=self.backoff, limiter=self.limiter,
                            on_attempt=attempt, should_stop=should_stop)
        try:
            choice = payload["choices"][0]
            text = message_text(choice["message"])
        except (KeyError, IndexError, TypeError) as e:
            raise ApiError(f"answer has no choices[0].message ({type(e).__name__}: {e})", status=200) from None
        return {"output": text, "finish_reason": choice.get("finish_reason"), "usage": payload.get("usage")}

    # --- many rows -----------------------------------------------------------------------------

    def predict(
        self,
        rows: list[Row],
        task: str,
        prompt_cfg: PromptConfig,
        labels: list[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        audio_fn: Callable[[Row], np.ndarray] | None = None,
    ) -> list[Prediction]:
        """Predictions for `rows` in input order, parsed exactly like `pallm.evaluate.predict`.

        Cached answers cost nothing; identical (prompt, audio) pairs are asked once. A row that
        fails after the retries gets output "" (unparsable); see `self.errors` for why. A fatal
        error (401/403/404) raises PallmError after the requests in flight finish; answers received
        so far stay in the cache. `audio_fn(row)` replaces a row's audio (as in `predict`).
        """
        rows = list(rows)
        if labels is None:
            labels = label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))
        audio_fn = audio_fn or row_audio
        # One clip per request: API models are asked about the clip alone, without a speaker reference.
        prompt_cfg = prompt_cfg.model_copy(update={"speaker_reference": False, "speaker_norm": False})
        self.errors = {}
        total = len(rows)
        if progress:
            progress(0, total)

        outputs: dict[str, str] = {}
        keys: list[str] = []
        todo: dict[str, tuple[str, int]] = {}  # key -> (prompt, a row index); wavs are re-made when sent
        for i, r in enumerate(rows):
            prompt = build_prompt(task, r, prompt_cfg, labels)
            key = self.cache_key(prompt, wav_bytes(audio_fn(r)))
            keys.append(key)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                outputs[key] = str(hit.get("output") or "")
                self._count("cache_hits")
            elif key not in todo:
                todo[key] = (prompt, i)
        done = total - sum(1 for k in keys if k in todo)
        if progress and done:
            progress(done, total)

        failed: dict[str, str] = {}
        fatal: list[ApiError] = []
        stop = threading.Event()

        def ask(key: str) -> None:
            if stop.is_set():
                raise ApiError("skipped after an earlier fatal error")
            prompt, i = todo[key]
            try:
                result = self.complete(prompt, wav_bytes(audio_fn(rows[i])), should_stop=stop.is_set)
            except ApiError as e:
                if e.status in _FATAL:
                    stop.set()
                raise
            if self.cache is not None:
                self.cache.put(key, {"model": self.model, **result})
            outputs[key] = result["output"]

        if todo:
            rows_of: dict[str, int] = {}
            for k in keys:
                rows_of[k] = rows_of.get(k, 0) + 1
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo))) as pool:
                futures = {pool.submit(ask, k): k for k in todo}
                for fut in as_completed(futures):
                    key = futures[fut]
                    try:
                        fut.result()
                    except ApiError as e:
                        failed[key] = str(e)
                        if e.status in _FATAL:
                            fatal.append(e)
                    done += rows_of[key]
                    if progress:
                        progress(done, total)

        if fatal:
            e = fatal[0]
            key_note = f" (key from {self.api_key_env})" if e.status in (401, 403) and self.api_key_env else ""
            raise PallmError(f"{self.name}: {_FATAL[e.status]}{key_note} at {self.url}, model '{self.model}' "
                             f"({e}). {total - len(failed)} of {total} answers are cached; fix it and re-run.")

        preds = []
        for r, key in zip(rows, keys):
            if key in failed:
                self.errors[r.id] = failed[key]
            preds.append(to_prediction(r, task, outputs.get(key, ""), prompt_cfg, labels))
        if self.errors:
            self._count("failures", len(self.errors))
            first_id, first_err = next(iter(self.errors.items()))
            log.warning("%s: %d of %d rows failed after %d retries and count as unparsable (first: %s: %s)",
                        self.name, len(self.errors), total, self.retries, first_id, first_err)
        return preds


def available_api_models(
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    names: list[str] | None = None,
    **kwargs: Any,
) -> dict[str, ApiAudioModel | str]:
    """The built-in API models: {name: ApiAudioModel} when its key is set, else {name: reason}
    ("OPENAI_API_KEY not set: gpt-4o-audio skipped"). Base URLs come from OPENAI_BASE_URL /
    GEMINI_BASE_URL when set (a proxy, a gateway, a local server). `kwargs` (max_concurrency, rpm,
    timeout, retries, max_tokens, ...) go to every ApiAudioModel."""
    unknown = sorted(set(names or []) - set(API_MODELS))
    if unknown:
        raise PallmError(f"unknown API model(s) {unknown}; known: {', '.join(API_MODELS)}.")
    out: dict[str, ApiAudioModel | str] = {}
    for name, (model, base_url, key_env, url_env) in API_MODELS.items():
        if names is not None and name not in names:
            continue
        if not os.environ.get(key_env):
            out[name] = f"{key_env} not set: {name} skipped"
            continue
        out[name] = ApiAudioModel(name, model, os.environ.get(url_env) or base_url, key_env,
                                  cache_dir=cache_dir, **kwargs)
    return out
