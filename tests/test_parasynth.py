from collections import Counter

import numpy as np
import pytest

from pallm.config import build_config
from pallm.data.audio import load_audio
from pallm.data.manifest import read_manifest
from pallm.data.parasynth import SynthConfig, ensure_parasynth, synthesize
from pallm.data.parasynth.espeak import Prosody, get_engine
from pallm.data.parasynth.generate import load_responses, load_sentences, plan_corpus
from pallm.errors import ConfigError, ManifestError, PallmError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("ps")
    stats = synthesize(SynthConfig(n=240, seed=3, workers=2), out)
    return out, stats, read_manifest(out)


def test_corpus_shape_and_files(corpus):
    out, stats, rows = corpus
    assert stats["n"] == len(rows) == 240
    assert Counter(r.split for r in rows) == {"train": 168, "dev": 24, "test": 48}
    for r in rows[:20]:
        wav = load_audio(r.audio)
        assert 0.8 < len(wav) / 16000 < 8 and abs(len(wav) / 16000 - r.duration) < 0.01
        assert np.abs(wav).max() > 0.05
    assert all(r.corpus == "parasynth" and r.response and r.transcript for r in rows)


def test_splits_are_speaker_and_sentence_independent(corpus):
    _, _, rows = corpus
    by = {s: [r for r in rows if r.split == s] for s in ("train", "dev", "test")}
    for a, b in (("train", "test"), ("train", "dev"), ("dev", "test")):
        assert not {r.speaker for r in by[a]} & {r.speaker for r in by[b]}
        assert not {r.transcript for r in by[a]} & {r.transcript for r in by[b]}


def test_congruence_and_balance(corpus):
    _, _, rows = corpus
    for r in rows:
        assert r.congruent == (r.lexical_sentiment == r.sentiment)
        assert r.sentiment == {"happy": "positive", "neutral": "neutral", "sad": "negative", "angry": "negative"}[r.emotion]
    test = [r for r in rows if r.split == "test"]
    assert sum(r.congruent for r in test) == len(test) // 2
    assert set(Counter(r.sentiment for r in test).values()) == {16}
    train = [r for r in rows if r.split == "train"]
    assert sum(r.congruent for r in train) / len(train) == pytest.approx(0.8, abs=0.01)
    # Words are a real sentiment signal: the transcript's class is the sentence bank's class.
    lexical = {s["text"]: s["lexical"] for s in load_sentences()}
    assert all(lexical[r.transcript] == r.lexical_sentiment for r in rows)


def test_deterministic_given_seed(corpus, tmp_path):
    out, _, rows = corpus
    synthesize(SynthConfig(n=240, seed=3, workers=1), tmp_path)
    again = read_manifest(tmp_path)
    strip = lambda rs: [{k: v for k, v in r.to_json().items() if k != "audio"} for r in rs]  # noqa: E731
    assert strip(again) == strip(rows)
    # Bit-identical audio whatever the number of workers (eSpeak has history and a noise source).
    for r in rows:
        assert (tmp_path / "audio" / f"{r.id}.wav").read_bytes() == (out / "audio" / f"{r.id}.wav").read_bytes(), r.id
    other = plan_corpus(SynthConfig(n=240, seed=4))
    assert [p["transcript"] for p in other] != [r.transcript for r in rows]


