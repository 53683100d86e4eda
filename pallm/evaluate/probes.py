"""Lexical-shortcut probes: how much of a model's answer comes from the voice, not the words.

(a) congruent vs conflict UA: a listener scores the same on both; a reader collapses on conflict.
(b) silence: the audio is replaced by zeros of the same length. A listener's answers change; a
    reader's stay (voice_dependence = 1 - unchanged share).
(c) same words, other voice: the audio is replaced by another clip of the SAME transcript
    (preferably with a different voice label). A listener now follows the other clip's voice.
(d) follows-words rate: on conflict rows, the share of answers that match the words' sentiment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pallm.data.audio import SAMPLE_RATE, audio_duration
from pallm.data.manifest import Row
from pallm.evaluate.metrics import classification_metrics
from pallm.evaluate.predict import Prediction, gold_label, predict, row_audio
from pallm.prompts.format import PromptConfig, label_set


def silence_like(row: Row) -> np.ndarray:
    """Zeros as long as the row's clip (the file header gives the length: nothing is decoded)."""
    return np.zeros(max(1, int(round(audio_duration(row.audio) * SAMPLE_RATE))), dtype=np.float32)


def same_words_partners(rows: list[Row], prompt_cfg: PromptConfig) -> dict[str, Row]:
    """For each row, another row with the same transcript: one with a different voice label if
    any (then a different speaker), else one with the same label. Rows without any are absent."""
    by_text: dict[str, list[Row]] = {}
    for r in rows:
        if r.transcript:
            by_text.setdefault(" ".join(r.transcript.lower().split()), []).append(r)
    partners = {}
    for group in by_text.values():
        for r in group:
            others = [o for o in group if o.id != r.id]
            if others:
                # Deterministic: best candidate first, ties broken by id.
                partners[r.id] = min(others, key=lambda o: (gold_label(o, prompt_cfg) == gold_label(r, prompt_cfg),
                                                            o.speaker == r.speaker, o.id))
    return partners


def _unchanged(a: list[Prediction], b: list[Prediction]) -> float:
    return float(np.mean([x.label == y.label for x, y in zip(a, b)]))


def shortcut_probes(
    model,
    processor,
    rows: list[Row],
    prompt_cfg: PromptConfig,
    batch_size: int = 16,
    *,
    labels: list[str] | None = None,
    real: list[Prediction] | None = None,
    max_new_tokens: int = 96,
    predict_fn: Callable[[list[Row], Callable[[Row], np.ndarray] | None], list[Prediction]] | None = None,
    **predict_kwargs: Any,
) -> dict[str, Any]:
    """Run the four probes on `rows` (the classify task). Pass `real`, predictions on the same
    rows with their own audio, to reuse them instead of decoding twice; other keyword arguments
    (system, max_audio_seconds, progress) go to `predict`.

    `predict_fn(rows, audio_fn)` replaces `predict` for models that are not a local (model,
    processor) pair, e.g. an API model: `lambda rows, audio_fn: api_model.predict(rows, "classify",
    prompt_cfg, labels, audio_fn=audio_fn)` (model and processor are then unused)."""
    rows = [r for r in rows if gold_label(r, prompt_cfg) is not None]
    if not rows:
        raise ValueError("no rows with a gold label for the prompt's target")
    labels = labels or label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))

    def run(subset: list[Row], audio_fn=None) -> list[Prediction]:
        if predict_fn is not None:
            return predict_fn(subset, audio_fn)
        return predict(model, processor, subset, "classify", prompt_cfg, labels, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, audio_fn=audio_fn, **predict_kwargs)

    if real is None:
        real = run(rows)
    real_by_id = {p.id: p for p in real}
    missing = [r.id for r in rows if r.id not in real_by_id]
    if missing:
        raise ValueError(f"`real` has no prediction for {len(missing)} row(s), e.g. {missing[0]!r}")
    real = [real_by_id[r.id] for r in rows]
    real_metrics = classification_metrics(real, rows, labels)
    base = real_metrics["subsets"]

    out: dict[str, Any] = {"real": {"n": len(rows), "ua": base["all"]["ua"]}}
    # (a) Conflict vs congruent.
    if "congruent" in base and "conflict" in base:
        cong, conf = base["congruent"]["ua"], base["conflict"]["ua"]
        out["conflict_vs_congruent"] = {"congruent_ua": cong, "conflict_ua": conf, "gap": cong - conf}

    # (b) Silence of the same length.
    silent = run(rows, silence_like)
    unchanged = _unchanged(real, silent)
    out["silence"] = {"n": len(rows), "ua": classification_metrics(silent, rows, labels)["subsets"]["all"]["ua"],
                      "unchanged": unchanged, "voice_dependence": 1.0 - unchanged}
    out["voice_dependence"] = 1.0 - unchanged  # the headline number, also at the top level

    # (c) Same words, another clip.
    partners = same_words_partners(rows, prompt_cfg)
    paired = [r for r in rows if r.id in partners]
    entry: dict[str, Any] = {"n": len(paired), "skipped": len(rows) - len(paired)}
    if paired:
        swapped = run(paired, lambda r: row_audio(partners[r.id]))
        real_paired = [real_by_id[r.id] for r in paired]
        entry["ua"] = classification_metrics(swapped, paired, labels)["subsets"]["all"]["ua"]
        entry["unchanged"] = _unchanged(real_paired, swapped)
        # Where the partner's voice label differs, a listener's answer should move to it.
        moved = [p.label == gold_label(partners[r.id], prompt_cfg) for p, r in zip(swapped, paired)
                 if gold_label(partners[r.id], prompt_cfg) != gold_label(r, prompt_cfg)]
        entry["n_different_voice"] = len(moved)
        entry["follows_partner_voice"] = float(np.mean(moved)) if moved else None
    out["same_words"] = entry

    # (d) Follows-words rate on conflict rows.
    out["follows_words"] = real_metrics["follows_words_rate"]
    return out
