"""IEMOCAP (the `IEMOCAP_full_release` folder from USC SAIL) -> manifest rows.

Layout read:
  ROOT/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt    one label line per utterance:
      [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]
    Only lines starting with "[" are labels; the header ("% [START_TIME ...") and the per-evaluator
    lines ("C-E1: ...", "A-E3: ...") are ignored. A "[" line that does not parse is counted as
    `junk_label_line`. Sub-folders (Categorical/, Attribute/, Self-evaluation/) are not read.
  ROOT/Session{n}/dialog/transcriptions/<dialog>.txt     "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me."
    Other lines (e.g. overlapping-speech "MXX"/"FXX" turns) simply never match a labelled id.
  ROOT/Session{n}/sentences/wav/<dialog>/<utt>.wav       one wav per utterance
  macOS "._*" AppleDouble files, shipped in some copies of the release, are ignored.

Rows:
  id        iemocap_<utt>                 e.g. iemocap_Ses01M_script01_1_M012
  speaker   iemocap_S<session><F|M>       from the gender letter of the LAST id field: in
            Ses01F_impro01_M003 the male actor of session 1 speaks (the F only says who wore the
            motion-capture markers). 10 speakers, unique across the corpus.
  gender    female / male (same letter)
  fold      session number 1..5, for leave-one-session-out cross-validation
  split     test_session (default 5) -> test, dev_session (default 4) -> dev, the rest -> train;
            speaker-independent because every actor appears in one session only.
  label     the raw IEMOCAP label (neu, exc, ...); `dialog` the dialog name.

Protocols (option `protocol`):
  "4class" (default) the standard 4-class setup: neu, hap+exc -> happy, ang, sad; 5,531
           utterances on the full release. Other labels are counted as `not_in_protocol`.
  "all"    every label the taxonomy maps (so also fru, fea, dis); emotion names from the taxonomy.
"""

from __future__ import annotations

import re
from pathlib import Path

from pallm.data.taxonomy import Taxonomy, map_label
from pallm.errors import ConfigError

DESCRIPTION = "an IEMOCAP release (IEMOCAP_full_release)"
EXPECTED = "Session1..Session5 folders with dialog/EmoEvaluation/*.txt and sentences/wav/"

PROTOCOLS = ("4class", "all")
FOUR_CLASS = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}

_LABEL_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\w+)\s+\[[^\]]*\]\s*$")
_UTT_ID = re.compile(r"^Ses0([1-5])[FM]_.+_([FM])\w+$")
_TRANSCRIPT_LINE = re.compile(r"^(Ses\S+)\s+\[[\d.]+-[\d.]+\]:\s?(.*)$")


def looks_like_root(path: Path) -> bool:
    return any((path / f"Session{n}" / "dialog" / "EmoEvaluation").is_dir() for n in range(1, 6))


def scan(
    root: Path,
    taxonomy: Taxonomy,
    report,
    protocol: str = "4class",
    test_session: int = 5,
    dev_session: int | None = 4,
) -> list[dict]:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"iemocap protocol '{protocol}': choose one of {', '.join(PROTOCOLS)}.")
    try:  # the CLI may hand over strings ("5", "none")
        test_session = int(test_session)
        dev_session = None if str(dev_session).lower() in ("none", "") else int(dev_session)
    except ValueError:
        raise ConfigError("iemocap test_session/dev_session must be session numbers 1..5.") from None
    sessions = {test_session, dev_session} - {None}
    if not sessions <= set(range(1, 6)) or test_session == dev_session:
        raise ConfigError(
            f"iemocap test_session={test_session}, dev_session={dev_session}: "
            "use two different sessions in 1..5 (dev_session may be None)."
        )

    rows = []
    for n in range(1, 6):
        session = root / f"Session{n}"
        eval_dir = session / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            continue
        transcripts = _read_transcripts(session / "dialog" / "transcriptions")
        for label_file in _txt_files(eval_dir):
            for lineno, line in enumerate(label_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.startswith("["):
                    continue  # header, evaluator lines, blank lines
                m = _LABEL_LINE.match(line.strip())
                utt = m and _UTT_ID.match(m.group(3))
                if not m or not utt or int(utt.group(1)) != n:
                    report.skip("junk_label_line", f"{label_file}:{lineno}")
                    continue
                utt_id, label = m.group(3), m.group(4).lower()
                mapped = map_label("iemocap", label, taxonomy)
                if protocol == "4class" and label not in FOUR_CLASS:
                    report.skip("not_in_protocol", utt_id, label)
                    continue
                if mapped is None:
                    report.skip("unmapped_label", utt_id, label)
                    continue
                emotion = FOUR_CLASS[label] if protocol == "4class" else mapped[0]
                gender = utt.group(2)
                dialog = utt_id.rsplit("_", 1)[0]
                transcript = transcripts.get(utt_id)
                if transcript is None:
                    report.note("missing_transcript")
                rows.append(
                    {
                        "id": f"iemocap_{utt_id}",
                        "audio": str(session / "sentences" / "wav" / dialog / f"{utt_id}.wav"),
                        "corpus": "iemocap",
                        "speaker": f"iemocap_S{n}{gender}",
                        "gender": "female" if gender == "F" else "male",
                        "split": "test" if n == test_session else "dev" if n == dev_session else "train",
                        "fold": n,
                        "emotion": emotion,
                        "sentiment": mapped[1],
                        "transcript": transcript,
                        "label": label,
                        "dialog": dialog,
                    }
                )
    return rows


def _txt_files(folder: Path) -> list[Path]:
    # "._x.txt" are macOS resource forks (binary), not label/transcript files.
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))


def _read_transcripts(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for path in _txt_files(folder):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _TRANSCRIPT_LINE.match(line.strip())
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out
