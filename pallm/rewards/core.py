"""The reward registry and the rule-based rewards: format, accuracy, cue grounding, length, repetition.

Every reward has TRL's signature::

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

`kwargs` hold the dataset row's columns, one value per completion (`task`, `sentiment`, `emotion`,
`cues`, ...), plus whatever else the trainer passes; unknown keys are ignored. A reward returns
None for a row it does not apply to: that is how the two tasks are routed (TRL skips None).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Sequence

from pallm.data.manifest import SENTIMENTS
from pallm.errors import PallmError
from pallm.prompts.format import (CUE_LEVELS, CUE_PHRASES, TASKS, VOICE_CLAIM_RE, WORDS_CLAIM_RE, PromptConfig,
                                  parse_completion)

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}


def register(name: str, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add a reward under `name`. Also usable as `register("x")(make_something(...))`."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS and not replace:
            raise PallmError(f"reward '{name}' is already registered; pass replace=True to override it.")
        # TRL logs each reward as rewards/<fn.__name__>: make that the registry name.
        fn.__name__ = name
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        close = difflib.get_close_matches(name, REWARDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PallmError(f"unknown reward '{name}'.{hint} Registered rewards: {', '.join(sorted(REWARDS))}.")
    return REWARDS[name]


# --------------------------------------------------------------------------- row access

def completion_text(c: Any) -> str:
    """TRL passes plain strings, or for conversational data a list of messages."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content") or "")
    return "" if c is None else str(c)


def column(kwargs: dict, name: str, n: int, default: Any = None) -> list:
    """Per-completion values of a row field. A missing field is `default` for every row; a single
    non-list value (handy in tests and single-setting runs) applies to every row."""
    v = kwargs.get(name)
    if v is None:
        return [default] * n
    if name == "labels" and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return [list(v)] * n  # one label set for the whole batch
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise PallmError(f"reward kwarg '{name}' has {len(v)} values for {n} completions.")
        return [default if x is None else x for x in v]
    return [v] * n


def _tasks(kwargs: dict, n: int) -> list[str]:
    # No task column means a single-task classification run (the default task).
    return [str(t) for t in column(kwargs, "task", n, "classify")]


def _label_set(labels: list | None, target: str, gold: str | None = None) -> list[str]:
    """The row's label set; without one, the sentiments or every emotion name we know."""
    if labels:
        return [str(x).lower() for x in labels]
    return list(SENTIMENTS) if target != "emotion" else sorted(set(EMOTION_VA) | ({gold} if gold else set()))


# --------------------------------------------------------------------------- format

def _tags_once_in_order(text: str, tags: Sequence[str]) -> bool:
    """Each tag opens and closes exactly once, with content, and the blocks come in order."""
    pos = 0
    for tag in tags:
        if text.count(f"<{tag}>") != 1 or text.count(f"</{tag}>") != 1:
            return False
        start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
        if start < pos or end < start or not text[start + len(tag) + 2 : end].strip():
            return False
        pos = end
    return True


