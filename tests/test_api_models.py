"""API model adapters against a local chat-completions server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from pallm.api import JsonlCache, RateLimiter, parse_retry_after, request_key
from pallm.data.audio import load_audio
from pallm.data.manifest import Row
from pallm.errors import PallmError
from pallm.evaluate import classification_metrics
from pallm.evaluate.api_models import ApiAudioModel, available_api_models, wav_bytes
from pallm.prompts.format import PromptConfig, build_prompt

CFG = PromptConfig()
LABELS = ["negative", "neutral", "positive"]
GOOD = "<think>pitch level: low, loudness: low. the voice sounds sad.</think><answer>negative</answer>"


class _Handler(BaseHTTPRequestHandler):
    """Answers from `server.script` (one action per request, then "ok"):
    "ok" / "ok:TEXT": 200 with TEXT (default GOOD) as the assistant message; "429:S": 429 with
    Retry-After S; "500", "401": that status; "notjson": 200 with a non-JSON body; "nochoices": 200
    with JSON but no choices; "sleep:S": wait S
    seconds, then "ok". When the script is empty, `server.route(body)` (if set) picks the action."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                             "t": time.monotonic()})
            action = srv.script.pop(0) if srv.script else (srv.route(body) if srv.route else "ok")
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            if action.startswith("sleep:"):
                time.sleep(float(action.split(":", 1)[1]))
                action = "ok"
            if action.startswith("429:"):
                return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": action.split(":")[1]})
            if action in ("500", "401"):
                return self._send(int(action), b'{"error": {"message": "nope"}}')
            if action == "notjson":
                return self._send(200, b"<html>gateway error</html>")
            if action == "nochoices":
                return self._send(200, b'{"object": "chat.completion", "choices": []}')
            text = action.split(":", 1)[1] if action.startswith("ok:") else GOOD
            payload = {"choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
            self._send(200, json.dumps(payload).encode())
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass
        finally:
            with srv.lock:
                srv.inflight -= 1

    def _send(self, status, payload, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.script, srv.seen, srv.route = threading.Lock(), [], [], None
    srv.inflight = srv.max_inflight = 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def rows(tmp_path):
    """Three clips: one 44.1 kHz stereo (must arrive as 16 kHz mono), two 16 kHz mono."""
    rng = np.random.default_rng(0)
    out = []
    for i, (sr, ch, sent) in enumerate([(44_100, 2, "negative"), (16_000, 1, "positive"), (16_000, 1, "neutral")]):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, (0.2 * rng.standard_normal((int(0.5 * sr), ch))).astype(np.float32), sr)
        out.append(Row(id=f"r{i}", audio=str(path), corpus="test", speaker="s1", split="test",
                       sentiment=sent, transcript=f"sentence number {i}"))
    return out


def make(server, tmp_path, **kw):
    kw = {"retries": 3, "timeout": 5.0, "backoff": 0.01, "cache_dir": tmp_path / "cache", **kw}
    return ApiAudioModel("test-model", "audio-model-x", server.url, "PALLM_TEST_API_KEY", **kw)


def test_request_carries_base64_wav_then_prompt_and_parses_like_local_models(server, rows, tmp_path, monkeypatch):
    monkeypatch.setenv("PALLM_TEST_API_KEY", "sk-local")
    m = make(server, tmp_path, max_tokens=256)
    preds = m.predict(rows[:1], "classify", CFG, LABELS)
    req = server.seen[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-local"
    body = req["body"]
    assert body["model"] == "audio-model-x" and body["temperature"] == 0.0 and body["max_tokens"] == 256
    (user,) = body["messages"]
    assert user["role"] == "user"
    audio_part, text_part = user["content"]  # audio first, then the prompt
    assert audio_part["type"] == "input_audio" and audio_part["input_audio"]["format"] == "wav"
    assert text_part == {"type": "text", "text": build_prompt("classify", rows[0], CFG, LABELS)}
    assert 'The speaker says: "sentence number 0"' in text_part["text"]
    wav = base64.b64decode(audio_part["input_audio"]["data"])
    info = sf.info(io.BytesIO(wav))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 16_000, 1)
    sent, _ = sf.read(io.BytesIO(wav), dtype="float32")
    np.testing.assert_allclose(sent, load_audio(rows[0].audio), atol=1 / 32768 + 1e-6)  # the stereo mix, resampled
    (p,) = preds
    assert (p.id, p.task, p.output, p.label, p.gold, p.correct) == ("r0", "classify", GOOD, "negative", "negative", True)
    assert p.format_ok and p.cue_claims == {"pitch_level": "low", "loudness": "low"}
    # the same metrics apply
    assert classification_metrics(preds, rows[:1], LABELS)["subsets"]["all"]["parse_rate"] == 1.0
    # A run whose own model hears a speaker reference still asks the API about the clip alone.
    m.predict(rows[1:2], "classify", CFG.model_copy(update={"speaker_reference": True}), LABELS)
    (_, text_part) = server.seen[-1]["body"]["messages"][0]["content"]
    assert text_part["text"] == build_prompt("classify", rows[1], CFG, LABELS)


def test_respond_task_and_system_message(server, rows, tmp_path):
    server.script = ["ok:<think>sounds low</think><response>That sounds hard. Want to talk?</response>"]
    m = make(server, tmp_path, system="You are a kind listener.", temperature=None)
    (p,) = m.predict(rows[:1], "respond", CFG, LABELS)
    body = server.seen[0]["body"]
    assert body["messages"][0] == {"role": "system", "content": "You are a kind listener."}
    assert "temperature" not in body and "max_tokens" not in body and server.seen[0]["auth"] is None
    assert p.response == "That sounds hard. Want to talk?" and p.label is None and p.correct is None


def test_429_with_retry_after_is_honoured_then_succeeds(server, rows, tmp_path):
    server.script = ["429:1"]
    m = make(server, tmp_path, backoff=0.01)
    (p,) = m.predict(rows[:1], "classify", CFG, LABELS)
    assert p.label == "negative" and len(server.seen) == 2
    assert server.seen[1]["t"] - server.seen[0]["t"] >= 0.95  # waited Retry-After, not the 0.01 s backoff
    assert m.stats["requests"] == 2 and m.stats["retries"] == 1 and m.stats["failures"] == 0


def test_500_then_success_is_retried(server, rows, tmp_path):
    server.script = ["500"]
    m = make(server, tmp_path)
    (p,) = m.predict(rows[:1], "classify", CFG, LABELS)
    assert p.label == "negative" and p.output == GOOD and len(server.seen) == 2


def test_timeout_is_retried(server, rows, tmp_path):
    server.script = ["sleep:1.0"]
    m = make(server, tmp_path, timeout=0.3)
    (p,) = m.predict(rows[:1], "classify", CFG, LABELS)
    assert p.label == "negative" and len(server.seen) == 2 and m.stats["retries"] == 1


def test_garbage_answers_are_unparsable_predictions_not_crashes(server, rows, tmp_path):
    server.script = ["ok:I would rather not say.", "notjson", "ok:positive or negative, hard to tell"]
    m = make(server, tmp_path, max_concurrency=1)
    preds = m.predict(rows, "classify", CFG, LABELS)
    assert [p.id for p in preds] == ["r0", "r1", "r2"]
    assert preds[0].output == "I would rather not say." and preds[0].label is None and preds[0].correct is False
    assert preds[1].output == "" and preds[1].label is None and preds[1].correct is False
    assert "not JSON" in m.errors["r1"]  # and not retried: it would come back the same
    assert preds[2].label is None and not preds[2].format_ok  # two labels: refused, never guessed
    assert len(server.seen) == 3 and set(m.errors) == {"r1"}
    assert classification_metrics(preds, rows, LABELS)["subsets"]["all"]["parse_rate"] == 0.0
    # well-formed JSON without an answer in it
    server.script = ["nochoices"]
    (p,) = make(server, tmp_path, cache_dir=None).predict(rows[1:2], "classify", CFG, LABELS)
    assert p.output == "" and p.label is None and len(server.seen) == 4


def test_failure_after_retries_is_unparsable_and_partial_results_are_kept(server, rows, tmp_path):
    # r0 is answered; r1 gets 500 on every attempt (1 + 2 retries); r2 is answered.
    server.script = ["ok", "500", "500", "500", "ok"]
    m = make(server, tmp_path, retries=2, max_concurrency=1)
    preds = m.predict(rows, "classify", CFG, LABELS)
    assert [p.label for p in preds] == ["negative", None, "negative"]
    assert preds[1].output == "" and m.errors == {"r1": m.errors["r1"]} and "HTTP 500" in m.errors["r1"]
    assert len(server.seen) == 5 and m.stats["failures"] == 1
    # A new run (an interrupted evaluation resumed) asks only for the row that failed.
    again = make(server, tmp_path, retries=2)
    preds = again.predict(rows, "classify", CFG, LABELS)
    assert [p.label for p in preds] == ["negative"] * 3
    assert len(server.seen) == 6 and again.stats["cache_hits"] == 2 and again.stats["requests"] == 1


def test_cache_hit_makes_no_second_request(server, rows, tmp_path):
    first = make(server, tmp_path).predict(rows, "classify", CFG, LABELS)
    assert len(server.seen) == 3
    fresh = make(server, tmp_path)  # a new process reads the disk cache
    second = fresh.predict(rows, "classify", CFG, LABELS)
    assert len(server.seen) == 3 and fresh.stats == {"requests": 0, "retries": 0, "cache_hits": 3, "failures": 0}
    assert [p.output for p in second] == [p.output for p in first]
    lines = [json.loads(x) for x in (tmp_path / "cache" / "test-model.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(len(x["key"]) == 64 and x["output"] == GOOD for x in lines)
    assert lines[0]["usage"] == {"prompt_tokens": 100, "completion_tokens": 20}
    # The key covers the prompt, the audio and the model: any change is a new request.
    make(server, tmp_path).predict(rows[:1], "classify", CFG.model_copy(update={"transcript": False}), LABELS)
    assert len(server.seen) == 4
    make(server, tmp_path).predict(rows[:1], "classify", CFG, LABELS, audio_fn=lambda r: np.zeros(8000, np.float32))
    assert len(server.seen) == 5
    ApiAudioModel("test-model", "other-model", server.url, None, cache_dir=tmp_path / "cache").predict(
        rows[:1], "classify", CFG, LABELS)
    assert len(server.seen) == 6


def test_duplicate_clips_are_asked_once_and_progress_reaches_total(server, rows, tmp_path):
    calls = []
    preds = make(server, tmp_path).predict(rows[:2] + [rows[0].model_copy(update={"id": "dup"})], "classify", CFG,
                                           LABELS, progress=lambda d, t: calls.append((d, t)))
    assert len(server.seen) == 2 and [p.id for p in preds] == ["r0", "r1", "dup"] and preds[2].label == "negative"
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)


def test_concurrency_limit_and_rate_limit(server, rows, tmp_path):
    many = [r.model_copy(update={"id": f"{r.id}-{k}", "transcript": f"words {k}"}) for k in range(2) for r in rows]
    server.script = ["sleep:0.15"] * 6
    make(server, tmp_path, max_concurrency=2, cache_dir=None).predict(many, "classify", CFG, LABELS)
    assert len(server.seen) == 6 and server.max_inflight == 2
    server.seen.clear()
    make(server, tmp_path, max_concurrency=4, rpm=600, cache_dir=None).predict(many[:4], "classify", CFG, LABELS)
    starts = sorted(s["t"] for s in server.seen)
    assert len(starts) == 4 and starts[-1] - starts[0] >= 0.27  # 600/min: one start per 0.1 s


def test_rejected_key_stops_the_run_with_a_clear_error(server, rows, tmp_path, monkeypatch):
    monkeypatch.setenv("PALLM_TEST_API_KEY", "sk-wrong")
    server.script = ["401"] * 10
    with pytest.raises(PallmError, match=r"test-model: the API rejected the key \(key from PALLM_TEST_API_KEY\)"):
        make(server, tmp_path, max_concurrency=1).predict(rows, "classify", CFG, LABELS)
    assert len(server.seen) == 1  # not retried, and the other rows were not sent


def test_missing_key_skips_with_a_note(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    models = available_api_models(cache_dir=tmp_path)
    assert models == {"gpt-4o-audio": "OPENAI_API_KEY not set: gpt-4o-audio skipped",
                      "gemini-2.5-pro": "GEMINI_API_KEY not set: gemini-2.5-pro skipped"}
    monkeypatch.setenv("GEMINI_API_KEY", "g-key")
    monkeypatch.delenv("GEMINI_BASE_URL", raising=False)
    models = available_api_models(cache_dir=tmp_path, rpm=30)
    gem = models["gemini-2.5-pro"]
    assert isinstance(gem, ApiAudioModel) and isinstance(models["gpt-4o-audio"], str)
    assert gem.model == "gemini-2.5-pro" and gem.headers["Authorization"] == "Bearer g-key"
    assert gem.url == "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
    assert gem.limiter.interval == pytest.approx(2.0)
    monkeypatch.setenv("OPENAI_API_KEY", "o-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    gpt = available_api_models(cache_dir=tmp_path, names=["gpt-4o-audio"])
    assert list(gpt) == ["gpt-4o-audio"] and gpt["gpt-4o-audio"].model == "gpt-4o-audio-preview"
    assert gpt["gpt-4o-audio"].url == "http://127.0.0.1:1/v1/chat/completions"
    with pytest.raises(PallmError, match="unknown API model"):
        available_api_models(names=["gpt-5-audio"])


# --- shared helpers (pallm.api) -------------------------------------------------------------------


def test_retry_after_parsing():
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "3"}) == 0.25
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({"Retry-After": "soon"}) is None and parse_retry_after({}) is None


def test_jsonl_cache_survives_a_torn_line(tmp_path):
    c = JsonlCache(tmp_path / "c.jsonl")
    c.put("a", {"output": "x"})
    with (tmp_path / "c.jsonl").open("a") as f:
        f.write('{"key": "b", "outp')  # a crash mid-write
    c2 = JsonlCache(tmp_path / "c.jsonl")
    assert c2.get("a") == {"key": "a", "output": "x"} and "b" not in c2 and len(c2) == 1
    assert request_key("ab", "c") != request_key("a", "bc") and request_key(b"x") == request_key("x")


def test_rate_limiter_pause_holds_everyone():
    lim = RateLimiter(None)
    lim.pause(0.2)
    t0 = time.monotonic()
    lim.wait()
    assert time.monotonic() - t0 >= 0.18
    with pytest.raises(PallmError):
        RateLimiter(0)


def test_wav_bytes_clips_instead_of_wrapping():
    data, sr = sf.read(io.BytesIO(wav_bytes(np.array([0.5, 1.7, -2.0], np.float32))), dtype="float32")
    assert sr == 16_000 and data[1] > 0.99 and data[2] < -0.99


# --- API models and the LLM judge as rows of `pallm run` (run_pipeline) ---------------------------

REPLY = "<think>you sound low</think><response>That sounds hard, but you sound calm about it. Want to talk?</response>"


def _route(body):
    """The fake server as an audio model (classify / respond) and as the LLM judge."""
    msgs = body["messages"]
    if msgs[0]["role"] == "system" and "You grade a reply" in msgs[0]["content"]:
        # The judge: a reply to the row whose transcript says FAILME gets an answer without a score.
        return "ok:no score today" if "FAILME" in msgs[1]["content"] else 'ok:{"score": 7, "reason": "fits"}'
    text = msgs[-1]["content"][-1]["text"]
    return f"ok:{REPLY}" if "<response>" in text else "ok"


@pytest.fixture
def run_corpus(tmp_path):
    """8 train + 4 test rows (noise clips), labels, conflict flags and reference replies."""
    from pallm.data.manifest import write_manifest

    rng = np.random.default_rng(1)
    (tmp_path / "corpus").mkdir()
    rows = []
    sents = ["negative", "neutral", "positive", "negative"]
    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            name = f"{split}{i}.wav"
            sf.write(tmp_path / "corpus" / name, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16_000)
            s = sents[i % 4]
            rows.append(Row(id=f"{split}{i}", audio=name, corpus="t", speaker=f"{split}-s{i % 2}", split=split,
                            sentiment=s, lexical_sentiment=s if i % 2 == 0 else "positive", congruent=i % 2 == 0,
                            transcript=("FAILME said" if (split, i) == ("test", 3) else f"{split} words {s} {i}"),
                            response="I hear you."))
    write_manifest(rows, tmp_path / "corpus")
    return tmp_path / "corpus"


def _pipeline(tmp_path, corpus, *overrides):
    import contextlib

    from pallm.config import build_config
    from pallm.pipeline import RunConfig, run_pipeline

    @contextlib.contextmanager
    def quiet(_description):
        yield lambda done, total: None

    cfg = build_config(RunConfig, overrides=[
        f"data.corpus={corpus}", "data.measure_cues=false", "stages=[]", "ablations=[]",
        "baselines=[text,api:gpt-4o-audio]", f"eval.api.cache_dir={tmp_path / 'api-cache'}", "eval.api.retries=0",
        "eval.api.max_concurrency=1", "eval.api.probes=true", *overrides])
    said = []
    results = run_pipeline(cfg, tmp_path / "run", say=said.append, progress_factory=quiet)
    return results, (tmp_path / "run" / "report.md").read_text(), json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_run_without_key_skips_the_api_row_with_a_note(run_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    results, report, metrics = _pipeline(tmp_path, run_corpus)
    assert list(metrics["models"]) == ["text TF-IDF + LR"]  # the run did not fail
    note = "OPENAI_API_KEY not set: gpt-4o-audio skipped"
    assert any(note in n for n in metrics["notes"]) and note in report


def test_api_row_in_the_run_cached_partial_and_resumable(server, run_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    server.route = _route
    server.script = ["500"]  # the first request fails for good (retries=0): that row is unparsable
    results, report, metrics = _pipeline(tmp_path, run_corpus)
    row = metrics["models"]["gpt-4o-audio (API)"]
    assert row["kind"] == "api" and row["api"]["model"] == "gpt-4o-audio-preview"
    assert {"all", "congruent", "conflict"} <= set(row["metrics"]["subsets"])
    assert row["metrics"]["subsets"]["all"]["parse_rate"] == 0.75  # 3 of 4 answered (GOOD: negative)
    assert row["metrics"]["subsets"]["all"]["n"] == 4 and "probes" in row and row["probes"]["silence"]["n"] == 4
    assert row["response"]["n"] == 4 and row["response"]["format_rate"] == 1.0
    assert any("1 answer(s) still failed" in n for n in metrics["notes"]) and "gpt-4o-audio (API)" in report
    assert (tmp_path / "run" / "eval" / "api-gpt-4o-audio" / "predictions.jsonl").exists()
    n_first = len(server.seen)
    assert n_first == 4 + 4 + 4  # classify (one of them failed), silence probe, replies
    # A re-run (same config, same folder) asks only for what is not cached: the failed row.
    results, report, metrics = _pipeline(tmp_path, run_corpus)
    assert len(server.seen) == n_first + 1
    assert metrics["models"]["gpt-4o-audio (API)"]["metrics"]["subsets"]["all"]["parse_rate"] == 1.0
    assert metrics["models"]["gpt-4o-audio (API)"]["api"]["cache_hits"] == 11
    assert not any("still failed" in n for n in metrics["notes"])


def test_llm_judge_scores_replies_next_to_the_embedded_judge(server, run_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("PALLM_JUDGE_KEY", "sk-judge")
    server.route = _route
    results, report, metrics = _pipeline(
        tmp_path, run_corpus, f"eval.llm_judge={{base_url: '{server.url}', model: judge-x, api_key_env: PALLM_JUDGE_KEY,"
        f" retries: 0, cache_dir: '{tmp_path / 'judge-cache'}'}}")
    resp = metrics["models"]["gpt-4o-audio (API)"]["response"]
    # 3 replies scored 7/10 -> (7-1)/9; the FAILME row's judge answer had no score: a failure, not a crash.
    assert resp["llm_judge"] == pytest.approx(6 / 9) and resp["llm_judge_failures"] == 1
    assert 0 <= resp["judge"] <= 1  # the embedded judge is still there
    assert resp["subsets"]["conflict"]["llm_judge_failures"] == 1  # test row 3 is a conflict row
    judged = [s for s in server.seen if s["body"]["messages"][0]["role"] == "system"]
    assert len(judged) == 4 and {s["auth"] for s in judged} == {"Bearer sk-judge"}
    assert judged[0]["body"]["model"] == "judge-x"
    assert "| LLM judge |" in report and "LLM judge failures" in report
    assert any("1 of 4 replies could not be scored" in n for n in metrics["notes"])
    assert metrics["llm_judge"]["failures"] == 1


def test_unreachable_llm_judge_costs_scores_not_the_run(server, run_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    server.route = _route
    results, report, metrics = _pipeline(
        tmp_path, run_corpus, "eval.llm_judge={base_url: 'http://127.0.0.1:9/v1', model: j, api_key_env: null,"
        " retries: 0, timeout: 2}")
    resp = metrics["models"]["gpt-4o-audio (API)"]["response"]
    assert resp["llm_judge"] is None and resp["llm_judge_failures"] == 4
    assert any("4 of 4 replies could not be scored" in n for n in metrics["notes"])


def test_pallm_eval_respond_uses_the_configured_llm_judge(server, run_corpus, tmp_path, monkeypatch):
    """`pallm eval --task respond` with eval.llm_judge set (as an override, as in a --config file):
    the replies are also sent to the LLM judge, and its score and failures land in metrics.json."""
    from typer.testing import CliRunner

    import pallm.evaluate
    from pallm.cli.main import app
    from pallm.data.manifest import read_manifest
    from pallm.evaluate.predict import Prediction
    from pallm.model import build_tiny, save_checkpoint
    from pallm.prompts.format import PromptConfig, build_prompt, build_target

    server.route = _route

    def replies(model, processor, rows, task, *a, **kw):  # the untrained model writes no reply: give it one
        return [Prediction(r.id, task, REPLY, None, None, None, True, response=REPLY.split("<response>")[1][:-11])
                for r in rows]

    monkeypatch.setattr(pallm.evaluate, "predict", replies)
    rows = read_manifest(run_corpus)
    texts = [build_prompt(t, r, PromptConfig(cot=False)) + build_target(t, r, PromptConfig(cot=False))
             for r in rows for t in ("classify", "respond")]
    model, processor = build_tiny(texts)
    save_checkpoint(model, processor, tmp_path / "ckpt", {"task_format": PromptConfig(cot=False).model_dump()})
    judge = (f"eval.llm_judge={{base_url: '{server.url}', model: judge-x, api_key_env: null, retries: 0,"
             f" cache_dir: '{tmp_path / 'jc'}'}}")
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "ckpt"), "--data", str(run_corpus), "--task", "respond",
                                   "--out", str(tmp_path / "ev"), judge], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    resp = json.loads((tmp_path / "ev" / "metrics.json").read_text())["response"]
    judged = [s for s in server.seen if s["body"]["messages"][0]["role"] == "system"]
    assert judged and all(s["body"]["model"] == "judge-x" for s in judged)
    # 4 test rows; the one whose transcript says FAILME gets a judge answer without a score
    assert resp["llm_judge"] == pytest.approx(6 / 9) and resp["llm_judge_failures"] == 1
    assert "llm_judge 0.667" in res.output
    # without the block: the embedded judge only, no request
    n = len(server.seen)
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "ckpt"), "--data", str(run_corpus), "--task", "respond",
                                   "--out", str(tmp_path / "ev2")], catch_exceptions=False)
    assert res.exit_code == 0 and len(server.seen) == n
    assert "llm_judge" not in json.loads((tmp_path / "ev2" / "metrics.json").read_text())["response"]
