"""The few acoustic cues the prompts talk about, binned low/mid/high against the speaker's own voice.

A cue is one eGeMAPS functional, z-scored over all of that speaker's utterances (every split, so
the baseline does not depend on how the corpus was split) and binned at +-0.43, the terciles of a
standard normal: about a third of a speaker's utterances fall in each bin. Speaker-relative because
"high pitch" for a deep voice is normal pitch for a high one; what the model should hear is a
departure from the speaker's habit.

Feature choices (checked on synthetic voices with controlled f0, loudness, rate and noise):
- pitch_level: mean F0 in semitones (log scale, so a raise of n semitones counts the same for any voice).
- pitch_variability: 20th-80th percentile range of F0 in semitones (pctlrange0-2), not
  stddevNorm: stddevNorm is std/mean of semitones-above-27.5-Hz, so the same intonation reads as
  less variable in a higher voice, and std is pulled by octave errors that percentiles ignore.
- loudness: mean perceptual loudness (loudness_sma3_amean).
- rate: voiced segments per second, a pseudo-syllable rate. loudnessPeaksPerSec was rejected: it
  reads 0 for clean syllable trains and rises with background noise. Caveat: pauses count in the
  denominator, so it is speech+pause tempo; very short gaps (< ~60 ms) merge segments.
- voice_quality: mean harmonics-to-noise ratio (HNRdBACF). Low = breathy/rough/hoarse (noisy),
  high = clear, resonant, pressed. Jitter and shimmer were too erratic to use. HNR also rises
  somewhat with pitch, so a raised voice tends to read a little clearer.

Missing values never crash: a clip with no voiced frames (whisper, noise, silence) gets no pitch,
rate or voice-quality cue; a clip too short to measure gets none; the cue is left out of the dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal, Sequence, get_args

import numpy as np
import pandas as pd

from pallm.acoustics.features import ProgressFn, extract_functionals
from pallm.data.manifest import MANIFEST_NAME, Row, manifest_path, read_manifest, write_manifest
from pallm.errors import ManifestError

CUE_NAMES = ("pitch_level", "pitch_variability", "loudness", "rate", "voice_quality")
CUE_LEVELS = ("low", "mid", "high")

CUE_FEATURES = {
    "pitch_level": "F0semitoneFrom27.5Hz_sma3nz_amean",
    "pitch_variability": "F0semitoneFrom27.5Hz_sma3nz_pctlrange0-2",
    "loudness": "loudness_sma3_amean",
    "rate": "VoicedSegmentsPerSec",
    "voice_quality": "HNRdBACF_sma3nz_amean",
}

# What low / high mean, relative to the same speaker; for prompt and chain-of-thought templates.
CUE_MEANING = {
    "pitch_level": ("lower-pitched", "higher-pitched"),
    "pitch_variability": ("flat, monotone", "lively, wide-ranging intonation"),
    "loudness": ("quieter", "louder"),
    "rate": ("slower", "faster"),
    "voice_quality": ("breathy or rough", "clear and resonant"),
}

DEFAULT_THRESHOLD = 0.43  # standard-normal terciles
CueBaseline = Literal["speaker", "gender"]  # what the bins are relative to (measure_cues)
CUE_BASELINES = get_args(CueBaseline)
MIN_UTTERANCES = 5  # fewer valid values than this for a speaker: use the corpus baseline
CACHE_DIR = ".pallm_cache"
CACHE_NAME = "egemaps.parquet"
ORIG_NAME = "manifest.orig.jsonl"

_F0 = CUE_FEATURES["pitch_level"]
# Cues measured on voiced frames only; meaningless (opensmile reports 0) when nothing is voiced.
_VOICED_CUES = ["pitch_level", "pitch_variability", "rate", "voice_quality"]
# Smallest spread treated as real, in each feature's unit. A speaker whose values barely move
# (e.g. a TTS voice) would otherwise get low/high labels from measurement noise alone.
_MIN_STD = {
    "pitch_level": 0.5,  # semitones
    "pitch_variability": 0.5,  # semitones
    "loudness": 0.05,  # opensmile loudness units (speech is typically 0.3-3)
    "rate": 0.1,  # voiced segments / s
    "voice_quality": 0.5,  # dB
}


def cue_values(functionals: pd.DataFrame) -> pd.DataFrame:
    """Raw cue values (one column per cue), NaN where a cue cannot be measured."""
    v = functionals[[CUE_FEATURES[c] for c in CUE_NAMES]].astype(np.float64)
    v.columns = list(CUE_NAMES)
    v = v.replace([np.inf, -np.inf], np.nan)
    unvoiced = ~(functionals[_F0] > 0)  # NaN (too short) counts as unvoiced too
    v.loc[unvoiced, _VOICED_CUES] = np.nan
    return v


def _group_z(x: pd.Series, groups: pd.Series, floor: float) -> tuple[pd.Series, pd.Series]:
    g = x.groupby(groups)
    std = g.transform("std").fillna(0.0).clip(lower=floor)
    return (x - g.transform("mean")) / std, g.transform("count")


def zscores(
    values: pd.DataFrame,
    speakers: Sequence[str],
    corpora: Sequence[str],
    min_utterances: int = MIN_UTTERANCES,
) -> pd.DataFrame:
    """z-score each cue within its speaker; corpus-level where a speaker has too few values.

    A speaker is identified by (corpus, speaker) so mixed manifests cannot merge two corpora's
    "spk1". Where even the corpus has fewer than `min_utterances` values there is no baseline
    and the z-score is NaN (the cue is omitted).
    """
    x = values.reset_index(drop=True)
    corp = pd.Series(list(corpora), dtype=str)
    spk = corp + "\x1f" + pd.Series(list(speakers), dtype=str)
    out = {}
    for cue in x.columns:
        z_s, n_s = _group_z(x[cue], spk, _MIN_STD[cue])
        z_c, n_c = _group_z(x[cue], corp, _MIN_STD[cue])
        out[cue] = z_s.where(n_s >= min_utterances, z_c.where(n_c >= min_utterances))
    return pd.DataFrame(out).set_axis(values.index)


def level(z: float, threshold: float = DEFAULT_THRESHOLD) -> str:
    """Bin a z-score: below -threshold is low, above +threshold high, else mid."""
    return "low" if z < -threshold else "high" if z > threshold else "mid"


def measure_cues(
    rows: Iterable[Row],
    cache_dir: str | os.PathLike,
    num_workers: int = 2,
    progress: ProgressFn | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_utterances: int = MIN_UTTERANCES,
    baseline: CueBaseline = "speaker",
) -> list[Row]:
    """Copies of `rows` with `cues` (cue -> low/mid/high), `cue_z` (cue -> z, 3 decimals) and,
    where a row has none, `reference_audio` (see `speaker_references`).

    `baseline` is what a cue is relative to: "speaker" (the speaker's own utterances) or "gender"
    (all the corpus's speakers of the row's `gender`, the norm a listener who hears one clip of a
    stranger judges by; rows without `gender` keep their speaker's baseline). References are
    always chosen by the speaker-relative z.

    Pass every split of a corpus at once: the baselines are computed over `rows`.
    Features are cached in `cache_dir/egemaps.parquet`. Bins are computed from the rounded z so
    `cues` can always be re-derived from `cue_z` with `level`.
    """
    if baseline not in CUE_BASELINES:
        raise ValueError(f"cue baseline must be one of {', '.join(CUE_BASELINES)}; got {baseline!r}")
    rows = list(rows)
    feats = extract_functionals(rows, Path(cache_dir) / CACHE_NAME, num_workers, progress)
    values, corpora = cue_values(feats), [r.corpus for r in rows]

    def annotated(groups: list[str]) -> list[Row]:
        out = []
        for row, zs in zip(rows, zscores(values, groups, corpora, min_utterances).to_numpy()):
            # +0.0 turns -0.0 into 0.0, so the manifest never shows "-0.0".
            cue_z = {c: round(float(v), 3) + 0.0 for c, v in zip(CUE_NAMES, zs) if np.isfinite(v)}
            out.append(row.model_copy(update={"cues": {c: level(v, threshold) for c, v in cue_z.items()}, "cue_z": cue_z}))
        return out

    by_speaker = annotated([r.speaker for r in rows])
    # "\x1e" keeps a gender group apart from any speaker id
    out = by_speaker if baseline == "speaker" else annotated([f"\x1egender:{r.gender}" if r.gender else r.speaker for r in rows])
    refs = speaker_references(by_speaker)
    return [r if r.reference_audio else r.model_copy(update={"reference_audio": refs[r.id].audio}) for r in out]


def _typicality(r: Row) -> tuple[int, float, str]:
    """Sort key, most typical first: more measured cues, then smaller mean squared z, then id."""
    z = [v for v in (getattr(r, "cue_z", None) or {}).values() if v is not None]
    return (-len(z), float(np.mean(np.square(z))) if z else np.inf, r.id)


def speaker_references(rows: Sequence[Row]) -> dict[str, Row]:
    """Row id -> the clip that shows its speaker's usual voice: the speaker's most typical *other*
    utterance, the one whose cues sit closest to the speaker's own mean (smallest mean squared
    cue z over the cues measured, clips with more measured cues first, ties by id).

    Why: the cue bins are relative to the speaker, and one clip alone does not show the speaker's
    baseline (a high voice at rest sounds "high"). A model that hears this reference first can
    compare, as the bins do. Label-free: it uses the audio measures only, so test speakers get
    references from their own unlabelled clips. A speaker with a single clip is their own reference.
    """
    by_speaker: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        by_speaker.setdefault((r.corpus, r.speaker), []).append(r)
    out: dict[str, Row] = {}
    for clips in by_speaker.values():
        ranked = sorted(clips, key=_typicality)
        for r in clips:
            out[r.id] = ranked[1] if (ranked[0].id == r.id and len(ranked) > 1) else ranked[0]
    return out


def annotate_corpus(
    corpus_dir: str | os.PathLike,
    num_workers: int = 2,
    progress: ProgressFn | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_utterances: int = MIN_UTTERANCES,
    baseline: CueBaseline = "speaker",
) -> Path:
    """Measure a corpus and rewrite its manifest with `cues`, `cue_z` and (where absent)
    `reference_audio`; returns the manifest path.

    The user's manifest is first copied to `manifest.orig.jsonl` (or `manifest.orig.N.jsonl` if
    that holds a different, older original). Re-running is a cache hit and rewrites the same bytes.
    """
    manifest = manifest_path(corpus_dir)
    if manifest.name != MANIFEST_NAME:
        raise ManifestError(f"{manifest}: annotate_corpus needs a corpus folder holding {MANIFEST_NAME}.")
    folder = manifest.parent
    cache_dir = folder / CACHE_DIR
    measured = measure_cues(
        read_manifest(manifest), cache_dir, num_workers, progress,
        threshold=threshold, min_utterances=min_utterances, baseline=baseline,
    )
    # Write back the rows as the user wrote them (relative audio paths), plus the cues.
    original = read_manifest(manifest, resolve_audio=False)
    # Reference clips are written in the manifest's own form (relative when `audio` is).
    as_written = {m.audio: o.audio for o, m in zip(original, measured)}
    out = [o.model_copy(update={"cues": m.cues, "cue_z": m.cue_z,
                                "reference_audio": o.reference_audio or as_written.get(m.reference_audio, m.reference_audio)})
           for o, m in zip(original, measured)]
    stamp = cache_dir / "manifest.sha256"  # digest of the manifest we last wrote
    _backup_original(manifest, stamp)
    path = write_manifest(out, folder, overwrite=True)
    stamp.write_text(_digest(path.read_bytes()))
    return path


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _backup_original(manifest: Path, stamp: Path) -> None:
    """Copy the manifest aside unless it is the one we wrote last time (then it is ours to replace)."""
    data = manifest.read_bytes()
    if stamp.exists() and stamp.read_text().strip() == _digest(data):
        return
    backup = manifest.with_name(ORIG_NAME)
    n = 0
    while backup.exists():
        if backup.read_bytes() == data:
            return
        n += 1
        backup = manifest.with_name(f"manifest.orig.{n}.jsonl")
    tmp = backup.with_name(f".{backup.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, backup)
