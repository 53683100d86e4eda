"""Scores for predictions, always split by whether words and voice agree.

A model that reads the words instead of listening scores well on congruent rows and badly on
conflict rows; the `conflict` subset and `follows_words_rate` make that visible in every report.
Output shape: CONTRACT.md, "Evaluation output".
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from pallm.data.manifest import Row
from pallm.evaluate.predict import Prediction
from pallm.prompts.format import PromptConfig, build_prompt

# Stands in for an unparsable output. It is not a label, so it is always wrong, never matches a
# gold class, and (being absent from y_true) adds no class of its own to UA.
_log = logging.getLogger("pallm.evaluate")

UNPARSED = "<unparsed>"

# Words a reply uses when it acknowledges how the speaker sounds, per voice emotion (sentiment
# as a fallback). Deliberately small and local; pallm.rewards has the richer lexicon for training.
AFFECT_WORDS: dict[str, tuple[str, ...]] = {
    "happy": ("happy", "glad", "cheerful", "delighted", "excited", "thrilled", "joy", "upbeat", "smile",
              "great spirits", "good spirits", "good mood", "lighthearted", "bright"),
    "excited": ("excited", "thrilled", "energy", "enthusiastic", "happy", "can't wait"),
    "sad": ("sad", "down", "low", "sorry", "tough", "heavy", "hard", "blue", "tired", "hurt", "painful",
            "upset"),
    "angry": ("angry", "frustrated", "frustration", "annoyed", "irritated", "upset", "fed up", "mad",
              "tense", "anger", "worked up", "maddening", "infuriating"),
    "frustrated": ("frustrated", "frustration", "annoyed", "fed up", "irritated", "stuck", "upset"),
    "fearful": ("scared", "afraid", "worried", "anxious", "nervous", "frightened", "fear"),
    "disgusted": ("disgusted", "gross", "repulsed", "revolting", "awful"),
    "neutral": ("calm", "steady", "composed", "relaxed", "matter-of-fact", "matter-of-factly",
                "even-toned", "quite even", "level-headed", "at ease", "in stride"),
    "calm": ("calm", "relaxed", "peaceful", "at ease", "composed", "steady"),
    # Fallbacks by sentiment, for corpora whose emotion labels are not listed above.
    "positive": ("happy", "glad", "cheerful", "delighted", "excited", "great"),
    "negative": ("sad", "sorry", "upset", "frustrated", "tough", "hard", "down"),
}


def _by_id(preds: Sequence[Prediction], rows: Sequence[Row]) -> list[tuple[Prediction, Row]]:
    rows_by_id = {r.id: r for r in rows}
    missing = [p.id for p in preds if p.id not in rows_by_id]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no row, e.g. {missing[0]!r}")
    return [(p, rows_by_id[p.id]) for p in preds]


def _subset_scores(pairs: list[tuple[Prediction, Row]], labels: list[str]) -> dict[str, Any]:
    y_true = [p.gold for p, _ in pairs]
    y_pred = [p.label if p.label is not None else UNPARSED for p, _ in pairs]
    # Macro F1 over the labels this subset has (as gold or prediction): a class absent from both
    # would otherwise add an ill-defined 0 and punish small subsets for their sampling.
    present = [lab for lab in labels if lab in y_true or lab in y_pred]
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" (UNPARSED, or a label absent from a subset) is
        # expected: those predictions count as wrong for their gold class, as intended.
        warnings.simplefilter("ignore")
        return {
            "n": len(pairs),
            "ua": float(balanced_accuracy_score(y_true, y_pred)),
            "wa": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "parse_rate": float(np.mean([p.label is not None for p, _ in pairs])),
        }


def _sentiment_map(rows: Sequence[Row]) -> dict[str, str]:
    """label -> sentiment: sentiments map to themselves, emotions via the rows' own pairs, so
    the shortcut is measurable for the emotion target too (happy -> positive, ...)."""
    m = {s: s for s in ("negative", "neutral", "positive")}
    for r in rows:
        if r.emotion and r.sentiment:
            m.setdefault(r.emotion, r.sentiment)
    return m


def follows_words_rate(preds: Sequence[Prediction], rows: Sequence[Row]) -> dict[str, Any] | None:
    """On conflict rows (words and voice disagree), the share of predictions whose sentiment is
    the words' sentiment: the lexical-shortcut rate. None when no row is a scorable conflict."""
    to_sent = _sentiment_map(rows)
    hits = [to_sent.get(p.label) == r.lexical_sentiment
            for p, r in _by_id(preds, rows)
            if r.congruent is False and r.lexical_sentiment is not None and p.gold is not None]
    return {"n": len(hits), "rate": float(np.mean(hits))} if hits else None


