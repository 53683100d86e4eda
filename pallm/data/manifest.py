"""The one data format: a folder with `manifest.jsonl` (one JSON object per utterance) and audio.

See CONTRACT.md. Rows are validated on read so that a malformed line is reported with its file
and line number instead of surfacing later as a KeyError deep in training.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pallm.errors import ManifestError

SENTIMENTS = ("negative", "neutral", "positive")
SPLITS = ("train", "dev", "test")
MANIFEST_NAME = "manifest.jsonl"


class Row(BaseModel):
    """One utterance. Unknown fields are kept (users may add their own)."""

    model_config = ConfigDict(extra="allow")

    id: str
    audio: str
    corpus: str
    speaker: str
    split: Literal["train", "dev", "test"]
    emotion: str | None = None
    sentiment: Literal["negative", "neutral", "positive"] | None = None
    transcript: str | None = None
    # Optional fields the toolkit understands.
    lexical_sentiment: Literal["negative", "neutral", "positive"] | None = None
    congruent: bool | None = None
    duration: float | None = None
    gender: str | None = None
    fold: int | str | None = None
    response: str | None = None
    cues: dict[str, str] | None = None
    # A clip of the same speaker in their usual voice (path like `audio`), heard before the clip by
    # models trained with `prompt.speaker_reference`. `pallm data cues` fills it in when absent.
    reference_audio: str | None = None

    @field_validator("emotion")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if isinstance(v, str) else v

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def manifest_path(path: str | os.PathLike) -> Path:
    """Accept either a corpus folder or the manifest file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    return p


def read_manifest(
    path: str | os.PathLike,
    split: str | None = None,
    resolve_audio: bool = True,
) -> list[Row]:
    """Read and validate a manifest. Audio paths become absolute when `resolve_audio`."""
    p = manifest_path(path)
    if not p.exists():
        raise ManifestError(
            f"{p}: no manifest here. Point to a corpus folder holding {MANIFEST_NAME} "
            "(make one with `pallm data synth` or `pallm data prepare`)."
        )
    rows: list[Row] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{p}:{lineno}: not valid JSON ({e.msg}). Fix or remove the line.") from None
            try:
                row = Row.model_validate(obj)
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(x) for x in err["loc"]) or "row"
                raise ManifestError(
                    f"{p}:{lineno}: field '{field}': {err['msg']}. See CONTRACT.md for the manifest fields."
                ) from None
            if row.id in seen:
                raise ManifestError(
                    f"{p}:{lineno}: duplicate id '{row.id}' (first on line {seen[row.id]}). Ids must be unique."
                )
            seen[row.id] = lineno
            if resolve_audio:
                for key in ("audio", "reference_audio"):  # paths relative to the manifest's folder
                    path = getattr(row, key)
                    if path and not os.path.isabs(path):
                        setattr(row, key, str((p.parent / path).resolve()))
            if split is None or row.split == split:
                rows.append(row)
    if split is not None and not rows:
        raise ManifestError(f"{p}: no rows with split '{split}'. Splits present must include it.")
    return rows


def write_manifest(
    rows: Iterable[Row | dict], out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write atomically: a crash leaves either the old manifest or the new one, never half of one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / MANIFEST_NAME
    if target.exists() and not overwrite:
        raise ManifestError(f"{target} exists. Pass --overwrite to replace it, or choose another --out.")
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                obj = r.to_json() if isinstance(r, Row) else {k: v for k, v in r.items() if v is not None}
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def merge_manifests(sources: Iterable[str | os.PathLike], out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Concatenate corpora into one manifest (audio paths made absolute; ids must stay unique)."""
    rows: list[Row] = []
    seen: dict[str, Path] = {}
    for src in sources:
        for row in read_manifest(src):
            if row.id in seen:
                raise ManifestError(f"{manifest_path(src)}: id '{row.id}' also in {seen[row.id]}; "
                                    "ids must be unique across the merged corpora.")
            seen[row.id] = manifest_path(src)
            rows.append(row)
    return write_manifest(rows, out_dir, overwrite=overwrite)
