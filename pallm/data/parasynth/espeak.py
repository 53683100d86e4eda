"""eSpeak NG through ctypes, using the shared library and voice data that the `espeakng-loader`
wheel ships (no system package needed).

eSpeak is a formant synthesiser: robotic, but its pitch, pitch range, rate and volume are exact
controls, which is what a corpus whose labels live in prosody needs. The library holds global
state and does not survive being initialised twice, so get it through `get_engine()`, which
keeps one per process (ParaSynth renders in a process pool).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from pallm.errors import PallmError

# espeak_AUDIO_OUTPUT / espeak_PARAMETER values from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_CHARS_UTF8 = 1
_SSML = 0x10

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Prosody:
    """eSpeak's own units: rate in words/min (80-450), pitch and range 0-100, volume 0-200."""

    rate: int = 175
    pitch: int = 50
    range: int = 50
    volume: int = 100


class ESpeak:
    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:  # pragma: no cover - it is a hard dependency
            raise PallmError("espeakng-loader is not installed: pip install espeakng-loader") from None
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_dir = espeakng_loader.get_data_path().encode()
        lib = self._lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir, 0)
        if self.sample_rate <= 0:
            raise PallmError(f"eSpeak NG failed to initialise with data at {data_dir.decode()}.")
        self._chunks: list[np.ndarray] = []

        def _collect(wav, n, _events):  # called from inside espeak_Synth
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(_collect)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._callback)

    def synth(self, text: str, voice: str, prosody: Prosody, seed: int = 0, ssml: bool = False) -> np.ndarray:
        """Speak `text` with eSpeak voice name `voice` (e.g. "en-us+f3"); float32 at `sample_rate`.

        `seed` feeds eSpeak's own noise generator (breathy voice variants draw from it; it is
        seeded from the clock otherwise)."""
        lib = self._lib
        lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise PallmError(f"eSpeak voice '{voice}' not found in the espeakng-loader data.")
        for param, value in ((_RATE, prosody.rate), (_PITCH, prosody.pitch), (_RANGE, prosody.range), (_VOLUME, prosody.volume)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        buf = text.encode("utf-8") + b"\0"
        flags = _CHARS_UTF8 | (_SSML if ssml else 0)
        lib.espeak_Synth(buf, len(buf), 0, 0, 0, flags, None, None)
        lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


_ENGINE: ESpeak | None = None


def get_engine() -> ESpeak:
    """The process's one eSpeak engine."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = ESpeak()
    return _ENGINE