def test_prosody_styles_move_the_acoustics_the_right_way():
    """Same speaker, same sentence: sad is slower, quieter; angry is louder; happy is higher."""
    from pallm.data.parasynth.generate import load_styles

    styles = load_styles()["styles"]
    engine = get_engine()
    base = {"pitch": 45, "range": 50, "rate": 175, "volume": 100}

    def render(style):
        s = styles[style]
        p = Prosody(pitch=base["pitch"] + s["pitch"], range=base["range"] + s["range"],
                    rate=int(base["rate"] * s["rate"]), volume=int(base["volume"] * s["volume"]))
        return engine.synth("We are meeting at the library after lunch.", "en-us+m3", p)

    wavs = {s: render(s) for s in ("neutral", "happy", "sad", "angry")}
    rms = {s: float(np.sqrt(np.mean(w ** 2))) for s, w in wavs.items()}
    assert len(wavs["sad"]) > 1.2 * len(wavs["neutral"]) > 1.2 * len(wavs["angry"])
    assert rms["angry"] > 1.4 * rms["neutral"] > 1.4 * rms["sad"]

    def f0(w):  # autocorrelation pitch on the loudest 200 ms, enough to order the styles
        sr = engine.sample_rate
        i = int(np.argmax(np.convolve(w ** 2, np.ones(sr // 5), "valid")))
        seg = w[i : i + sr // 5] - w[i : i + sr // 5].mean()
        ac = np.correlate(seg, seg, "full")[len(seg) - 1 :]
        lo, hi = sr // 400, sr // 60
        return sr / (lo + np.argmax(ac[lo:hi]))

    assert f0(wavs["happy"]) > f0(wavs["neutral"]) > f0(wavs["sad"])


def test_refuses_overwrite_and_ensure_caches(tmp_path):
    cfg = SynthConfig(n=24, speakers=8, test_speakers=2, dev_speakers=2, workers=1)
    out, reused = ensure_parasynth(cfg, tmp_path / "c")
    assert not reused
    mtime = (out / "manifest.jsonl").stat().st_mtime_ns
    out, reused = ensure_parasynth(cfg, tmp_path / "c")
    assert reused and (out / "manifest.jsonl").stat().st_mtime_ns == mtime
    with pytest.raises(ManifestError, match="--overwrite"):
        synthesize(cfg, out)
    # A user's own manifest in the way is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.jsonl").write_text("{}\n")
    with pytest.raises(ManifestError, match="did not write"):
        ensure_parasynth(cfg, tmp_path / "mine")


def test_reference_replies_fit_the_voice(corpus):
    _, _, rows = corpus
    responses = load_responses()
    for r in rows:
        templates = responses[r.emotion][r.lexical_sentiment]
        assert any(t.split("{topic}")[0] in r.response for t in templates)


def test_bad_config_and_voice():
    with pytest.raises(ConfigError, match="unknown emotions"):
        build_config(SynthConfig, overrides=["emotions=[happy,bored]"])
    with pytest.raises(ConfigError, match="speakers"):
        build_config(SynthConfig, overrides=["speakers=8", "test_speakers=6", "dev_speakers=2"])
    with pytest.raises(PallmError, match="voice"):
        get_engine().synth("hello", "xx-nonexistent+m1", Prosody())


def test_style_strength_scales_offsets_from_the_speaker():
    """The difficulty dial: offsets from each speaker's baseline grow with style_strength, the
    plan is otherwise the same, and the default keeps the fingerprint (and cache) of old corpora."""
    import statistics

    def spread(strength: float, key: str) -> dict[str, float]:
        plan = plan_corpus(SynthConfig(n=600, seed=1, style_strength=strength))
        by = {}
        for u in plan:
            by.setdefault(u["emotion"], []).append(u["prosody"][key])
        return {e: statistics.fmean(v) for e, v in by.items()}

    for key in ("pitch", "volume"):
        weak, strong = spread(1.0, key), spread(1.6, key)
        assert strong["sad"] < weak["sad"] < weak["neutral"] < weak["happy"] < strong["happy"], key
        assert abs(strong["neutral"] - weak["neutral"]) < 1.5  # neutral has no offset to scale
    a, b = plan_corpus(SynthConfig(n=60, seed=1)), plan_corpus(SynthConfig(n=60, seed=1, style_strength=1.6))
    assert [(u["speaker"], u["emotion"], u["transcript"]) for u in a] == [(u["speaker"], u["emotion"], u["transcript"]) for u in b]
    assert SynthConfig(style_strength=1.0).fingerprint() != SynthConfig(style_strength=1.6).fingerprint()
    # A strength-1 corpus made before the dial existed keeps its fingerprint (and cache folder).
    assert SynthConfig(style_strength=1.0).fingerprint() == "fd7cd4c8fb9c"