def classification_metrics(preds: Sequence[Prediction], rows: Sequence[Row], labels: list[str]) -> dict[str, Any]:
    """UA / WA / macro-F1 / parse rate on `all`, `congruent`, `conflict`, `corpus:<name>` (mixed
    corpora only) and `emotion:<e>`; the confusion matrix (gold rows x predicted columns, plus an
    `unparsed` count per gold label); and `follows_words_rate` on conflict rows.

    Rows whose gold label is missing (e.g. the emotion target on a row without emotion) are
    left out of every score.
    """
    pairs = [(p, r) for p, r in _by_id(preds, rows) if p.gold is not None]
    if not pairs:
        raise ValueError("no prediction has a gold label to score against")
    subsets: dict[str, Any] = {"all": _subset_scores(pairs, labels)}
    for name, keep in (("congruent", True), ("conflict", False)):
        part = [(p, r) for p, r in pairs if r.congruent is keep]
        if part:
            subsets[name] = _subset_scores(part, labels)
    corpora = sorted({r.corpus for _, r in pairs})
    if len(corpora) > 1:
        for c in corpora:
            subsets[f"corpus:{c}"] = _subset_scores([(p, r) for p, r in pairs if r.corpus == c], labels)
    for e in sorted({r.emotion for _, r in pairs if r.emotion}):
        part = [(p, r) for p, r in pairs if r.emotion == e]
        # One emotion has (nearly) one gold class, so UA there is just accuracy: keep it plain.
        subsets[f"emotion:{e}"] = {"n": len(part), "accuracy": float(np.mean([p.correct for p, _ in part])),
                                   "parse_rate": float(np.mean([p.label is not None for p, _ in part]))}

    y_true = [p.gold for p, _ in pairs]
    y_pred = [p.label if p.label is not None else UNPARSED for p, _ in pairs]
    full = confusion_matrix(y_true, y_pred, labels=labels + [UNPARSED])
    return {
        "subsets": subsets,
        "confusion": {"labels": list(labels), "matrix": full[:-1, :-1].tolist(),
                      "unparsed": full[:-1, -1].tolist()},
        "follows_words_rate": follows_words_rate([p for p, _ in pairs], rows),
    }


