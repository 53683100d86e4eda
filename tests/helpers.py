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


def check_hf_backend_decoding(model, processor, audios, prompts, monkeypatch, G: int = 2, max_new_tokens: int = 12,
                              temperature: float = 0.7) -> None:
    """`HFBackend` against the model itself, with its sampler made greedy and watched: every row is
    its prompt's greedy `generate` output cut at the first stop token, and every distribution it
    sampled from is the softmax(logits / temperature) of a plain forward pass over (clip, prompt,
    completion) at that position, banned tokens at zero. One prompt is made to stop early so the
    others decode on after it leaves the batch (positions, masks and cache of the rest must follow)."""
    from pallm.model import banned_token_ids, generate
    from pallm.model.batch import IGNORE_INDEX
    from pallm.train import rollout

    _, ref = generate(model, processor, audios, prompts, max_new_tokens=max_new_tokens, return_ids=True)
    backend = rollout.HFBackend(model, processor)
    # An extra stop token that some prompts emit before their last step and as many as possible never.
    def split(t: int) -> tuple[int, int]:
        return sum(t in r[:-1] for r in ref), sum(t not in r for r in ref)

    early = max((t for r in ref for t in r if all(split(t))), key=lambda t: split(t)[1])
    backend._stop = [*backend._stop, early]
    want = [rollout.cut_at_stop([r], backend._stop)[0] for r in ref for _ in range(G)]
    assert len({len(r) for r in want}) > 1, "the rows must finish at different steps"
    seen = []
    monkeypatch.setattr(rollout, "sample_tokens", lambda probs: seen.append(probs) or probs.argmax(-1))
    assert backend.generate(audios, prompts, G, temperature, 1.0, max_new_tokens) == want

    plain = encode_batch(processor, [a for a in audios for _ in range(G)], [p for p in prompts for _ in range(G)], want)
    with torch.no_grad():
        logits = model(**{k: v for k, v in plain.items() if k != "labels"}).logits.float()
    logits[..., banned_token_ids(model, processor)] = -float("inf")
    for t, probs in enumerate(seen):
        live = [r for r in range(len(want)) if len(want[r]) > t]  # rows still decoding at step t, in order
        assert probs.shape[0] == len(live)
        for j, r in enumerate(live):
            pos = (plain["labels"][r] != IGNORE_INDEX).nonzero().squeeze(-1)[t] - 1  # predicts completion token t
            assert torch.allclose(probs[j], (logits[r, pos] / temperature).softmax(-1), atol=1e-5)

    # Prompts encoded by the caller (the trainer hands over the encoding its update uses) are what is
    # decoded: given the prompts' encoding in reverse order, the groups come out reversed.
    encoded = encode_batch(processor, audios[::-1], prompts[::-1], padding_side="left")
    groups = [want[i:i + G] for i in range(0, len(want), G)]
    assert backend.generate(audios, prompts, G, temperature, 1.0, max_new_tokens, prompt_inputs=encoded) == \
        [r for g in groups[::-1] for r in g]

    # Rollouts run in inference mode: nothing they leave on the model (a buffer cached on the way)
    # may be an inference tensor, or the update that follows could not backpropagate through it.
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    model(**plain).loss.backward()
    model.zero_grad()
