"""Expresso (facebookresearch, `expresso/` folder of the release) -> manifest rows.

Layout read:
  ROOT/audio_48khz/read/<spk>/<style>/base/<spk>_<style>[_<sub>]_<NNNNN>.wav
      short read sentences, mono; e.g. ex01_happy_00001, ex03_default_emphasis_00010 (the
      "emphasis"/"essentials" sub-sets of the default style sit in default/ and count as default)
  ROOT/audio_48khz/read/<spk>/<style>/longform/<spk>_<style>_longform_<NNNNN>.wav
  ROOT/audio_48khz/conversational/<spkA>-<spkB>/<styleA-styleB or style>/<spkA>-<spkB>_<styles>_<NNN>.wav
      improvised dialogues, stereo: channel 1 (left) is spkA with styleA, channel 2 is spkB with
      styleB (one style name when both use it). Names abbreviate animal_directed, child_directed
      and non_verbal as animaldir, childdir, nonverbal; they are expanded here.
  ROOT/read_transcriptions.txt     "<id>\\t<text>" for read speech; "*word*" emphasis marks are
                                   removed (the transcript holds the words spoken)
  ROOT/splits/{train,dev,test}.txt the official splits: one file id per line, "#" comments, and
                                   for long files an optional "\\t(start,end)" segment.

Rows:
  id        expresso_<file id>, or expresso_<file id>_ch<c> for a conversational channel
  channel   conversational rows only: 0-based channel index into the stereo file (0 = left =
            the first speaker of the folder name), as taken by `pallm.data.audio.load_audio`
  speaker   expresso_<spk>    (no gender: the release does not say which speakers are which)
  emotion   the style (emotion=whisper etc., see taxonomy.yaml); `label` the raw style
  split     from the official split files. They split long files (conversations, longform read)
            by time segment, so one file can be listed in several splits; a manifest row is a
            whole file, so such a file goes to its most held-out split (test > dev > train) and
            test audio never leaks into training (counted in notes as `split_by_segment`).
            Files in no split file (e.g. the singing style) are skipped as `not_in_splits`:
            guessing a split could leak across the official ones.
  NOTE: the official splits are not speaker-independent (every speaker is in every split), and
  there is no `fold`.
"""

from __future__ import annotations

import re
from pathlib import Path

from pallm.data.taxonomy import Taxonomy, map_label
from pallm.errors import CorpusLayoutError

DESCRIPTION = "an Expresso release (the expresso/ folder)"
EXPECTED = "audio_48khz/{read,conversational}/, read_transcriptions.txt and splits/{train,dev,test}.txt"

SPLIT_PRIORITY = ("test", "dev", "train")  # most held-out first
STYLE_ALIASES = {"animaldir": "animal_directed", "childdir": "child_directed", "nonverbal": "non_verbal"}

_READ_NAME = re.compile(r"^(ex\d\d)_([a-z]+)(?:_[a-z]+)?_\d+$")
_CONV_NAME = re.compile(r"^(ex\d\d)-(ex\d\d)_([a-z]+)(?:-([a-z]+))?_\d+$")


def looks_like_root(path: Path) -> bool:
    return (path / "audio_48khz").is_dir()


def scan(
    root: Path,
    taxonomy: Taxonomy,
    report,
    include_conversational: bool = True,
    splits_dir: str | None = None,
) -> list[dict]:
    if isinstance(include_conversational, str):  # the CLI may hand over strings
        include_conversational = include_conversational.strip().lower() in ("1", "true", "yes")
    split_of = _read_splits(Path(splits_dir) if splits_dir else root / "splits", report)
    transcripts = _read_transcripts(root / "read_transcriptions.txt")
    audio = root / "audio_48khz"

    rows: list[dict] = []

    def add(file_id: str, path: Path, spk: str, style: str, channel: int | None = None) -> None:
        row_id = f"expresso_{file_id}" + (f"_ch{channel}" if channel is not None else "")
        split = split_of.get(file_id)
        if split is None:
            report.skip("not_in_splits", row_id)
            return
        mapped = map_label("expresso", style, taxonomy)
        if mapped is None:
            report.skip("unmapped_label", row_id, style)
            return
        row = {
            "id": row_id,
            "audio": str(path),
            "corpus": "expresso",
            "speaker": f"expresso_{spk}",
            "split": split,
            "emotion": mapped[0],
            "sentiment": mapped[1],
            "transcript": transcripts.get(file_id),
            "label": style,
        }
        if channel is not None:
            row["channel"] = channel
        rows.append(row)

    # read/<spk>/<style>/<base|longform>/<id>.wav
    for path in _wavs(audio / "read", depth=3):
        spk, style, kind = path.parts[-4:-1]
        m = _READ_NAME.match(path.stem)
        if kind not in ("base", "longform") or not m or m.groups()[:2] != (spk, style):
            report.skip("malformed_name", str(path))
            continue
        add(path.stem, path, spk, style)

    # conversational/<spkA>-<spkB>/<styles>/<id>.wav: one row per channel
    for path in _wavs(audio / "conversational", depth=2) if include_conversational else []:
        pair, style_dir = path.parts[-3:-1]
        m = _CONV_NAME.match(path.stem)
        if not m or f"{m.group(1)}-{m.group(2)}" != pair or path.stem.split("_", 1)[1].rsplit("_", 1)[0] != style_dir:
            report.skip("malformed_name", str(path))
            continue
        spk_a, spk_b, style_a, style_b = m.groups()
        for channel, (spk, style) in enumerate([(spk_a, style_a), (spk_b, style_b or style_a)]):
            add(path.stem, path, spk, STYLE_ALIASES.get(style, style), channel)
    return rows


def _wavs(folder: Path, depth: int) -> list[Path]:
    if not folder.is_dir():
        return []
    pattern = "/".join(["*"] * depth + ["*.wav"])
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def _read_splits(folder: Path, report) -> dict[str, str]:
    split_of: dict[str, str] = {}
    in_several: set[str] = set()
    for split in reversed(SPLIT_PRIORITY):  # train first, so held-out splits override it
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise CorpusLayoutError(
                f"{path}: Expresso split file missing. Copy the release's splits/ folder there "
                "(also in textlesslib: examples/expresso/dataset/processing/expresso_splits), "
                "or pass the splits_dir option."
            )
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            file_id = line.split("\t")[0].strip()
            if split_of.get(file_id, split) != split:
                in_several.add(file_id)
            split_of[file_id] = split
    if in_several:
        report.note("split_by_segment", len(in_several))
    return split_of


def _read_transcripts(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        file_id, sep, text = line.partition("\t")
        if sep:
            out[file_id.strip()] = " ".join(text.replace("*", "").split())
    return out
