"""Two reference points that need no LLM: the classic acoustic classifier (listens, cannot read)
and a bag-of-words classifier on the transcript (reads, cannot listen: the lexical shortcut in
its purest form). Both return `Prediction`s so the same metrics score them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pallm.data.manifest import Row
from pallm.evaluate.predict import Prediction

_TARGETS = ("sentiment", "emotion")
# These fits are small: with several BLAS threads, OpenBLAS spin-waiting made the text baseline's
# L-BFGS 30x slower (6.7 s vs 0.2 s) whenever another process shared the 2 cores. One thread it is.
_ONE_THREAD = dict(limits=1, user_api="blas")


def _gold(row: Row, target: str) -> str | None:
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    return getattr(row, target)


def _labelled(train_rows: list[Row], target: str) -> list[Row]:
    rows = [r for r in train_rows if _gold(r, target) is not None]
    if len({_gold(r, target) for r in rows}) < 2:
        raise ValueError(f"a baseline needs training rows with at least two {target} labels")
    return rows


def _predictions(test_rows: list[Row], labels, target: str) -> list[Prediction]:
    out = []
    for r, lab in zip(test_rows, labels):
        gold = _gold(r, target)
        out.append(Prediction(id=r.id, task="classify", output=str(lab), label=str(lab), gold=gold,
                              correct=(lab == gold) if gold is not None else None, format_ok=True,
                              cue_claims={}, response=None))
    return out


def speaker_normalise(feats: pd.DataFrame, speakers: list[str]) -> pd.DataFrame:
    """z-score every feature within each speaker. Removes who is speaking (a deep voice is not a
    sad voice) and keeps how they deviate from their own habit, which is what carries affect.
    Uses only each speaker's unlabelled audio, so test speakers are normalised by themselves.
    A constant feature (or a speaker's single clip) becomes 0; NaNs (too-short clips) stay NaN."""
    by = pd.Series(speakers, index=feats.index)
    mean = feats.groupby(by).transform("mean")
    std = feats.groupby(by).transform(lambda c: c.std(ddof=0)).replace(0.0, 1.0).fillna(1.0)
    return (feats - mean) / std


def acoustic_baseline(
    train_rows: list[Row],
    test_rows: list[Row],
    cache_path: str | os.PathLike,
    target: str = "sentiment",
    *,
    num_workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """eGeMAPS v02 functionals -> per-speaker z-score -> StandardScaler -> balanced logistic
    regression, trained on `train_rows`, predicting `test_rows` (in their order)."""
    from pallm.acoustics.features import extract_functionals  # opensmile loads lazily

    train_rows = _labelled(train_rows, target)
    rows = train_rows + list(test_rows)
    feats = extract_functionals(rows, cache_path, num_workers=num_workers, progress=progress)
    # extract_functionals indexes by id; position keeps duplicates across splits apart.
    feats = feats.reset_index(drop=True)
    z = speaker_normalise(feats, [r.speaker for r in rows]).to_numpy(dtype=np.float64)
    clf = make_pipeline(SimpleImputer(strategy="mean", keep_empty_features=True), StandardScaler(),
                        LogisticRegression(class_weight="balanced", max_iter=5000, C=1.0))
    n = len(train_rows)
    with threadpool_limits(**_ONE_THREAD):
        clf.fit(z[:n], [_gold(r, target) for r in train_rows])
        labels = clf.predict(z[n:]) if len(rows) > n else []
    return _predictions(list(test_rows), labels, target)


def text_baseline(train_rows: list[Row], test_rows: list[Row], target: str = "sentiment") -> list[Prediction]:
    """TF-IDF -> balanced logistic regression on transcripts. It cannot hear the voice, so on
    conflict rows it is wrong by construction: the shortcut, isolated.

    Character n-grams within words, not whole words: test sentences are unseen (ParaSynth splits
    by sentence), and word pieces (`wonder-`, `-ful`, `disappoint-`) carry sentiment to new
    sentences better (on ParaSynth test, ~0.7 vs ~0.6 agreement with the words' sentiment)."""
    train_rows = _labelled(train_rows, target)
    clf = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
                        LogisticRegression(class_weight="balanced", max_iter=5000, C=1.0))
    test_rows = list(test_rows)
    with threadpool_limits(**_ONE_THREAD):
        clf.fit([r.transcript or "" for r in train_rows], [_gold(r, target) for r in train_rows])
        labels = clf.predict([r.transcript or "" for r in test_rows]) if test_rows else []
    return _predictions(test_rows, labels, target)
