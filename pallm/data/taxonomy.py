"""Corpus labels -> (canonical emotion, sentiment), read from `taxonomy.yaml`.

The mapping is data, not code, so every choice is documented next to it in the YAML and a user
can override it with a file of the same shape. A label with no mapping (absent, or `null` in the
file) maps to None: callers drop and count such rows, they never guess a sentiment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import yaml

from pallm.data.manifest import SENTIMENTS
from pallm.errors import ConfigError

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.yaml")

# {corpus: {label: (emotion, sentiment) or None}}
Taxonomy = dict[str, dict[str, "tuple[str, str] | None"]]


def _parse(path: Path) -> Taxonomy:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: taxonomy file not found. Check the path.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}). Fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of corpus -> {{label: ...}}, see {DEFAULT_TAXONOMY}.")
    out: Taxonomy = {}
    for corpus, labels in data.items():
        if not isinstance(labels, dict):
            raise ConfigError(f"{path}: '{corpus}' must map labels to entries, see {DEFAULT_TAXONOMY}.")
        table = out.setdefault(str(corpus).lower(), {})
        for label, entry in labels.items():
            where = f"{path}: {corpus}.{label}"
            if entry is None:
                table[str(label).lower()] = None
                continue
            if not isinstance(entry, dict) or set(entry) != {"emotion", "sentiment"}:
                raise ConfigError(f"{where}: expected {{emotion: NAME, sentiment: SENT}} or null.")
            emotion, sentiment = entry["emotion"], entry["sentiment"]
            if not isinstance(emotion, str) or not emotion.strip():
                raise ConfigError(f"{where}: 'emotion' must be a non-empty name.")
            if sentiment not in SENTIMENTS:
                raise ConfigError(f"{where}: sentiment '{sentiment}' must be one of {', '.join(SENTIMENTS)}.")
            table[str(label).lower()] = (emotion.strip().lower(), sentiment)
    return out


@lru_cache(maxsize=None)
def _default() -> Taxonomy:
    return _parse(DEFAULT_TAXONOMY)


def load_taxonomy(path: str | os.PathLike | None = None) -> Taxonomy:
    """The default taxonomy, with the entries of `path` (if given) replacing it label by label."""
    merged = {corpus: dict(labels) for corpus, labels in _default().items()}
    if path is not None:
        for corpus, labels in _parse(Path(path)).items():
            merged.setdefault(corpus, {}).update(labels)
    return merged


def map_label(corpus: str, label: str, taxonomy: Taxonomy | None = None) -> tuple[str, str] | None:
    """(emotion, sentiment) for a corpus's label, or None when the taxonomy does not map it."""
    table = (taxonomy if taxonomy is not None else _default()).get(corpus.lower(), {})
    return table.get(label.lower())
