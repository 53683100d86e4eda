"""RAVDESS (Zenodo "Audio_Speech_Actors_01-24", optionally "Audio_Song_Actors_01-24") -> manifest rows.

Layout read: ROOT/Actor_01 .. ROOT/Actor_24/MM-VV-EE-II-SS-RR-AA.wav, every field a 2-digit code:
  MM modality      01 full audio-video, 02 video-only, 03 audio-only (the audio releases hold only 03)
  VV vocal channel 01 speech, 02 song
  EE emotion       01 neutral 02 calm 03 happy 04 sad 05 angry 06 fearful 07 disgust 08 surprised
  II intensity     01 normal, 02 strong
  SS statement     01 "Kids are talking by the door", 02 "Dogs are sitting by the door"
  RR repetition    01, 02
  AA actor         01..24, odd = male, even = female (must match the Actor_XX folder)
Names that do not parse, have an out-of-range code or disagree with their folder are skipped as
`malformed_name`; hidden files (".DS_Store", "._*") are ignored.

Song files are skipped (`song_excluded`) unless `include_song=True`; to use them, point --root at
the song release, or merge both releases' Actor_XX folders into one root.

Rows:
  id        ravdess_<file stem>      speaker  ravdess_A<AA>      gender  male / female
  fold      speaker fold 1..6: actors 1-4, 5-8, ..., 21-24 (each fold 2 male + 2 female)
  split     dev_fold (default 5: actors 17-20) -> dev, test_fold (default 6: actors 21-24) -> test,
            the other folds (actors 1-16 by default) -> train; speaker-independent.
  transcript the statement; `label` the raw emotion name, `intensity` normal/strong,
  `vocal_channel` speech/song.
"""

from __future__ import annotations

import re
from pathlib import Path

from pallm.data.taxonomy import Taxonomy, map_label
from pallm.errors import ConfigError

DESCRIPTION = "a RAVDESS audio release (e.g. Audio_Speech_Actors_01-24)"
EXPECTED = "Actor_01..Actor_24 folders of MM-VV-EE-II-SS-RR-AA.wav files"

EMOTIONS = {1: "neutral", 2: "calm", 3: "happy", 4: "sad", 5: "angry", 6: "fearful", 7: "disgust", 8: "surprised"}
STATEMENTS = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}
N_FOLDS = 6

_ACTOR_DIR = re.compile(r"^Actor_(\d\d)$")
_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def looks_like_root(path: Path) -> bool:
    return any(_ACTOR_DIR.match(p.name) and p.is_dir() for p in path.glob("Actor_*"))


def fold_of(actor: int) -> int:
    return (actor - 1) // 4 + 1


def scan(
    root: Path,
    taxonomy: Taxonomy,
    report,
    include_song: bool = False,
    dev_fold: int | None = 5,
    test_fold: int = 6,
) -> list[dict]:
    if isinstance(include_song, str):  # the CLI may hand over strings
        include_song = include_song.strip().lower() in ("1", "true", "yes")
    try:
        test_fold = int(test_fold)
        dev_fold = None if str(dev_fold).lower() in ("none", "") else int(dev_fold)
    except ValueError:
        raise ConfigError("ravdess test_fold/dev_fold must be fold numbers 1..6.") from None
    if not ({test_fold, dev_fold} - {None}) <= set(range(1, N_FOLDS + 1)) or test_fold == dev_fold:
        raise ConfigError(
            f"ravdess test_fold={test_fold}, dev_fold={dev_fold}: use two different folds in 1..6 "
            "(fold k holds actors 4k-3..4k; dev_fold may be None)."
        )

    rows = []
    for actor_dir in sorted(p for p in root.glob("Actor_*") if p.is_dir() and _ACTOR_DIR.match(p.name)):
        folder_actor = int(actor_dir.name[-2:])
        for path in sorted(actor_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            codes = _parse(path)
            if codes is None or codes[6] != folder_actor:
                report.skip("malformed_name", str(path))
                continue
            modality, vocal, emo, intensity, statement, _rep, actor = codes
            if modality != 3:
                report.skip("not_audio_only", str(path))
                continue
            if vocal == 2 and not include_song:
                report.skip("song_excluded", str(path))
                continue
            label = EMOTIONS[emo]
            mapped = map_label("ravdess", label, taxonomy)
            if mapped is None:
                report.skip("unmapped_label", str(path), label)
                continue
            fold = fold_of(actor)
            rows.append(
                {
                    "id": f"ravdess_{path.stem}",
                    "audio": str(path),
                    "corpus": "ravdess",
                    "speaker": f"ravdess_A{actor:02d}",
                    "gender": "male" if actor % 2 else "female",
                    "split": "test" if fold == test_fold else "dev" if fold == dev_fold else "train",
                    "fold": fold,
                    "emotion": mapped[0],
                    "sentiment": mapped[1],
                    "transcript": STATEMENTS[statement],
                    "label": label,
                    "intensity": "normal" if intensity == 1 else "strong",
                    "vocal_channel": "speech" if vocal == 1 else "song",
                }
            )
    return rows


def _parse(path: Path) -> tuple[int, ...] | None:
    """The seven codes of a RAVDESS file name, or None if it is not one (wrong form or range)."""
    m = _NAME.match(path.stem)
    if path.suffix.lower() != ".wav" or not m:
        return None
    codes = tuple(int(x) for x in m.groups())
    modality, vocal, emo, intensity, statement, rep, actor = codes
    valid = (
        modality in (1, 2, 3)
        and vocal in (1, 2)
        and emo in EMOTIONS
        and intensity in (1, 2)
        and statement in STATEMENTS
        and rep in (1, 2)
        and 1 <= actor <= 24
    )
    return codes if valid else None