def fold_metrics(preds: Sequence[Prediction], rows: Sequence[Row]) -> dict[str, Any] | None:
    """Per-fold UA/WA and their unweighted mean (IEMOCAP leave-one-session-out, RAVDESS speaker
    folds), the numbers those corpora are conventionally reported with. Each fold's predictions
    must come from the model that did not train on it; this only groups and averages.
    None when no row has a `fold`."""
    groups: dict[str, list[tuple[Prediction, Row]]] = defaultdict(list)
    for p, r in _by_id(preds, rows):
        if r.fold is not None and p.gold is not None:
            groups[str(r.fold)].append((p, r))
    if not groups:
        return None
    folds = {}
    for f in sorted(groups, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        s = _subset_scores(groups[f], sorted({p.gold for p, _ in groups[f]}))
        folds[f] = {"n": s["n"], "ua": s["ua"], "wa": s["wa"]}
    return {"folds": folds,
            "mean": {k: float(np.mean([v[k] for v in folds.values()])) for k in ("ua", "wa")}}


# --- respond task ---------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over the whole set of replies (0 when there are none)."""
    grams = [tuple(w[i : i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def acknowledges_affect(reply: str, emotion: str | None, sentiment: str | None = None) -> bool | None:
    """Does the reply name how the speaker sounds? None when no lexicon entry fits the row."""
    words = AFFECT_WORDS.get(emotion or "") or AFFECT_WORDS.get(sentiment or "")
    if not words:
        return None
    text = " ".join(_words(reply.replace("-", " ")))
    return any(re.search(rf"\b{re.escape(' '.join(_words(w.replace('-', ' '))))}\b", text) for w in words)


def _response_scores(pairs: list[tuple[Prediction, Row]], scores: list[float] | None,
                     extra: dict[str, list[float | None]] | None = None) -> dict[str, Any]:
    replies = [p.response or "" for p, _ in pairs]
    ack = [acknowledges_affect(p.response or "", r.emotion, r.sentiment) for p, r in pairs]
    ack = [a for a in ack if a is not None]
    out = {
        "n": len(pairs),
        "format_rate": float(np.mean([p.format_ok for p, _ in pairs])),
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "affect_ack_rate": float(np.mean(ack)) if ack else None,
    }
    if scores is not None:
        out["judge"] = float(np.mean(scores))
    for name, vals in (extra or {}).items():
        # A judge that failed on a reply (None) costs that score only: the mean is over the rest,
        # and the failures are counted next to it.
        ok = [v for v in vals if v is not None]
        out[name] = float(np.mean(ok)) if ok else None
        out[f"{name}_failures"] = len(vals) - len(ok)
    return out


def _judge_scores(judge: Callable[..., list], pairs: list[tuple[Prediction, Row]],
                  cfg: PromptConfig) -> list[float | None]:
    dumps = [r.model_dump() for _, r in pairs]
    keys = sorted({k for d in dumps for k in d})
    fields = {k: [d.get(k) for d in dumps] for k in keys}
    fields["task"] = ["respond"] * len(pairs)  # reward functions route on the task column
    scores = judge([build_prompt("respond", r, cfg) for _, r in pairs], [p.output for p, _ in pairs], **fields)
    scores = [None if s is None else float(s) for s in scores]
    if len(scores) != len(pairs):
        raise ValueError(f"judge returned {len(scores)} scores for {len(pairs)} replies")
    return scores


def response_metrics(
    preds: Sequence[Prediction],
    rows: Sequence[Row],
    judge: Callable[..., list[float]] | None = None,
    prompt_cfg: PromptConfig | None = None,
    *,
    extra_judges: dict[str, Callable[..., list[float | None]]] | None = None,
) -> dict[str, Any]:
    """Format rate, distinct-1/2, share of replies acknowledging the voice's affect and, with a
    `judge(prompts, completions, **fields) -> list[float]` (fields: the rows' columns as lists,
    TRL reward-function style), its mean score (`judge`). Returned flat for all rows, and per
    subset (`all`, `congruent`, `conflict`) under `subsets`.

    `extra_judges` ({name: judge}, e.g. {"llm_judge": make_llm_judge(...)}) add `<name>`, the mean
    of the scores they gave, and `<name>_failures`, the number of replies they returned None for (a
    failed request): a failure costs that reply's score, never the evaluation. A judge that raises
    counts as failing on every reply (logged)."""
    pairs = _by_id(preds, rows)
    if not pairs:
        raise ValueError("no predictions to score")
    cfg = prompt_cfg or PromptConfig()
    scores = None
    if judge is not None:
        scores = _judge_scores(judge, pairs, cfg)
        if any(s is None for s in scores):
            raise ValueError("judge returned None for a respond row; pass judges that may fail as extra_judges")
    extra: dict[str, list[float | None]] = {}
    for name, fn in (extra_judges or {}).items():
        try:
            extra[name] = _judge_scores(fn, pairs, cfg)
        except Exception as e:  # noqa: BLE001 - an optional judge must never cost the evaluation
            _log.warning("%s failed on all %d replies (%s: %s); its score is left out", name, len(pairs),
                         type(e).__name__, e)
            extra[name] = [None] * len(pairs)
    subsets = {"all": _response_scores(pairs, scores, extra)}
    for name, keep in (("congruent", True), ("conflict", False)):
        idx = [i for i, (_, r) in enumerate(pairs) if r.congruent is keep]
        if idx:
            subsets[name] = _response_scores([pairs[i] for i in idx], [scores[i] for i in idx] if scores else None,
                                             {k: [v[i] for i in idx] for k, v in extra.items()})
    return {**subsets["all"], "subsets": subsets}


# --- output files ---------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    # A crash leaves the old file or the new one, never half of one (as write_manifest).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    # numpy scalars/arrays sneak into metrics dicts easily (np.mean); anything else is a bug.
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    raise TypeError(f"metrics value of type {type(o).__name__} is not JSON serialisable")


def write_eval(
    out_dir: str | os.PathLike,
    model_name: str,
    data_name: str,
    metrics: dict[str, Any],
    preds: Sequence[Prediction],
) -> Path:
    """Write `metrics.json` ({"model", "data", **metrics}: the contract's shape when `metrics`
    comes from classification_metrics; extra keys are allowed) and `predictions.jsonl`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_name, "data": data_name, **{k: v for k, v in metrics.items() if k not in ("model", "data")}}
    _atomic_write(out / "metrics.json", json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    _atomic_write(out / "predictions.jsonl",
                  "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in preds))
    return out / "metrics.json"
