"""pallm.acoustics on synthetic voices: harmonic buzz with controlled f0, amplitude, syllable rate,
intonation and breath noise, so each test knows which cue must move and which way."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pallm.acoustics import cues as cues_mod
from pallm.acoustics import features
from pallm.acoustics import (
    CUE_LEVELS,
    CUE_NAMES,
    annotate_corpus,
    cue_values,
    extract_functionals,
    level,
    measure_cues,
    speaker_references,
    zscores,
)
from pallm.data.audio import SAMPLE_RATE, write_audio
from pallm.data.manifest import Row, read_manifest
from pallm.errors import AudioError

SR = SAMPLE_RATE


def buzz(f0=150.0, amp=0.1, rate=3.0, duty=0.6, intonation=1.0, noise=0.0, dur=3.0, seed=0):
    """Vowel-like buzz: `rate` voiced syllables/s, f0 swinging +-`intonation` semitones."""
    t = np.arange(int(dur * SR)) / SR
    f = f0 * 2 ** (intonation * np.sin(2 * np.pi * 0.7 * t) / 12)
    phase = 2 * np.pi * np.cumsum(f) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 15))
    on = ((t * rate) % 1.0 < duty).astype(float)
    x = x * np.convolve(on, np.ones(160) / 160, "same")  # 10 ms ramps, no clicks
    x = x + noise * np.random.default_rng(seed).standard_normal(len(t)) * np.abs(x).max()
    return (amp * x / np.abs(x).max()).astype(np.float32)


# One parameter changed per variant, in both directions, so normal utterances sit mid-baseline.
VARIANTS = {
    "pitch_high": dict(f0_mult=1.5), "pitch_low": dict(f0_mult=0.67),
    "loud": dict(amp_mult=3.0), "quiet": dict(amp_mult=1 / 3),
    "fast": dict(rate=6.0, duty=0.5), "slow": dict(rate=1.5),
    "lively": dict(intonation=5.0), "flat": dict(intonation=0.0),
    "breathy": dict(noise=0.3),
}
SPEAKERS = {"A": 100.0, "B": 220.0, "C": 150.0}  # base f0 per speaker
N_NORMAL = 6


def _utterances():
    """(id, speaker, params) for the corpus: 3 full speakers, a sparse one, odd clips."""
    out = []
    for spk, f0 in SPEAKERS.items():
        for k in range(N_NORMAL):  # small natural variation around the speaker's habit
            d = k - (N_NORMAL - 1) / 2
            p = dict(f0=f0 * (1 + 0.01 * d), amp=0.1 * (1 + 0.05 * d), rate=3 + 0.1 * d)
            out.append((f"{spk}_normal{k}", spk, p))
        for name, v in VARIANTS.items():
            p = dict(f0=f0 * v.get("f0_mult", 1.0), amp=0.1 * v.get("amp_mult", 1.0))
            p.update({k: x for k, x in v.items() if not k.endswith("_mult")})
            out.append((f"{spk}_{name}", spk, p))
    # D has B's voice but only 3 utterances: too few for a baseline -> corpus level.
    out += [(f"D_normal{k}", "D", dict(f0=220.0 * (1 + 0.01 * k))) for k in range(3)]
    out += [("X_noise", "X", dict(noise=1e4)), ("X_short", "X", dict(dur=0.05))]  # unvoiced; too short
    return out


def _write_corpus(folder):
    rows = []
    for i, (uid, spk, p) in enumerate(_utterances()):
        write_audio(folder / f"{uid}.wav", buzz(seed=i, **p))
        split = "test" if uid.endswith("normal0") else "train"
        rows.append(dict(id=uid, audio=f"{uid}.wav", corpus="synth", speaker=spk, split=split, note="mine"))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # shared: the corpus is measured once per module


@pytest.fixture(scope="module")
def measured(corpus, cache_dir):
    return {r.id: r for r in measure_cues(read_manifest(corpus), cache_dir, num_workers=1)}


@pytest.fixture
def count_calls(monkeypatch):
    """Count files actually measured (serial path, num_workers=1)."""
    calls = []
    real = features.measure_file

    def counting(path, channel=None):
        calls.append(path)
        return real(path, channel)

    monkeypatch.setattr(features, "measure_file", counting)
    return calls


# ---------------------------------------------------------------- cue directions


@pytest.mark.parametrize("spk", list(SPEAKERS))
@pytest.mark.parametrize(
    "variant,cue,want",
    [
        ("pitch_high", "pitch_level", "high"), ("pitch_low", "pitch_level", "low"),
        ("loud", "loudness", "high"), ("quiet", "loudness", "low"),
        ("fast", "rate", "high"), ("slow", "rate", "low"),
        ("lively", "pitch_variability", "high"), ("flat", "pitch_variability", "low"),
        ("breathy", "voice_quality", "low"),
    ],
)
def test_manipulated_cue_moves_the_right_way(measured, spk, variant, cue, want):
    row = measured[f"{spk}_{variant}"]
    assert row.cues[cue] == want, (row.cues, row.cue_z)


@pytest.mark.parametrize("spk", list(SPEAKERS))
def test_other_cues_stay_put(measured, spk):
    # A louder or faster utterance is not reported as higher-pitched, a higher one not as faster.
    for variant in ("loud", "quiet", "fast", "slow", "lively", "flat", "breathy"):
        assert measured[f"{spk}_{variant}"].cues["pitch_level"] == "mid", variant
    for variant in ("pitch_high", "pitch_low", "loud", "quiet", "lively", "flat", "breathy"):
        assert measured[f"{spk}_{variant}"].cues["rate"] == "mid", variant


def test_speaker_normalisation(measured):
    # B's voice is far higher than A's, yet B's ordinary utterances are mid *for B*.
    for spk in SPEAKERS:
        for k in range(N_NORMAL):
            assert measured[f"{spk}_normal{k}"].cues["pitch_level"] == "mid", (spk, k)
    # ...whereas D (same voice as B, too few utterances) is judged against the corpus: high.
    for k in range(3):
        assert measured[f"D_normal{k}"].cues["pitch_level"] == "high"


def test_corpus_level_z_would_call_high_voice_high(corpus, cache_dir):
    # The counterfactual behind test_speaker_normalisation: one baseline for everyone.
    rows = read_manifest(corpus)
    feats = extract_functionals(rows, cache_dir / "egemaps.parquet", num_workers=1)
    z = zscores(cue_values(feats), ["same"] * len(rows), [r.corpus for r in rows])
    assert level(z.loc["B_normal0", "pitch_level"]) == "high"
    assert level(z.loc["A_normal0", "pitch_level"]) == "low"


def test_gender_baseline_judges_a_voice_against_its_gender(corpus, cache_dir, measured):
    # A (100 Hz) and C (150 Hz) are men, B (220 Hz) a woman; D and the odd clips have no gender.
    gender = {"A": "male", "C": "male", "B": "female"}
    rows = [r.model_copy(update={"gender": gender.get(r.speaker)}) for r in read_manifest(corpus)]
    by_gender = {r.id: r for r in measure_cues(rows, cache_dir, num_workers=1, baseline="gender")}
    for k in range(N_NORMAL):  # ordinary utterances: a deep man sounds low among men, C high
        assert by_gender[f"A_normal{k}"].cues["pitch_level"] == "low"
        assert by_gender[f"C_normal{k}"].cues["pitch_level"] == "high"
        assert by_gender[f"B_normal{k}"].cues["pitch_level"] == measured[f"B_normal{k}"].cues["pitch_level"] == "mid"
    for uid, r in by_gender.items():
        if r.gender is None:  # no gender: the speaker's baseline, as by default
            assert r.cues == measured[uid].cues and r.cue_z == measured[uid].cue_z
        # references still come from the speaker's own voice
        assert r.reference_audio == measured[uid].reference_audio
    with pytest.raises(ValueError, match="baseline"):
        measure_cues(rows, cache_dir, num_workers=1, baseline="age")


def test_unvoiced_and_too_short_clips_omit_cues(measured):
    noise = measured["X_noise"]
    assert "loudness" in noise.cues and "pitch_level" not in noise.cues and "rate" not in noise.cues
    assert measured["X_short"].cues == {} and measured["X_short"].cue_z == {}


def test_cues_and_z_are_consistent(measured):
    for row in measured.values():
        assert set(row.cues) == set(row.cue_z) <= set(CUE_NAMES)
        assert all(row.cues[c] == level(z) and row.cues[c] in CUE_LEVELS for c, z in row.cue_z.items())
        assert all(round(z, 3) == z for z in row.cue_z.values())


def test_threshold_is_configurable(corpus, cache_dir):
    rows = measure_cues(read_manifest(corpus), cache_dir, num_workers=1, threshold=10.0)
    assert {lvl for r in rows for lvl in r.cues.values()} == {"mid"}


def test_min_utterances_fallback_without_corpus_baseline(tmp_path):
    # Two clips in total: no speaker or corpus baseline, so no cue rather than a made-up one.
    for i in range(2):
        write_audio(tmp_path / f"{i}.wav", buzz(f0=120 + 40 * i))
    rows = [Row(id=str(i), audio=str(tmp_path / f"{i}.wav"), corpus="c", speaker="s", split="train") for i in range(2)]
    assert [r.cues for r in measure_cues(rows, tmp_path, num_workers=1)] == [{}, {}]


# ---------------------------------------------------------------- cache, workers, errors


def _small_set(folder, n=5):
    rows = []
    for i in range(n):
        write_audio(folder / f"{i}.wav", buzz(f0=100 + 20 * i, dur=1.0))
        rows.append(Row(id=f"u{i}", audio=str(folder / f"{i}.wav"), corpus="c", speaker="s", split="train"))
    return rows


def test_cache_hit_and_changed_file(tmp_path, count_calls):
    rows = _small_set(tmp_path)
    cache = tmp_path / "c" / "egemaps.parquet"
    first = extract_functionals(rows, cache, num_workers=1)
    assert len(count_calls) == 5 and first.shape == (5, 88) and list(first.index) == ["u0", "u1", "u2", "u3", "u4"]
    count_calls.clear()
    again = extract_functionals(rows, cache, num_workers=1)
    assert count_calls == [] and again.equals(first)

    # Change one file (new content, new mtime): exactly that one is re-measured.
    write_audio(tmp_path / "2.wav", buzz(f0=300, dur=1.0))
    st = os.stat(tmp_path / "2.wav")
    os.utime(tmp_path / "2.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = extract_functionals(rows, cache, num_workers=1)
    assert count_calls == [str(tmp_path / "2.wav")]
    f0 = "F0semitoneFrom27.5Hz_sma3nz_amean"
    assert changed.loc["u2", f0] > first.loc["u2", f0] + 5
    assert changed.drop("u2").equals(first.drop("u2"))


def test_channel_is_part_of_the_key(tmp_path, count_calls):
    stereo = np.stack([buzz(f0=110, dur=1.0), buzz(f0=260, dur=1.0)], axis=1)
    write_audio(tmp_path / "conv.wav", stereo)
    rows = [
        Row(id=f"ch{c}", audio=str(tmp_path / "conv.wav"), corpus="c", speaker=f"s{c}", split="train", channel=c)
        for c in (0, 1)
    ]
    f = extract_functionals(rows, tmp_path / "cache.parquet", num_workers=1)
    assert len(count_calls) == 2
    f0 = "F0semitoneFrom27.5Hz_sma3nz_amean"
    assert f.loc["ch1", f0] - f.loc["ch0", f0] > 12  # 110 -> 260 Hz is ~15 semitones


def test_two_workers_match_serial(corpus, monkeypatch, tmp_path):
    monkeypatch.setattr(features, "_MIN_PARALLEL", 0)  # use the pool even for this small corpus
    rows = read_manifest(corpus)
    seen = []
    par = extract_functionals(rows, tmp_path / "p.parquet", num_workers=2, progress=lambda d, t: seen.append((d, t)))
    ser = extract_functionals(rows, tmp_path / "s.parquet", num_workers=1)
    assert par.equals(ser)
    assert seen[0] == (0, len(rows)) and seen[-1] == (len(rows), len(rows))


def test_missing_audio_names_the_file_before_measuring(tmp_path, count_calls):
    rows = _small_set(tmp_path, 2)
    rows.append(Row(id="gone", audio=str(tmp_path / "nope.wav"), corpus="c", speaker="s", split="train"))
    with pytest.raises(AudioError, match="nope.wav"):
        extract_functionals(rows, tmp_path / "cache.parquet", num_workers=1)
    assert count_calls == []


def test_corrupt_audio_names_the_file_and_keeps_finished_work(tmp_path, count_calls):
    rows = _small_set(tmp_path, features._BATCH)  # one full batch of good files first
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    bad = Row(id="bad", audio=str(tmp_path / "bad.wav"), corpus="c", speaker="s", split="train")
    cache = tmp_path / "cache.parquet"
    with pytest.raises(AudioError, match="bad.wav"):
        extract_functionals(rows + [bad], cache, num_workers=1)
    count_calls.clear()
    extract_functionals(rows, cache, num_workers=1)  # the good batch was saved before the error
    assert count_calls == []


# ---------------------------------------------------------------- speaker references


def test_reference_is_the_speakers_most_typical_other_clip(measured):
    """Each speaker's reference is one of their plain utterances (never a manipulated variant),
    never the row itself, and shared by the speaker's other rows."""
    for spk in SPEAKERS:
        rows = [r for r in measured.values() if r.speaker == spk]
        refs = {r.id: r.reference_audio for r in rows}
        by_audio = {r.audio: r for r in rows}
        assert all(a in by_audio for a in refs.values())  # same speaker
        assert all(by_audio[a].id != i for i, a in refs.items())  # not itself
        assert all("_normal" in by_audio[a].id for a in refs.values()), refs
        assert len(set(refs.values())) == 2  # the reference clip itself hears the runner-up


