"""Training examples: (row, task, prompt, target) for stage 1, and the texts the tiny tokenizer needs.

One *epoch* of examples is every usable training row exactly once, each with one task. The task
is assigned by quota, so the shares follow `tasks` (the task weights) exactly up to rounding:
with `{"classify": 0.5, "respond": 0.5}` and 1000 rows, 500 rows are classify examples and 500
are respond examples. Which row gets which task is drawn from `seed`; the trainer passes a
different seed for every epoch, so over several epochs each row is seen in every task roughly in
proportion to the weights (a mixture stream), while one epoch never repeats a clip.

A row that cannot serve a task is never given it: `respond` needs a reference reply
(`response`), `classify` needs the label for the prompt's target. Such rows go to the tasks they
can serve (by weight); rows that can serve none are left out.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

from pallm.data.manifest import Row
from pallm.errors import ConfigError, PallmError
from pallm.prompts.format import TASKS, PromptConfig, build_prompt, build_target, label_set
from pallm.train.common import AudioCache  # noqa: F401  (re-exported: the cache examples are read through)

__all__ = [
    "AudioCache",
    "Example",
    "build_examples",
    "can_serve",
    "check_cues",
    "check_task_weights",
    "gold",
    "tokenizer_texts",
]


@dataclass(frozen=True)
class Example:
    row: Row
    task: str  # "classify" or "respond"
    prompt: str  # the user turn (the audio goes before it, placed by the chat template)
    target: str  # the completion the model is trained to produce
    transcript: bool = True  # False: the prompt left the transcript out (sft./grpo.transcript_dropout)


def gold(row: Row, prompt_cfg: PromptConfig) -> str | None:
    """The row's label for the prompt's target (sentiment or emotion)."""
    return row.sentiment if prompt_cfg.target == "sentiment" else row.emotion


def can_serve(row: Row, task: str, prompt_cfg: PromptConfig) -> bool:
    if task == "classify":
        return gold(row, prompt_cfg) is not None
    if task == "respond":
        # the think part names the voice's emotion (or sentiment); the target is the reference reply
        return bool(row.response) and (row.emotion or row.sentiment) is not None
    raise ConfigError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}.")


def check_task_weights(tasks: Mapping[str, float]) -> dict[str, float]:
    """Validated weights, zero-weight tasks dropped."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"task_weights: unknown task(s) {unknown}; tasks are {', '.join(TASKS)}.")
    if any(w < 0 for w in tasks.values()):
        raise ConfigError(f"task_weights: weights must be >= 0, got {dict(tasks)}.")
    out = {t: float(w) for t, w in tasks.items() if w > 0}
    if not out:
        raise ConfigError(f"task_weights: at least one task needs a positive weight, got {dict(tasks)}.")
    return out


def _task_weights_field(v: dict[str, float]) -> dict[str, float]:
    try:
        check_task_weights(v)
    except ConfigError as e:
        raise ValueError(str(e).removeprefix("task_weights: ")) from None
    return v


# The `task_weights` config field of both stages: task name -> share of examples/prompts.
TaskWeights = Annotated[dict[str, float], AfterValidator(_task_weights_field)]


def check_cues(rows: Sequence[Row], prompt_cfg: PromptConfig, where: str = "the corpus") -> None:
    """The CoT target describes measured cues, and a speaker-reference prompt plays each row's
    `reference_audio`: every row must have what its prompt needs (both come from `pallm data cues`)."""
    option = prompt_cfg.reference_switch
    if option:
        lacking = [r for r in rows if not r.reference_audio]
        if lacking:
            raise PallmError(
                f"{where}: {len(lacking)} of {len(rows)} rows have no `reference_audio` (e.g. '{lacking[0].id}'), and "
                f"{option} hears each clip against one. Run `pallm data cues {where}` to add them, "
                f"or set {option}=false."
            )
    if not prompt_cfg.cot:
        return
    missing = [r for r in rows if r.cues is None]
    if missing:
        raise PallmError(
            f"{where}: {len(missing)} of {len(rows)} training rows have no measured `cues` (e.g. '{missing[0].id}'); "
            f"the chain-of-thought target is built from them. Run `pallm data cues {where}` first, "
            "or train without chain-of-thought (prompt.cot=false)."
        )


