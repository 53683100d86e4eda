"""Prompt and output format of PALLM's two tasks.

    classify: <think>CUES. the voice sounds EMOTION. [the words sound LEX.]</think><answer>LABEL</answer>
    respond:  <think>CUES. the voice sounds EMOTION. [the words sound LEX.]</think><response>REPLY</response>

The think part is built from the *measured* cue bins of the clip (speaker-relative low/mid/high),
so every claim in it can be checked against the audio (the `cue_grounding` reward does exactly
that). It names the words' sentiment separately from the voice's when the transcript is given:
making the model say both, and then follow the voice, is the explicit antidote to the lexical
shortcut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from pallm.data.manifest import SENTIMENTS, Row

TASKS = ("classify", "respond")

# Cue name in the manifest -> the phrase the think part uses. Order is the order of mention.
CUE_PHRASES = {
    "pitch_level": "pitch level",
    "pitch_variability": "pitch variability",
    "loudness": "loudness",
    "rate": "speaking rate",
    "voice_quality": "voice quality",
}
CUE_LEVELS = ("low", "mid", "high")
_PHRASE_TO_CUE = {v: k for k, v in CUE_PHRASES.items()}
_CLAIM_RE = re.compile(r"(" + "|".join(CUE_PHRASES.values()) + r")\s*(?:is|:)?\s*(low|mid|high)\b")
# The think part's two affect claims, as build_think writes them (group 1: the claim's words).
VOICE_CLAIM_RE = re.compile(r"the voice sounds\s+([^.<]*)")
WORDS_CLAIM_RE = re.compile(r"the words sound\s+([^.<]*)")


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Give the transcript in the prompt (as cascaded systems do; it is how the shortcut enters).
    transcript: bool = True
    # Chain-of-thought before the answer; False is the direct-answer ablation.
    cot: bool = True
    # What the classify task predicts: 3-way sentiment, or the corpus's own emotion labels.
    target: Literal["sentiment", "emotion"] = "sentiment"
    # Cues the think part mentions (must be cue names the manifest's `cues` use).
    cues: list[str] = ["pitch_level", "pitch_variability", "loudness", "rate"]
    # Hear a reference clip of the same speaker (the row's `reference_audio`) before the clip: the
    # cue bins are relative to the speaker's usual voice, which one clip alone does not show.
    speaker_reference: bool = False
    # Or hear the clip relative to that reference: its mean log-mel spectrum is subtracted from the
    # clip's (speaker-level normalisation; the reference itself is not played).
    speaker_norm: bool = False

    @field_validator("cues")
    @classmethod
    def _known_cues(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in CUE_PHRASES]
        if unknown or not v:
            raise ValueError(f"cues must be a non-empty list of {', '.join(CUE_PHRASES)}; got {v}")
        return v

    @model_validator(mode="after")
    def _one_use_of_the_reference(self) -> "PromptConfig":
        if self.speaker_reference and self.speaker_norm:
            raise ValueError("prompt.speaker_reference (play the reference) and prompt.speaker_norm (normalise by it) "
                             "are two uses of the speaker's reference clip; choose one")
        return self

    @property
    def reference_switch(self) -> str | None:
        """The option by which the model hears each clip against its speaker's reference, if any."""
        return ("prompt.speaker_reference" if self.speaker_reference
                else "prompt.speaker_norm" if self.speaker_norm else None)


REFERENCE_NOTE = "The first recording is the same speaker in their usual voice, for reference; the second is the one to judge.\n"


def label_set(cfg: PromptConfig, emotions: list[str] | None = None) -> list[str]:
    if cfg.target == "sentiment":
        return list(SENTIMENTS)
    if not emotions:
        raise ValueError("the emotion target needs the corpus's emotion labels")
    return sorted(emotions)


