"""Generate ParaSynth.

The plan (who says which sentence in which style) is drawn in the main process from one seeded
RNG, so the corpus is a pure function of (config, seed); the workers only render audio.

Splits are speaker- AND sentence-independent: test speakers and test sentences never occur in
training, so a model can only score on test by hearing prosody it has learned in general, not by
memorising voices or sentences. Train is mostly congruent (words and voice agree), which is what
invites the lexical shortcut; test is half congruent, half conflict, which exposes it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import soxr
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pallm.data.audio import SAMPLE_RATE, write_audio
from pallm.data.manifest import MANIFEST_NAME, SENTIMENTS, Row, write_manifest
from pallm.errors import ConfigError, ManifestError

# eSpeak English voices (accents) x voice variants (m* male, f* female) make the speaker pool.
ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
META_NAME = "parasynth.json"
GENERATOR_VERSION = 2


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(3000, ge=12, description="utterances in all splits")
    seed: int = 0
    emotions: list[str] = ["neutral", "happy", "sad", "angry"]
    speakers: int = Field(40, ge=6)
    test_speakers: int = Field(8, ge=1)
    dev_speakers: int = Field(4, ge=1)
    split_shares: dict[str, float] = {"train": 0.7, "dev": 0.1, "test": 0.2}
    sentence_shares: dict[str, float] = {"train": 0.7, "dev": 0.1, "test": 0.2}
    train_congruent: float = Field(0.8, ge=0.0, le=1.0)
    dev_congruent: float = Field(0.5, ge=0.0, le=1.0)
    # Scales every style's offset from the speaker's baseline (pitch/range offsets, rate/volume
    # factors' distance from 1): the corpus's difficulty dial. 1 = styles.yaml as written. At 1 the
    # voice is barely recoverable from ONE clip (speakers differ more than styles do: eGeMAPS + LR
    # without speaker normalisation 0.64 UA), so no single-clip model can follow it; at 1.6 that
    # is 0.78 while the words still pull a transcript-reading model off (docs/stage2_experiments.md).
    style_strength: float = Field(1.6, gt=0.0, le=3.0)
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        styles = load_styles()["styles"]
        unknown = [e for e in self.emotions if e not in styles]
        if unknown:
            raise ValueError(f"unknown emotions {unknown}; styles.yaml defines {sorted(styles)}")
        if self.test_speakers + self.dev_speakers >= self.speakers:
            raise ValueError("speakers must exceed test_speakers + dev_speakers")
        if self.speakers > len(ACCENTS) * len(VARIANTS):
            raise ValueError(f"at most {len(ACCENTS) * len(VARIANTS)} speakers")
        for name in ("split_shares", "sentence_shares"):
            shares = getattr(self, name)
            if set(shares) != {"train", "dev", "test"} or abs(sum(shares.values()) - 1) > 1e-6:
                raise ValueError(f"{name} needs train/dev/test shares summing to 1")
        return self

    def fingerprint(self) -> str:
        payload = self.model_dump(exclude={"workers"})
        if payload["style_strength"] == 1.0:
            del payload["style_strength"]  # corpora made before the dial existed keep their cache
        payload["version"] = GENERATOR_VERSION
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _load_yaml(name: str) -> dict:
    return yaml.safe_load(resources.files("pallm.data.parasynth").joinpath(name).read_text(encoding="utf-8"))


def load_styles() -> dict:
    return _load_yaml("styles.yaml")


def load_sentences() -> list[dict]:
    return _load_yaml("sentences.yaml")


def load_responses() -> dict:
    return _load_yaml("responses.yaml")


def _split_sentences(sentences: list[dict], shares: dict[str, float], rng: random.Random) -> dict[str, dict[str, list[dict]]]:
    """Per lexical class, disjoint sentence pools for train/dev/test."""
    pools: dict[str, dict[str, list[dict]]] = {s: {} for s in ("train", "dev", "test")}
    for lex in SENTIMENTS:
        group = [s for s in sentences if s["lexical"] == lex]
        rng.shuffle(group)
        n_test = max(1, round(len(group) * shares["test"]))
        n_dev = max(1, round(len(group) * shares["dev"]))
        pools["test"][lex] = group[:n_test]
        pools["dev"][lex] = group[n_test : n_test + n_dev]
        pools["train"][lex] = group[n_test + n_dev :]
    return pools


def _make_speakers(cfg: SynthConfig, rng: random.Random) -> dict[str, list[dict]]:
    combos = [(a, v) for a in ACCENTS for v in VARIANTS]
    rng.shuffle(combos)
    speakers = []
    for i, (accent, variant) in enumerate(combos[: cfg.speakers]):
        speakers.append({
            "speaker": f"ps{i:03d}",
            "voice": f"{accent}+{variant}",
            "gender": "male" if variant.startswith("m") else "female",
            # Each speaker has their own habitual pitch, range, rate and loudness.
            "pitch": rng.uniform(30, 62),
            "range": rng.uniform(38, 62),
            "rate": rng.uniform(165, 200),
            "volume": rng.uniform(80, 120),
        })
    # Alternate genders into the held-out groups so test is not single-gender by chance.
    speakers.sort(key=lambda s: (s["gender"], s["speaker"]))
    interleaved = [s for pair in zip(speakers[::2], speakers[1::2]) for s in pair] + speakers[len(speakers) // 2 * 2 :]
    t, d = cfg.test_speakers, cfg.dev_speakers
    return {"test": interleaved[:t], "dev": interleaved[t : t + d], "train": interleaved[t + d :]}


def _prosody(speaker: dict, style: dict, jitter: dict, rng: random.Random, strength: float = 1.0) -> dict:
    def clamp(x, lo, hi):
        return int(round(min(max(x, lo), hi)))

    def factor(f: float) -> float:
        return 1 + (f - 1) * strength

    return {
        "pitch": clamp(speaker["pitch"] + strength * style["pitch"] + rng.gauss(0, jitter["pitch"]), 0, 100),
        "range": clamp(speaker["range"] + strength * style["range"] + rng.gauss(0, jitter["range"]), 0, 100),
        "rate": clamp(speaker["rate"] * factor(style["rate"]) * (1 + rng.gauss(0, jitter["rate"])), 80, 450),
        "volume": clamp(speaker["volume"] * factor(style["volume"]) * (1 + rng.gauss(0, jitter["volume"])), 5, 200),
    }


def plan_corpus(cfg: SynthConfig) -> list[dict]:
    """Every row's fields plus the eSpeak voice and prosody that render it."""
    rng = random.Random(cfg.seed)
    styles_doc = load_styles()
    styles, jitter = styles_doc["styles"], styles_doc["jitter_sd"]
    by_sentiment: dict[str, list[str]] = {}
    for emo in cfg.emotions:
        by_sentiment.setdefault(styles[emo]["sentiment"], []).append(emo)
    if len(by_sentiment) < 2:
        raise ConfigError("synth emotions must cover at least two sentiments.")
    sentiments = sorted(by_sentiment)
    sentence_pools = _split_sentences(load_sentences(), cfg.sentence_shares, rng)
    speaker_pools = _make_speakers(cfg, rng)
    responses = load_responses()

    plan = []
    counts = {"test": round(cfg.n * cfg.split_shares["test"]), "dev": round(cfg.n * cfg.split_shares["dev"])}
    counts["train"] = cfg.n - counts["test"] - counts["dev"]
    congruent_share = {"train": cfg.train_congruent, "dev": cfg.dev_congruent, "test": 0.5}
    for split in ("train", "dev", "test"):
        n = counts[split]
        # Exact shares, shuffled: test is exactly half conflict, sentiments exactly balanced.
        n_cong = round(n * congruent_share[split])
        congruent = [True] * n_cong + [False] * (n - n_cong)
        voice_sent = [sentiments[i % len(sentiments)] for i in range(n)]
        rng.shuffle(congruent)
        rng.shuffle(voice_sent)
        speakers = speaker_pools[split]
        for i in range(n):
            sent = voice_sent[i]
            emotion = rng.choice(by_sentiment[sent])
            lex = sent if congruent[i] else rng.choice([s for s in SENTIMENTS if s != sent])
            sentence = rng.choice(sentence_pools[split][lex])
            speaker = speakers[i % len(speakers)]
            template = rng.choice(responses[emotion if emotion in responses else _nearest_style(emotion, styles)][lex])
            uid = f"parasynth_{split}_{i:05d}"
            plan.append({
                "id": uid,
                "audio": f"audio/{uid}.wav",
                "corpus": "parasynth",
                "speaker": speaker["speaker"],
                "split": split,
                "emotion": emotion,
                "sentiment": sent,
                "transcript": sentence["text"],
                "lexical_sentiment": lex,
                "congruent": lex == sent,
                "gender": speaker["gender"],
                "response": template.replace("{topic}", sentence["topic"]),
                "voice": speaker["voice"],
                "prosody": _prosody(speaker, styles[emotion], jitter, rng, cfg.style_strength),
            })
    return plan


