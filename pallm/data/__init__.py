"""Corpora: the manifest format, audio IO, ParaSynth and the real-corpus loaders."""

from pallm.data.manifest import SENTIMENTS, SPLITS, Row, read_manifest, write_manifest

__all__ = ["SENTIMENTS", "SPLITS", "Row", "read_manifest", "write_manifest"]