def test_reference_ranking_prefers_small_z_then_more_cues_then_id():
    def row(i, z):
        return Row(id=i, audio=f"{i}.wav", corpus="c", speaker="s", split="train", cue_z=z)

    rows = [row("a", {"pitch_level": 2.0, "loudness": 0.0}), row("b", {"pitch_level": 0.1, "loudness": -0.1}),
            row("c", {"pitch_level": 0.0}), row("d", {"pitch_level": 0.1, "loudness": 0.1})]
    refs = speaker_references(rows)
    assert refs["a"].id == "b" and refs["c"].id == "b" and refs["b"].id == "d"  # fewer cues rank after
    lone = Row(id="z", audio="z.wav", corpus="c", speaker="solo", split="test")
    assert speaker_references([lone])["z"].id == "z"  # a single clip is its own reference


def test_references_are_written_relative_and_a_users_own_is_kept(corpus, tmp_path):
    folder = _copy_corpus(corpus, tmp_path)
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    lines[0]["reference_audio"] = "my_enrolment.wav"
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    annotate_corpus(folder)
    out = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert out[0]["reference_audio"] == "my_enrolment.wav"
    assert all(not os.path.isabs(r["reference_audio"]) and (folder / r["reference_audio"]).exists() for r in out[1:])
    rows = read_manifest(folder)  # resolved like `audio` on reading
    assert rows[0].reference_audio == str((folder / "my_enrolment.wav").resolve())
    assert all(os.path.isabs(r.reference_audio) for r in rows)


