"""Measured acoustic cues (pitch, loudness, rate, voice quality): the evidence the chain-of-thought
talks about. `annotate_corpus(dir)` adds `cues`, `cue_z` and `reference_audio` to a corpus's manifest."""

from pallm.acoustics.cues import (
    CUE_FEATURES,
    CUE_LEVELS,
    CUE_MEANING,
    CUE_NAMES,
    DEFAULT_THRESHOLD,
    MIN_UTTERANCES,
    annotate_corpus,
    cue_values,
    level,
    measure_cues,
    speaker_references,
    zscores,
)
from pallm.acoustics.features import extract_functionals, feature_names, measure_file, rich_progress

__all__ = [
    "CUE_FEATURES",
    "CUE_LEVELS",
    "CUE_MEANING",
    "CUE_NAMES",
    "DEFAULT_THRESHOLD",
    "MIN_UTTERANCES",
    "annotate_corpus",
    "cue_values",
    "extract_functionals",
    "feature_names",
    "level",
    "measure_cues",
    "measure_file",
    "rich_progress",
    "speaker_references",
    "zscores",
]
