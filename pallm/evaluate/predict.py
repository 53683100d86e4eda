"""Run a model over manifest rows: batched greedy decoding, parsed into one `Prediction` per row.

Every evaluation, probe and baseline produces this same record, so one set of metrics scores
them all. Nothing a model can output makes `predict` fail: an unusable output is simply a
prediction with `label=None`, which the metrics count as wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pallm.data.audio import audio_duration, load_audio
from pallm.data.manifest import Row
from pallm.errors import PallmError
from pallm.model import SpeakerNormalized, generate
from pallm.prompts.format import PromptConfig, build_prompt, label_set, parse_completion


@dataclass
class Prediction:
    id: str
    task: str  # "classify" or "respond"
    output: str  # the raw completion text
    label: str | None  # parsed label (classify); None when unparsable or for respond
    gold: str | None  # the row's label for the prompt's target
    correct: bool | None  # None when there is nothing to compare (respond, or no gold)
    format_ok: bool
    cue_claims: dict[str, str] = field(default_factory=dict)
    response: str | None = None  # the reply inside <response> (respond)


def gold_label(row: Row, prompt_cfg: PromptConfig) -> str | None:
    return row.sentiment if prompt_cfg.target == "sentiment" else row.emotion


def row_audio(row: Row) -> np.ndarray:
    # `channel` is an extra field on stereo conversational corpora (Expresso): one speaker each.
    return load_audio(row.audio, channel=getattr(row, "channel", None))


def reference_row(row: Row) -> Row:
    """The row's speaker reference as a row of its own (same speaker and channel), for audio loaders."""
    if not row.reference_audio:
        raise PallmError(
            f"row '{row.id}': this model hears the clip against a reference clip of the speaker "
            "(prompt.speaker_reference or prompt.speaker_norm), "
            "but the row has no `reference_audio`. Run `pallm data cues CORPUS` to add one per row, or set the "
            "field to a clip of the same speaker in their usual voice."
        )
    return row.model_copy(update={"id": f"{row.id}#reference", "audio": row.reference_audio})


def model_audio(row: Row, prompt_cfg: PromptConfig, audio_fn: Callable[[Row], np.ndarray] = row_audio,
                reference_fn: Callable[[Row], np.ndarray] = row_audio
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray] | SpeakerNormalized:
    """What the model hears for `row`: `audio_fn(row)`, or (speaker reference, clip), or the clip
    normalised by the speaker reference, as the prompt says. The probes replace the clip only; the
    reference stays the speaker's."""
    clip = audio_fn(row)
    return with_reference(clip, reference_fn(reference_row(row)), prompt_cfg) if prompt_cfg.reference_switch else clip


def with_reference(clip: np.ndarray, reference: np.ndarray, prompt_cfg: PromptConfig
                   ) -> tuple[np.ndarray, np.ndarray] | SpeakerNormalized:
    """`clip` as a model that uses its speaker's reference hears it: played after the reference
    (`prompt.speaker_reference`) or normalised by it (`prompt.speaker_norm`)."""
    return SpeakerNormalized(clip, reference) if prompt_cfg.speaker_norm else (reference, clip)


def _duration(row: Row) -> float:
    return row.duration if row.duration is not None else audio_duration(row.audio)


def to_prediction(row: Row, task: str, output: str, prompt_cfg: PromptConfig, labels: list[str]) -> Prediction:
    """Parse one completion. Never raises (parse_completion does not)."""
    p = parse_completion(output, task, labels, cot=prompt_cfg.cot)
    gold = gold_label(row, prompt_cfg) if task == "classify" else None
    return Prediction(
        id=row.id,
        task=task,
        output=output,
        label=p.label if task == "classify" else None,
        gold=gold,
        correct=(p.label == gold) if gold is not None else None,
        format_ok=p.format_ok,
        cue_claims=dict(p.cue_claims),
        response=p.response,
    )


def predict(
    model,
    processor,
    rows: list[Row],
    task: str,
    prompt_cfg: PromptConfig,
    labels: list[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    audio_fn: Callable[[Row], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    system: str | None = None,
    max_audio_seconds: float | None = None,
    reference_fn: Callable[[Row], np.ndarray] | None = None,
) -> list[Prediction]:
    """Greedy predictions for `rows`, returned in input order.

    `audio_fn(row)` replaces the row's audio (the shortcut probes feed silence or another clip);
    `reference_fn` loads speaker references (`prompt_cfg.speaker_reference`; default: from disk);
    `labels` defaults to the prompt's label set (for the emotion target, the rows' emotions).
    `system` and `max_audio_seconds` go to `pallm.model.generate` unchanged.
    """
    rows = list(rows)
    if labels is None:
        labels = label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))
    audio_fn, reference_fn = audio_fn or row_audio, reference_fn or row_audio
    # Similar lengths in one batch waste less compute on padding; results go back to input order.
    order = sorted(range(len(rows)), key=lambda i: _duration(rows[i]))
    out: list[Prediction | None] = [None] * len(rows)
    if progress:
        progress(0, len(rows))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [rows[i] for i in idx]
        texts = generate(
            model,
            processor,
            [model_audio(r, prompt_cfg, audio_fn, reference_fn) for r in batch],
            [build_prompt(task, r, prompt_cfg, labels) for r in batch],
            system=system,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            max_audio_seconds=max_audio_seconds,
        )
        for i, r, text in zip(idx, batch, texts):
            out[i] = to_prediction(r, task, text, prompt_cfg, labels)
        if progress:
            progress(min(start + batch_size, len(rows)), len(rows))
    return out  # type: ignore[return-value]
