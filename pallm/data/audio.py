"""Audio IO: everything the toolkit reads goes through `load_audio`, so every corpus gets the
same checks (missing, corrupt, empty), the same resampling and the same channel handling."""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import soxr

from pallm.errors import AudioError

SAMPLE_RATE = 16_000


def load_audio(
    path: str | os.PathLike,
    sr: int = SAMPLE_RATE,
    channel: int | None = None,
) -> np.ndarray:
    """Read a wav/flac file as mono float32 at `sr`.

    Stereo is averaged to mono unless `channel` picks one (Expresso's conversational files hold one
    speaker per channel). Other sample rates are resampled, never rejected.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: audio file not found. Check the manifest's 'audio' field.")
    try:
        wav, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for broken files
        raise AudioError(f"{path}: unreadable audio ({e}). Re-export it as wav/flac or drop the row.") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: zero-length audio. Remove the row from the manifest.")
    if channel is not None:
        if channel >= wav.shape[1]:
            raise AudioError(f"{path}: has {wav.shape[1]} channel(s), channel {channel} requested.")
        mono = wav[:, channel]
    else:
        mono = wav.mean(axis=1)
    if file_sr != sr:
        mono = soxr.resample(mono, file_sr, sr, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration(path: str | os.PathLike) -> float:
    try:
        info = sf.info(os.fspath(path))
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({e}).") from None
    return info.frames / info.samplerate if info.samplerate else 0.0


def write_audio(path: str | os.PathLike, wav: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    sf.write(os.fspath(path), wav, sr, subtype="PCM_16")