# ---------------------------------------------------------------- annotate_corpus


def test_annotate_corpus_keeps_original_and_is_idempotent(corpus, measured, tmp_path, count_calls):
    folder = _copy_corpus(corpus, tmp_path)
    original = (folder / "manifest.jsonl").read_bytes()

    path = annotate_corpus(folder)
    assert path == folder / "manifest.jsonl"
    assert (folder / "manifest.orig.jsonl").read_bytes() == original
    assert (folder / ".pallm_cache" / "egemaps.parquet").exists()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert all(r["audio"] == f"{r['id']}.wav" and r["note"] == "mine" for r in lines)  # user's paths/fields kept
    assert lines[0]["cues"] and set(lines[0]["cue_z"]) == set(lines[0]["cues"])
    assert {r.id: r.cues for r in read_manifest(folder)} == {i: r.cues for i, r in measured.items()}
    annotated = path.read_bytes()

    count_calls.clear()
    annotate_corpus(folder)  # second run: cache hit, same bytes, backup untouched
    assert count_calls == []
    assert path.read_bytes() == annotated
    assert (folder / "manifest.orig.jsonl").read_bytes() == original
    assert not (folder / "manifest.orig.1.jsonl").exists()

    # The user replaces the manifest with a new one of their own: it is copied aside too.
    mine = b"".join(original.splitlines(keepends=True)[:-2])  # drop the odd clips
    (folder / "manifest.jsonl").write_bytes(mine)
    annotate_corpus(folder)
    assert (folder / "manifest.orig.1.jsonl").read_bytes() == mine
    assert (folder / "manifest.orig.jsonl").read_bytes() == original


def _copy_corpus(src, dst):
    import shutil

    shutil.copytree(src, dst / "corpus")
    return dst / "corpus"


def test_annotate_corpus_missing_audio(tmp_path):
    rows = [dict(id="a", audio="absent.wav", corpus="c", speaker="s", split="train")]
    (tmp_path / "manifest.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(AudioError, match="absent.wav"):
        annotate_corpus(tmp_path)
    assert not (tmp_path / "manifest.orig.jsonl").exists()  # nothing touched on failure


def test_constants():
    assert CUE_NAMES == ("pitch_level", "pitch_variability", "loudness", "rate", "voice_quality")
    assert CUE_LEVELS == ("low", "mid", "high")
    assert set(cues_mod.CUE_FEATURES) == set(CUE_NAMES) <= set(cues_mod.CUE_MEANING)
    assert set(cues_mod.CUE_FEATURES.values()) <= set(features.feature_names())