def _listing(cues: list[str]) -> str:
    names = [CUE_PHRASES[c] for c in cues]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def build_prompt(task: str, row: Row, cfg: PromptConfig, labels: list[str] | None = None) -> str:
    """The user turn (the audio goes before it, placed by the model's chat template)."""
    said = f'The speaker says: "{row.transcript}"\n' if cfg.transcript and row.transcript else ""
    if cfg.speaker_reference:
        said = REFERENCE_NOTE + said
    if task == "classify":
        labels = labels or list(SENTIMENTS)
        what = "sentiment" if cfg.target == "sentiment" else "emotion"
        think = f"First describe the {_listing(cfg.cues)} inside <think></think>, then give " if cfg.cot else "Give "
        return (f"{said}Listen to how it is said. {think}the speaker's {what} inside <answer></answer>: "
                f"{', '.join(labels)}.")
    if task == "respond":
        think = "First describe how they sound inside <think></think>, then write " if cfg.cot else "Write "
        return (f"{said}Listen to how the speaker sounds. {think}a short reply that fits how they feel "
                "and what they said, inside <response></response>.")
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def describe_cues(cues: dict[str, str] | None, names: list[str]) -> str:
    if not cues:
        return ""
    parts = [f"{CUE_PHRASES[n]}: {cues[n]}" for n in names if n in cues]
    return ", ".join(parts) + ". " if parts else ""


def build_think(row: Row, cfg: PromptConfig) -> str:
    text = describe_cues(row.cues, cfg.cues)
    text += f"the voice sounds {row.emotion or row.sentiment}."
    if cfg.transcript and row.lexical_sentiment:
        text += f" the words sound {row.lexical_sentiment}."
    return text


def build_target(task: str, row: Row, cfg: PromptConfig) -> str:
    """The SFT completion for `row`, built from its measured cues, its label and its reference reply."""
    think = f"<think>{build_think(row, cfg)}</think>" if cfg.cot else ""
    if task == "classify":
        label = row.sentiment if cfg.target == "sentiment" else row.emotion
        return f"{think}<answer>{label}</answer>"
    if task == "respond":
        return f"{think}<response>{row.response}</response>"
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


@dataclass
class Parsed:
    think: str | None = None
    answer: str | None = None  # raw text inside <answer>
    label: str | None = None  # answer mapped onto the label set, or None: counted as wrong
    response: str | None = None
    format_ok: bool = False  # strictly the expected tags, in order, nothing else around them
    cue_claims: dict[str, str] = field(default_factory=dict)
    voice_claim: str | None = None  # what follows the first "the voice sounds", e.g. "sad"


def _between(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, flags=re.S)
    return m.group(1).strip() if m else None


def _match_label(text: str, labels: list[str]) -> str | None:
    """Tolerant: case, punctuation and surrounding words are forgiven; two different labels are not."""
    words = re.findall(r"[a-z]+", text.lower())
    found = {w for w in words if w in labels}
    return found.pop() if len(found) == 1 else None


def parse_completion(text: str, task: str, labels: list[str] | None = None, cot: bool = True) -> Parsed:
    """Parse a model output. Never raises: an unusable output is a Parsed with label None."""
    labels = labels or list(SENTIMENTS)
    p = Parsed()
    text = text or ""
    p.think = _between(text, "think")
    if p.think is not None:
        p.cue_claims = {}
        for phrase, level in _CLAIM_RE.findall(p.think.lower()):
            # A cue claimed twice with different levels is a contradiction: keep it as "conflict".
            cue = _PHRASE_TO_CUE[phrase]
            p.cue_claims[cue] = level if p.cue_claims.get(cue, level) == level else "conflict"
        voice = VOICE_CLAIM_RE.search(p.think.lower())
        p.voice_claim = voice.group(1).strip() if voice else None
    head = r"\s*<think>.*?</think>\s*" if cot else r"\s*"
    if task == "classify":
        p.answer = _between(text, "answer")
        if p.answer is not None:
            p.label = _match_label(p.answer, labels)
        else:
            # No answer tag: take a label only from text after the reasoning, never from inside it.
            tail = text.split("</think>")[-1] if "</think>" in text else ("" if "<think>" in text else text)
            p.label = _match_label(tail, labels)
        p.format_ok = bool(re.fullmatch(head + r"<answer>\s*[A-Za-z]+\s*</answer>\s*", text, flags=re.S)) \
            and p.label is not None and p.answer.strip().lower() == p.label
    elif task == "respond":
        p.response = _between(text, "response")
        p.format_ok = bool(re.fullmatch(head + r"<response>.+?</response>\s*", text, flags=re.S)) \
            and bool(p.response)
    else:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    return p