def _quotas(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of n * share (ties broken by task order)."""
    total = sum(weights.values())
    raw = {t: n * w / total for t, w in weights.items()}
    out = {t: int(v) for t, v in raw.items()}
    rest = n - sum(out.values())
    for t in sorted(raw, key=lambda t: (-(raw[t] - out[t]), TASKS.index(t)))[:rest]:
        out[t] += 1
    return out


def build_examples(
    rows: Sequence[Row],
    tasks: Mapping[str, float],
    prompt_cfg: PromptConfig,
    labels: list[str] | None = None,
    seed: int = 0,
    transcript_dropout: float = 0.0,
) -> list[Example]:
    """One epoch: each usable row once, in a seeded random order, with a task assigned so that the
    task shares match `tasks` (weights, need not sum to 1) exactly up to rounding among rows that
    can serve every weighted task. Rows that can serve only some tasks get one of those (drawn by
    weight); rows that can serve none are dropped. With `transcript_dropout` p (and a prompt that
    gives the transcript), a seeded share p of the examples is built as if `prompt.transcript`
    were false: no words in the prompt, no words claim in the target, so the voice claim must come
    from the audio. Deterministic in (rows, tasks, seed, transcript_dropout)."""
    weights = check_task_weights(tasks)
    labels = labels or label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))
    rng = random.Random(seed)
    order = list(rows)
    rng.shuffle(order)

    full: list[Row] = []
    partial: list[tuple[Row, list[str]]] = []
    for r in order:
        ok = [t for t in weights if can_serve(r, t, prompt_cfg)]
        if len(ok) == len(weights):
            full.append(r)
        elif ok:
            partial.append((r, ok))

    assigned: list[tuple[Row, str]] = []
    quota = _quotas(len(full), weights)
    tags = [t for t in weights for _ in range(quota[t])]
    rng.shuffle(tags)
    assigned += list(zip(full, tags))
    for r, ok in partial:
        assigned.append((r, rng.choices(ok, weights=[weights[t] for t in ok])[0]))
    rng.shuffle(assigned)
    no_words = prompt_cfg.model_copy(update={"transcript": False})
    out = []
    for r, t in assigned:
        cfg = no_words if prompt_cfg.transcript and rng.random() < transcript_dropout else prompt_cfg
        out.append(Example(r, t, build_prompt(t, r, cfg, labels), build_target(t, r, cfg), transcript=cfg.transcript))
    return out


def tokenizer_texts(rows: Iterable[Row], prompt_cfg: PromptConfig, labels: list[str] | None = None) -> list[str]:
    """Every text the tiny tokenizer should cover: prompts and targets of both tasks, transcripts
    and reference replies (texts outside it still encode, byte by byte; these steer the merges)."""
    rows = list(rows)
    labels = labels or label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))
    texts: list[str] = []
    for r in rows:
        for task in TASKS:
            texts.append(build_prompt(task, r, prompt_cfg, labels))
            if task == "classify" and gold(r, prompt_cfg) is None:
                continue
            if task == "respond" and not r.response:
                continue
            texts.append(build_target(task, r, prompt_cfg))
        texts += [t for t in (r.transcript, r.response) if t]
    return texts


def select_train_rows(rows: Sequence[Row], prompt_cfg: PromptConfig, label_budget: int | None, seed: int,
                      where: str = "corpus") -> list[Row]:
    """Labelled train rows (the prompt target's label present); with a budget, a seeded random
    subset of that size (nested across budgets for one seed), in manifest order."""
    train = [r for r in rows if r.split == "train"]
    if not train:
        raise PallmError(f"{where}: no rows in the train split; stage 1 needs training data (split: train).")
    labelled = [r for r in train if gold(r, prompt_cfg) is not None]
    if not labelled:
        raise PallmError(f"{where}: none of the {len(train)} train rows has a '{prompt_cfg.target}' label to train on.")
    if label_budget is not None:
        if label_budget > len(labelled):
            raise PallmError(f"label_budget={label_budget}, but {where} has only {len(labelled)} labelled train rows.")
        order = sorted(labelled, key=lambda r: r.id)
        random.Random(seed).shuffle(order)
        keep = {r.id for r in order[:label_budget]}
        labelled = [r for r in labelled if r.id in keep]
    return labelled


def select_dev_rows(rows: Sequence[Row], prompt_cfg: PromptConfig, n: int, seed: int) -> list[Row]:
    dev = sorted((r for r in rows if r.split == "dev" and gold(r, prompt_cfg) is not None), key=lambda r: r.id)
    random.Random(seed).shuffle(dev)
    return dev[:n]


class ExampleStream:
    """The endless, deterministic training stream: epoch e is `build_examples(rows, ...,
    seed=f(seed, e))`. Example i of the stream is a pure function of (rows, config, seed, i),
    which is what makes resuming exact and the per-process split independent of timing."""

    def __init__(self, rows: Sequence[Row], weights: dict[str, float], prompt_cfg: PromptConfig, labels: list[str], seed: int,
                 transcript_dropout: float = 0.0):
        self._args = (list(rows), weights, prompt_cfg, labels, transcript_dropout)
        self.seed = seed
        self._cache: dict[int, list[Example]] = {}
        self.n = len(self.epoch(0))
        if self.n == 0:
            raise PallmError("no training example could be built (no row can serve any weighted task).")

    def epoch(self, e: int) -> list[Example]:
        if e not in self._cache:
            rows, weights, prompt_cfg, labels, dropout = self._args
            self._cache = {k: v for k, v in self._cache.items() if k >= e - 1}  # keep memory flat
            self._cache[e] = build_examples(rows, weights, prompt_cfg, labels, seed=self.seed * 1_000_003 + e,
                                            transcript_dropout=dropout)
        return self._cache[e]

    def take(self, start: int, count: int) -> list[Example]:
        return [self.epoch(i // self.n)[i % self.n] for i in range(start, start + count)]