def _nearest_style(emotion: str, styles: dict) -> str:
    """Reply templates exist for the four core styles; extra styles borrow their sentiment's."""
    return {"positive": "happy", "neutral": "neutral", "negative": "sad"}[styles[emotion]["sentiment"]]


CHUNK = 150


def _render_chunk(jobs: list[tuple[str, str, str, dict, int]]) -> list[float]:
    """Worker: synthesise utterances, resample to 16 kHz, write them; returns their durations.

    eSpeak keeps internal state from one utterance to the next (a few samples of difference), so
    bit-identical output needs the same history for every utterance: chunks are fixed by index and
    each chunk is rendered in a fresh process, whatever the number of workers; and eSpeak's noise
    generator is seeded per utterance.
    """
    from pallm.data.parasynth.espeak import Prosody, get_engine

    engine = get_engine()
    durations = []
    for path, text, voice, prosody, seed in jobs:
        wav = engine.synth(text, voice, Prosody(**prosody), seed=seed)
        wav = soxr.resample(wav, engine.sample_rate, SAMPLE_RATE).astype(np.float32)
        write_audio(path, np.clip(wav, -1.0, 1.0))
        durations.append(len(wav) / SAMPLE_RATE)
    return durations


def synthesize(cfg: SynthConfig, out: str | os.PathLike, overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ParaSynth into `out` (manifest.jsonl, audio/, parasynth.json). Returns stats."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise ManifestError(f"{out / MANIFEST_NAME} exists. Pass --overwrite to regenerate, or choose another --out.")
    t0 = time.perf_counter()
    plan = plan_corpus(cfg)
    audio_dir = out / "audio"
    if audio_dir.exists() and overwrite:
        shutil.rmtree(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / p["audio"]), p["transcript"], p["voice"], p["prosody"], cfg.seed * 1_000_003 + i)
            for i, p in enumerate(plan)]
    durations: list[float] = []
    chunks = [jobs[i : i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    # forkserver: each chunk's process starts fast (modules preloaded) yet with fresh eSpeak state.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pallm.data.parasynth.generate"])
    with ctx.Pool(cfg.workers, maxtasksperchild=1) as pool:
        for chunk_durations in pool.imap(_render_chunk, chunks):
            durations.extend(chunk_durations)
            if progress:
                progress(len(durations), len(jobs))
    rows = []
    for p, d in zip(plan, durations):
        fields = {k: v for k, v in p.items() if k not in ("voice", "prosody")}
        # The rendering parameters stay in the row: they are the ground truth behind the cues.
        rows.append(Row(**fields, duration=round(d, 3), espeak={"voice": p["voice"], **p["prosody"]}))
    write_manifest(rows, out, overwrite=overwrite)
    elapsed = time.perf_counter() - t0
    stats = {
        "n": len(rows),
        "seconds": round(elapsed, 2),
        "utterances_per_second": round(len(rows) / elapsed, 1),
        "audio_hours": round(sum(durations) / 3600, 3),
        "splits": {s: sum(r.split == s for r in rows) for s in ("train", "dev", "test")},
    }
    (out / META_NAME).write_text(json.dumps({"config": cfg.model_dump(), "fingerprint": cfg.fingerprint(),
                                             "stats": stats}, indent=2))
    return stats


def ensure_parasynth(cfg: SynthConfig, out: str | os.PathLike,
                     progress: Callable[[int, int], None] | None = None) -> tuple[Path, bool]:
    """Reuse `out` when it holds ParaSynth from the same config; else generate. Returns (dir, reused)."""
    out = Path(out)
    meta = out / META_NAME
    if meta.exists() and (out / MANIFEST_NAME).exists():
        if json.loads(meta.read_text()).get("fingerprint") == cfg.fingerprint():
            return out, True
        # A ParaSynth folder from another config is ours to regenerate (it holds only generated data).
        synthesize(cfg, out, overwrite=True, progress=progress)
        return out, False
    if (out / MANIFEST_NAME).exists():
        raise ManifestError(f"{out} holds a manifest that ParaSynth did not write; not overwriting it. Choose another folder.")
    synthesize(cfg, out, progress=progress)
    return out, False
