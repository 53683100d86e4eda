"""Tiny fixture trees with the exact layouts of the IEMOCAP, RAVDESS and Expresso releases.

Audio is synthetic (short sine tones); names, folders and label/transcript/split files follow
the real releases, including their quirks (evaluator lines, AppleDouble files, segment suffixes
in split files). Each builder returns what the tests should expect to be special about it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def wav(path: Path, seconds: float = 0.25, sr: int = 16_000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.1 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    sf.write(path, np.stack([tone] * channels, axis=1) if channels > 1 else tone, sr, subtype="PCM_16")
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------- IEMOCAP
# (session, dialog, utterance, label, transcript)
IEMOCAP_UTTS = [
    (1, "Ses01F_impro01", "Ses01F_impro01_F000", "neu", "Excuse me."),
    (1, "Ses01F_impro01", "Ses01F_impro01_M000", "hap", "Do you have your forms?"),
    (1, "Ses01F_impro01", "Ses01F_impro01_F001", "exc", "Yeah. [LAUGHTER]"),
    (1, "Ses01F_impro01", "Ses01F_impro01_M001", "fru", "Let me see them."),
    (1, "Ses01F_impro01", "Ses01F_impro01_F002", "xxx", "Is there a problem?"),
    (1, "Ses01M_script01_1", "Ses01M_script01_1_M012", "ang", "What?"),
    (1, "Ses01M_script01_1", "Ses01M_script01_1_F003", "sur", "Oh!"),
    (2, "Ses02F_impro02", "Ses02F_impro02_F000", "sad", "I miss him."),
    (2, "Ses02F_impro02", "Ses02F_impro02_M000", "neu", "I know."),  # corrupt audio
    (2, "Ses02F_impro02", "Ses02F_impro02_F001", "dis", "That is gross."),
]
IEMOCAP_CORRUPT = "Ses02F_impro02_M000"
IEMOCAP_NO_TRANSCRIPT = "Ses01M_script01_1_M012"


def make_iemocap(base: Path) -> Path:
    root = base / "IEMOCAP_full_release"
    by_dialog: dict[tuple[int, str], list] = {}
    for utt in IEMOCAP_UTTS:
        by_dialog.setdefault(utt[:2], []).append(utt)
    for (session, dialog), utts in by_dialog.items():
        sdir = root / f"Session{session}"
        labels = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        trans = []
        for i, (_, _, utt, label, words) in enumerate(utts):
            start, end = 6.2901 + 3 * i, 8.2357 + 3 * i
            labels += [
                f"[{start:.4f} - {end:.4f}]\t{utt}\t{label}\t[2.5000, 2.5000, 2.5000]",
                "C-E1:\tNeutral;\t()",
                "C-E3:\tNeutral;\t()",
                "A-E3:\tval 3; act 2; dom  2;\t()",
                "",
            ]
            if utt != IEMOCAP_NO_TRANSCRIPT:
                trans.append(f"{utt} [{start:08.4f}-{end:08.4f}]: {words}")
            wav_path = sdir / "sentences" / "wav" / dialog / f"{utt}.wav"
            if utt == IEMOCAP_CORRUPT:
                text(wav_path, "this is not a wav file")
            else:
                wav(wav_path)
        if dialog == "Ses01F_impro01":
            labels.append("[12.0 - oops this line is broken")  # junk label line
            trans.append("M: overlapping chatter without an id")  # not an utterance line
        text(sdir / "dialog" / "EmoEvaluation" / f"{dialog}.txt", "\n".join(labels) + "\n")
        text(sdir / "dialog" / "transcriptions" / f"{dialog}.txt", "\n".join(trans) + "\n")
        # macOS resource forks and per-evaluator sub-folders must not be read as label files.
        (sdir / "dialog" / "EmoEvaluation" / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07\n[\x00\xff junk\n")
        text(sdir / "dialog" / "EmoEvaluation" / "Categorical" / f"{dialog}_e1_cat.txt", "[bad\n")
    return root


# ---------------------------------------------------------------- RAVDESS
# folder actor -> file names (speech release naming, plus mistakes)
RAVDESS_FILES = {
    1: [
        "03-01-01-01-01-01-01.wav",  # neutral
        "03-01-02-02-02-01-01.wav",  # calm, strong, "Dogs ..."
        "03-01-08-01-01-01-01.wav",  # surprised -> dropped by the taxonomy
        "03-02-03-01-01-01-01.wav",  # song -> excluded by default
        "03-01-03-01-01-01.wav",  # six fields -> malformed
        "03-01-09-01-01-01-01.wav",  # emotion 09 -> malformed
    ],
    2: [
        "03-01-03-01-02-02-02.wav",  # happy
        "03-01-04-02-01-01-02.wav",  # sad
        "03-01-05-01-01-01-03.wav",  # actor 03 in Actor_02 -> malformed
    ],
    17: ["03-01-05-01-01-01-17.wav", "03-01-06-01-01-01-17.wav"],  # angry; fearful (empty audio)
    21: ["03-01-07-01-01-01-21.wav", "01-01-01-01-01-01-21.wav"],  # disgust; audio-video modality
}
RAVDESS_EMPTY = "03-01-06-01-01-01-17.wav"


def make_ravdess(base: Path) -> Path:
    root = base / "Audio_Speech_Actors_01-24"
    for actor, names in RAVDESS_FILES.items():
        for name in names:
            path = root / f"Actor_{actor:02d}" / name
            if name == RAVDESS_EMPTY:
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, np.zeros(0, dtype=np.float32), 16_000)  # valid header, no frames
            else:
                wav(path)
    text(root / "Actor_01" / ".DS_Store", "junk")
    return root


# ---------------------------------------------------------------- Expresso
EXPRESSO_READ = [
    "ex01/happy/base/ex01_happy_00001.wav",
    "ex01/happy/base/ex01_happy_00002.wav",
    "ex01/happy/base/ex02_happy_00005.wav",  # speaker does not match folder -> malformed
    "ex01/default/base/ex01_default_emphasis_00003.wav",
    "ex01/default/longform/ex01_default_longform_00001.wav",
    "ex02/confused/base/ex02_confused_00001.wav",  # confused -> dropped by the taxonomy
    "ex02/whisper/base/ex02_whisper_00001.wav",
    "ex02/sad/base/ex02_sad_00009.wav",  # in no split file
]
EXPRESSO_CONV = {  # path -> channels
    "ex01-ex02/laughing/ex01-ex02_laughing_001.wav": 2,
    "ex03-ex02/sad-sympathetic/ex03-ex02_sad-sympathetic_003.wav": 2,
    "ex04-ex01/animal-animaldir/ex04-ex01_animal-animaldir_005.wav": 2,
    "ex01-ex02/default/ex01-ex02_default_007.wav": 1,  # should be stereo
}
EXPRESSO_SPLITS = {
    "train": [
        "# If only one segment is extracted, it will have the format: ...",
        "ex01_happy_00001",
        "ex01_default_emphasis_00003",
        "ex01_default_longform_00001\t(16.49s,)",
        "ex02_confused_00001",
        "ex01-ex02_laughing_001\t(60.0s,)",
        "ex03-ex02_sad-sympathetic_003",
        "ex04-ex01_animal-animaldir_005",
        "ex01-ex02_default_007",
    ],
    "dev": ["ex01_happy_00002", "ex01_default_longform_00001\t(,16.49s)"],
    "test": ["ex02_whisper_00001", "ex01-ex02_laughing_001\t(,60.0s)"],
}
EXPRESSO_TRANSCRIPTS = {
    "ex01_happy_00001": "I *love* this!",
    "ex01_happy_00002": "Great news.",
    "ex01_default_emphasis_00003": "The *cat* sat.",
    "ex02_whisper_00001": "Quiet, please.",
}


def make_expresso(base: Path) -> Path:
    root = base / "expresso"
    for rel in EXPRESSO_READ:
        wav(root / "audio_48khz" / "read" / rel, sr=48_000)
    for rel, channels in EXPRESSO_CONV.items():
        wav(root / "audio_48khz" / "conversational" / rel, sr=48_000, channels=channels)
    for split, lines in EXPRESSO_SPLITS.items():
        text(root / "splits" / f"{split}.txt", "\n".join(lines) + "\n")
    text(root / "read_transcriptions.txt", "".join(f"{k}\t{v}\n" for k, v in EXPRESSO_TRANSCRIPTS.items()))
    text(root / "README.txt", "Expresso\n")
    return root
