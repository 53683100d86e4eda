"""`pallm data prepare`: turn a corpus release on disk into a manifest corpus.

Each corpus module (iemocap, ravdess, expresso) knows its release layout and exposes:
  DESCRIPTION, EXPECTED           words for error messages
  looks_like_root(path) -> bool   is `path` the release's top folder?
  scan(root, taxonomy, report, **options) -> list[dict]   candidate manifest rows

This module does what is common to all of them: checks --root (and suggests the right folder
for the usual mistake of pointing one level too high or too low), drops duplicate ids, checks
each audio file's header (duration, corrupt or empty files are skipped and counted), then writes
`manifest.jsonl` atomically plus `prepare_report.json`. Audio is referenced in place by absolute
path, never copied. Nothing is written unless at least one row survives.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

from pallm.data.manifest import MANIFEST_NAME, Row, write_manifest
from pallm.data.taxonomy import load_taxonomy
from pallm.errors import ConfigError, CorpusLayoutError, ManifestError

from pallm.data.corpora import expresso, iemocap, ravdess

CORPORA = {"iemocap": iemocap, "ravdess": ravdess, "expresso": expresso}
REPORT_NAME = "prepare_report.json"
MAX_EXAMPLES = 5  # examples kept per skip reason: enough to find the files, small enough to read


@dataclass
class PrepareReport:
    """What `prepare_corpus` kept and what it left out, and why."""

    corpus: str
    root: str
    out: str
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows (or label lines)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few files/ids
    dropped_labels: dict[str, int] = field(default_factory=dict)  # raw label -> rows dropped for it
    notes: dict[str, int] = field(default_factory=dict)  # kept-but-worth-knowing counts
    emotions: dict[str, int] = field(default_factory=dict)
    sentiments: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    speakers: int = 0

    def skip(self, reason: str, example: str, label: str | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES and example not in ex:  # a stereo file backs two rows
            ex.append(example)
        if label is not None:
            self.dropped_labels[label] = self.dropped_labels.get(label, 0) + 1

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] = self.notes.get(what, 0) + n

    def count_rows(self, rows: list[dict]) -> None:
        self.kept = len(rows)
        self.emotions = dict(sorted(Counter(r["emotion"] for r in rows).items()))
        self.sentiments = dict(sorted(Counter(r["sentiment"] for r in rows).items()))
        self.splits = {s: n for s in ("train", "dev", "test") if (n := sum(r["split"] == s for r in rows))}
        self.speakers = len({r["speaker"] for r in rows})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

        lines = [
            f"{self.corpus}: kept {self.kept} rows from {self.speakers} speakers -> {self.out}",
            f"  splits: {fmt(self.splits)}",
            f"  emotions: {fmt(self.emotions)}",
            f"  sentiments: {fmt(self.sentiments)}",
        ]
        if self.skipped:
            lines.append(f"  skipped {sum(self.skipped.values())}:")
            for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {reason}: {n} (e.g. {', '.join(self.examples.get(reason, [])[:2])})")
        if self.dropped_labels:
            lines.append(f"  dropped labels: {fmt(dict(sorted(self.dropped_labels.items())))}")
        if self.notes:
            lines.append(f"  notes: {fmt(self.notes)}")
        return "\n".join(lines)


def prepare_corpus(
    name: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    taxonomy_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    check_audio: bool = True,
    **options: Any,
) -> PrepareReport:
    """Scan the release of corpus `name` at `root` and write `out/manifest.jsonl`.

    `check_audio` reads every file's header (cheap) to set `duration` and to skip unreadable or
    empty files; without it only file existence is checked. `options` are the corpus's own
    (see the `scan` function of its module).
    """
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus '{name}'. Choose one of: {', '.join(CORPORA)}.")
    module = CORPORA[name]
    _check_options(name, module.scan, options)
    root_path = _check_root(name, module, Path(root).expanduser())
    out_path = Path(out).expanduser().resolve()
    # Fail before a long scan rather than after it (write_manifest checks again, atomically).
    if (out_path / MANIFEST_NAME).exists() and not overwrite:
        raise ManifestError(
            f"{out_path / MANIFEST_NAME} exists. Pass --overwrite to replace it, or choose another --out."
        )
    taxonomy = load_taxonomy(taxonomy_path)
    report = PrepareReport(corpus=name, root=str(root_path), out=str(out_path))

    rows = module.scan(root_path, taxonomy, report, **options)
    rows = _drop_duplicates(rows, report)
    rows = _check_audio(rows, report, check_audio)
    if not rows:
        reasons = ", ".join(f"{k} {v}" for k, v in report.skipped.items()) or "no labelled utterances found"
        raise CorpusLayoutError(
            f"{root_path}: no usable {name} utterances ({reasons}); nothing written. "
            f"Expected {module.EXPECTED}."
        )
    report.count_rows(rows)
    write_manifest([Row.model_validate(r) for r in rows], out_path, overwrite=overwrite)
    _write_json_atomic(out_path / REPORT_NAME, report.to_json())
    return report


def _check_options(name: str, scan: Any, options: dict[str, Any]) -> None:
    known = [p for p in inspect.signature(scan).parameters if p not in ("root", "taxonomy", "report")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) for {name}: {', '.join(unknown)}. Known: {', '.join(known)}.")


def _check_root(name: str, module: Any, root: Path) -> Path:
    if not root.exists():
        raise CorpusLayoutError(f"{root}: --root does not exist. Point it at {module.DESCRIPTION}.")
    if not root.is_dir():
        raise CorpusLayoutError(f"{root}: --root is a file. Point it at {module.DESCRIPTION}.")
    root = root.resolve()
    if not any(root.iterdir()):
        raise CorpusLayoutError(f"{root}: --root is empty. Extract the {name} release there first.")
    if module.looks_like_root(root):
        return root
    hint = _suggest_root(root, module.looks_like_root)
    fix = f"Did you mean --root {hint}?" if hint else f"Point --root at the folder holding {module.EXPECTED}."
    raise CorpusLayoutError(f"{root}: not {module.DESCRIPTION} (expected {module.EXPECTED}). {fix}")


def _suggest_root(root: Path, looks_like: Any, limit: int = 2000) -> Path | None:
    """The usual mistake is --root one or two levels too high or too low: look there."""
    below: list[Path] = []
    for child in _subdirs(root, limit):
        below.append(child)
        below.extend(_subdirs(child, limit))
        if len(below) > limit:  # a huge folder (e.g. a home directory): stop looking
            break
    for cand in below + [root.parent, root.parent.parent]:
        if cand != root and looks_like(cand):
            return cand
    return None


def _subdirs(path: Path, limit: int) -> list[Path]:
    try:
        return sorted(p for _, p in zip(range(limit), path.iterdir()) if p.is_dir())
    except OSError:
        return []


def _drop_duplicates(rows: list[dict], report: PrepareReport) -> list[dict]:
    # Ids must be unique (CONTRACT). A repeated id means a repeated label line or file; keeping
    # the first and counting the rest is safer than failing a whole release over one line.
    seen: set[str] = set()
    kept = []
    for r in rows:
        if r["id"] in seen:
            report.skip("duplicate_id", r["id"])
            continue
        seen.add(r["id"])
        kept.append(r)
    return kept


def _check_audio(rows: list[dict], report: PrepareReport, check_audio: bool) -> list[dict]:
    probed: dict[str, tuple[str | None, Any]] = {}  # stereo files back two rows: read once
    kept = []
    for r in rows:
        path = r["audio"]
        if path not in probed:
            probed[path] = _probe(path, check_audio)
        problem, info = probed[path]
        channel = r.get("channel")
        # A channel row needs the stereo file it was named for; a mono file would be a mix.
        if problem is None and info is not None and channel is not None and info.channels < max(2, channel + 1):
            problem = "not_stereo"
        if problem:
            report.skip(problem, path)
            continue
        if info is not None:
            r["duration"] = round(info.frames / info.samplerate, 3)
        kept.append(r)
    return kept


def _probe(path: str, check_audio: bool) -> tuple[str | None, Any]:
    if not os.path.isfile(path):
        return "missing_audio", None
    if not check_audio:
        return None, None
    if os.path.getsize(path) == 0:
        return "empty_audio", None
    try:
        info = sf.info(path)
    except Exception:  # soundfile raises several types for broken files
        return "unreadable_audio", None
    if info.frames == 0 or not info.samplerate:
        return "empty_audio", None
    return None, info


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["CORPORA", "PrepareReport", "prepare_corpus"]
