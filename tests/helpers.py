"""Pieces several test files share (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pallm.data.manifest import read_manifest, write_manifest
from pallm.data.parasynth import SynthConfig, synthesize
from pallm.model import encode_batch

CUES = ("pitch_level", "pitch_variability", "loudness", "rate", "voice_quality")


def synth_corpus_random_cues(out: Path, n: int, workers: int) -> Path:
    """A small ParaSynth corpus (8 speakers, seed 1) whose cue bins are drawn per row instead of
    measured: CoT targets without an opensmile run."""
    synthesize(SynthConfig(n=n, speakers=8, test_speakers=2, dev_speakers=2, workers=workers, seed=1), out)
    rows = read_manifest(out, resolve_audio=False)
    for r in rows:
        rng = random.Random(r.id)
        r.cues = {c: rng.choice(("low", "mid", "high")) for c in CUES}
    write_manifest(rows, out, overwrite=True)
    return out


def fit_two_clips(model, processor, audios, prompt: str, targets: list[str], steps: int = 25) -> list[float]:
    """AdamW on one batch (same prompt, one target per clip); the losses, step by step."""
    batch = encode_batch(processor, audios, [prompt] * len(audios), targets)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