@register("format")
def format_reward(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """1.0: exactly `<think>..</think><answer>LABEL</answer>` (classify) or `<think>..</think>
    <response>..</response>` (respond), each tag once, nothing around them. 0.5: the right tags,
    once each and in order, but text around them or an answer that is not a bare label.
    0.0: otherwise. With `cot=False` rows no think part is expected."""
    n = len(completions)
    tasks, cots, labels = _tasks(kwargs, n), column(kwargs, "cot", n, True), column(kwargs, "labels", n)
    targets, emotions = column(kwargs, "target", n, "sentiment"), column(kwargs, "emotion", n)
    out: list[float | None] = []
    for text, task, cot, labs, tgt, emo in zip(map(completion_text, completions), tasks, cots, labels, targets,
                                               emotions):
        if task not in TASKS:
            out.append(None)
            continue
        tags = (["think"] if cot else []) + ["answer" if task == "classify" else "response"]
        once = _tags_once_in_order(text, tags)
        # parse_completion's strict check alone would accept two think blocks (its .*? spans them).
        if once and parse_completion(text, task, _label_set(labs, tgt, emo), cot=bool(cot)).format_ok:
            out.append(1.0)
        else:
            out.append(0.5 if once else 0.0)
    return out


# --------------------------------------------------------------------------- accuracy

def _accuracy(completions: list, kwargs: dict, target: str, score: Callable[[str | None, str], float]):
    n = len(completions)
    tasks, targets = _tasks(kwargs, n), column(kwargs, "target", n, "sentiment")
    golds, labels, cots = column(kwargs, target, n), column(kwargs, "labels", n), column(kwargs, "cot", n, True)
    out: list[float | None] = []
    for text, task, tgt, gold, labs, cot in zip(map(completion_text, completions), tasks, targets, golds, labels, cots):
        if task != "classify" or tgt != target or not gold:
            out.append(None)
            continue
        gold = str(gold).lower()
        pred = parse_completion(text, "classify", _label_set(labs, target, gold), cot=bool(cot)).label
        out.append(score(pred, gold))
    return out


@register("sentiment_accuracy")
def sentiment_accuracy(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """1/0 against the row's `sentiment`; None unless task=classify and target=sentiment."""
    return _accuracy(completions, kwargs, "sentiment", lambda pred, gold: float(pred == gold))


# Valence (-1/0/+1) and arousal (low/mid/high) of the emotion names the taxonomy uses. Circumplex
# placements (Russell 1980); delivery styles (whisper, fast, ...) are left out: exact match only.
EMOTION_VA: dict[str, tuple[int, str]] = {
    "happy": (1, "high"), "excited": (1, "high"), "laughing": (1, "high"), "awe": (1, "mid"),
    "angry": (-1, "high"), "frustrated": (-1, "high"), "fearful": (-1, "high"),
    "disgusted": (-1, "mid"), "sad": (-1, "low"), "bored": (-1, "low"),
    "neutral": (0, "mid"), "calm": (0, "low"), "sleepy": (0, "low"),
}


def emotion_similarity(pred: str | None, gold: str, table: dict[str, tuple[int, str]] = EMOTION_VA) -> float:
    """1 exact; 0.5 same valence and arousal (angry/frustrated); 0.3 same valence (angry/sad);
    0.2 same arousal (angry/happy); else 0. Valence counts more: it is the sentiment."""
    if pred is None:
        return 0.0
    if pred == gold:
        return 1.0
    if pred not in table or gold not in table:
        return 0.0
    (pv, pa), (gv, ga) = table[pred], table[gold]
    return 0.5 if (pv, pa) == (gv, ga) else 0.3 if pv == gv else 0.2 if pa == ga else 0.0


def make_emotion_accuracy(partial: bool = True, table: dict[str, tuple[int, str]] | None = None) -> RewardFn:
    """Emotion accuracy against the row's `emotion`; None unless task=classify and target=emotion."""
    table = EMOTION_VA if table is None else table

    def emotion_accuracy(prompts: list, completions: list, **kwargs) -> list[float | None]:
        score = (lambda p, g: emotion_similarity(p, g, table)) if partial else (lambda p, g: float(p == g))
        return _accuracy(completions, kwargs, "emotion", score)

    return emotion_accuracy


register("emotion_accuracy")(make_emotion_accuracy(partial=True))
register("emotion_accuracy_strict")(make_emotion_accuracy(partial=False))


# --------------------------------------------------------------------------- cue grounding

CUE_THRESHOLD = 0.43  # = pallm.acoustics.cues.DEFAULT_THRESHOLD (not imported: it pulls in pandas)
_PHRASE_RE = re.compile("|".join(CUE_PHRASES.values()))
_PHRASE_TO_CUE = {v: k for k, v in CUE_PHRASES.items()}
_LEVEL_RE = re.compile(r"\b(low|mid|high)\b")


def cue_claims(think: str) -> dict[str, str]:
    """Cue -> claimed level, or "conflict". Starts from the parser's claims and adds the hedge
    guard: a clause naming more than one level ("pitch level: low high mid", "low or mid") is a
    conflict, so listing every level can never be right."""
    text = think.lower()
    claims = dict(parse_completion(f"<think>{think}</think>", "respond").cue_claims)
    matches = list(_PHRASE_RE.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        clause = re.split(r"[.;,\n]", text[m.end() : end])[0]
        if len(set(_LEVEL_RE.findall(clause))) > 1:
            claims[_PHRASE_TO_CUE[m.group(0)]] = "conflict"
    return claims


def _near_edge(claimed: str, measured: str, z: float | None, threshold: float, margin: float) -> bool:
    """Off by one bin, and z within `margin` of the edge between the two bins."""
    i, j = CUE_LEVELS.index(claimed), CUE_LEVELS.index(measured)
    if z is None or abs(i - j) != 1:
        return False
    edge = -threshold if "low" in (claimed, measured) else threshold
    return abs(float(z) - edge) <= margin


def make_cue_grounding(
    cues: Sequence[str] | None = None,
    threshold: float = CUE_THRESHOLD,
    edge_margin: float = 0.1,
    edge_credit: float = 0.5,
) -> RewardFn:
    """(right - wrong) / available over the cues in `cues` (default: the prompt's cues, row field
    `prompt_cues` as the trainer passes it, else `PromptConfig().cues`) that the
    clip has a measured bin for. A conflicting claim is wrong; claims of unmeasured cues are
    ignored; claiming nothing scores 0. An off-by-one claim whose z (row `cue_z`) lies within
    `edge_margin` of the bin edge counts `edge_credit` right instead of wrong: the bin there is
    decided by measurement noise. None when the row has no measured cue or expects no think part
    (`cot=False`); an output with no think part scores 0, so dropping it is no escape."""
    cue_set = list(PromptConfig().cues if cues is None else cues)

    def cue_grounding(prompts: list, completions: list, **kwargs) -> list[float | None]:
        n = len(completions)
        rows = zip(map(completion_text, completions), column(kwargs, "cues", n), column(kwargs, "cue_z", n),
                   column(kwargs, "cot", n, True), column(kwargs, "prompt_cues", n, cue_set))
        out: list[float | None] = []
        for text, measured, zs, cot, asked in rows:
            asked = cue_set if cues is not None else asked  # an explicit `cues` wins
            # datasets fills a dict column's missing keys with None: None means "not measured".
            measured = {c: v for c, v in (measured or {}).items() if c in asked and v in CUE_LEVELS}
            zs = zs or {}
            if not measured or not cot:
                out.append(None)
                continue
            m = re.search(r"<think>(.*?)(?:</think>|$)", text, flags=re.S)
            claims = cue_claims(m.group(1)) if m else {}
            score = 0.0
            for cue, claim in claims.items():
                if cue not in measured:
                    continue
                if claim == measured[cue]:
                    score += 1.0
                elif claim != "conflict" and _near_edge(claim, measured[cue], zs.get(cue), threshold, edge_margin):
                    score += edge_credit
                else:
                    score -= 1.0
            out.append(score / len(measured))
        return out

    return cue_grounding


register("cue_grounding")(make_cue_grounding())


# --------------------------------------------------------------------------- affect grounding

_AFFECT_WORDS = set(EMOTION_VA) | set(SENTIMENTS)


def _one_claim(pattern: re.Pattern, think: str) -> str | None:
    """The single affect word a think part claims; "conflict" if it names two (in one clause or
    across repeats: hedging is never right); None if it makes no such claim."""
    found = {w for clause in pattern.findall(think.lower()) for w in re.findall(r"[a-z]+", clause)
             if w in _AFFECT_WORDS}
    return found.pop() if len(found) == 1 else ("conflict" if found else None)


def _valence(word: str) -> str | None:
    return word if word in SENTIMENTS else (SENTIMENTS[EMOTION_VA[word][0] + 1] if word in EMOTION_VA else None)


def _claim_matches(claim: str, gold: str) -> bool:
    """Exact, or one side is a sentiment and the other an emotion of that valence ("sad" for a
    negative gold, "negative" for a sad one): less specific is not wrong."""
    if claim == gold:
        return True
    return (claim in SENTIMENTS or gold in SENTIMENTS) and _valence(claim) == _valence(gold) is not None


@register("affect_grounding")
def affect_grounding(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """The think part's two affect claims, checked against the row: "the voice sounds E" against
    its `emotion` (or `sentiment`), and "the words sound L" against its `lexical_sentiment` when
    that is known and the prompt had the transcript. (right - wrong) / checkable claims; a missing
    claim scores 0, two different values for one claim are wrong. Applies to BOTH tasks: a reply's
    reasoning must hear the voice as well, so the respond task trains the same perception the
    classify task is scored on (and words read as words, kept apart from the voice, is the
    shortcut's antidote). None when nothing is checkable or no think part is expected."""
    n = len(completions)
    rows = zip(map(completion_text, completions), column(kwargs, "emotion", n), column(kwargs, "sentiment", n),
               column(kwargs, "lexical_sentiment", n), column(kwargs, "transcript_in_prompt", n, True),
               column(kwargs, "cot", n, True))
    out: list[float | None] = []
    for text, emotion, sentiment, lexical, said, cot in rows:
        checks = []
        voice_gold = str(emotion or sentiment or "").lower()
        if voice_gold:
            checks.append((VOICE_CLAIM_RE, voice_gold))
        if lexical and said:
            checks.append((WORDS_CLAIM_RE, str(lexical).lower()))
        if not checks or not cot:
            out.append(None)
            continue
        m = re.search(r"<think>(.*?)(?:</think>|$)", text, flags=re.S)
        think = m.group(1) if m else ""
        score = 0.0
        for pattern, gold in checks:
            claim = _one_claim(pattern, think)
            if claim is not None:
                score += 1.0 if claim != "conflict" and _claim_matches(claim, gold) else -1.0
        out.append(score / len(checks))
    return out


# --------------------------------------------------------------------------- length and repetition

def make_length_penalty(max_chars: int = 600) -> RewardFn:
    """0 up to `max_chars`, then -(excess / max_chars), floored at -1. Characters, not tokens, so
    the budget means the same with any tokenizer. The default is ~2x the longest SFT target."""

    def length_penalty(prompts: list, completions: list, **kwargs) -> list[float | None]:
        return [-min(1.0, max(0, len(completion_text(c)) - max_chars) / max_chars) + 0.0 for c in completions]

    return length_penalty


def make_repetition_penalty(n: int = 3) -> RewardFn:
    """-(share of word n-grams that repeat an earlier one): 0 for no repeats, near -1 for a loop.
    Completions shorter than 2n words score 0 (too short to loop)."""

    def repetition_penalty(prompts: list, completions: list, **kwargs) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            words = re.findall(r"[a-z0-9']+", completion_text(c).lower())
            grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            out.append(0.0 if len(words) < 2 * n else -(1 - len(set(grams)) / len(grams)) + 0.0)
        return out

    return repetition_penalty


register("length_penalty")(make_length_penalty())
register("repetition_penalty")(make_repetition_penalty())
