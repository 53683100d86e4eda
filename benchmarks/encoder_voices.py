"""Can the tiny audio encoder tell the emotions apart in voices it has never heard? A diagnostic.

    python benchmarks/encoder_voices.py                          # ParaSynth with 40 and 80 speakers
    python benchmarks/encoder_voices.py --speakers 40,60,80 --seeds 0,1 --steps 1000
    python benchmarks/encoder_voices.py --speakers 80 --seeds 0,1 --save 'runs/warm/seed{seed}'
    python benchmarks/encoder_voices.py --speakers 40 --seeds 0,1 --speaker-norm   # clips relative to the speaker

No language model, no prompt: the tiny model's audio encoder (the same architecture and init as
the speech LLM's), mean-pooled over the clip, with a linear head, trained with cross-entropy on the
voice emotion of ParaSynth's train split and scored (UA) on its test split, whose speakers never
occur in train. If this fails, no prompt, chain-of-thought or RL recipe on top of it can succeed:
the model cannot hear the voice of a new speaker. Train and test UA side by side show whether the
gap is memorised voices (docs/stage2_experiments.md, "Where the hearing is lost"). `--save` keeps each trained
model (its encoder warmed up, the rest as initialised, the tokenizer stage 1 would train) as a
checkpoint that stage 1 can start from: `benchmarks/stage2_vs_stage1.py --sft-init 'runs/warm/seed{seed}'`.
`--speaker-norm` feeds the encoder what `prompt.speaker_norm` does: each clip's log-mel with its
speaker reference's mean spectrum taken out.
Prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from pallm.cli.stages import _corpus_of, load_run_config
from pallm.data.audio import load_audio
from pallm.data.manifest import read_manifest
from pallm.model.batch import normalize_by_speaker
from pallm.model.build import ModelSpec, build_tiny, save_checkpoint
from pallm.prompts.format import label_set
from pallm.train.common import audio_tower
from pallm.train.examples import select_train_rows, tokenizer_texts


def mels(processor, rows, speaker_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features (the encoder's input) and valid frame counts of `rows`' clips, each
    normalised by its speaker reference with `speaker_norm` (as `prompt.speaker_norm` does)."""
    fe = processor.feature_extractor
    clips = [load_audio(r.audio)[: fe.n_samples] for r in rows]
    f = fe(clips, sampling_rate=fe.sampling_rate, return_attention_mask=True, return_tensors="np")
    x, frames = f["input_features"], f["attention_mask"].sum(1)
    if speaker_norm:
        x = normalize_by_speaker(processor, x, frames, {i: load_audio(r.reference_audio) for i, r in enumerate(rows)})
    return torch.from_numpy(x), torch.from_numpy(frames)


def features(processor, corpus, split: str, emotions: list[str], speaker_norm: bool = False):
    """Log-mel features, valid frame counts and emotion ids of one split."""
    rows = read_manifest(corpus, split=split)
    return *mels(processor, rows, speaker_norm), torch.tensor([emotions.index(r.emotion) for r in rows])


def pooled(encoder, mels: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Mean over the clip's own encoder outputs (4 mel frames each), not over the window's padding."""
    h = encoder(mels).last_hidden_state
    n = (frames // 4).clamp(1, h.shape[1])
    keep = (torch.arange(h.shape[1])[None] < n[:, None]).float()[..., None]
    return (h * keep).sum(1) / keep.sum(1)


def predict(encoder, head, mels, frames) -> np.ndarray:
    encoder.eval()
    with torch.no_grad():
        out = torch.cat([head(pooled(encoder, mels[i : i + 64], frames[i : i + 64])).argmax(1) for i in range(0, len(mels), 64)])
    encoder.train()
    return out.numpy()


def run(cfg, corpus, seed: int, steps: int, batch: int, lr: float, save: str | None,
        speaker_norm: bool = False) -> list[tuple[int, float, float]]:
    emotions = list(cfg.data.synth.emotions)
    rows = read_manifest(corpus)
    labels = label_set(cfg.prompt, sorted({r.emotion for r in rows if r.emotion}))
    texts = tokenizer_texts(select_train_rows(rows, cfg.prompt, None, seed), cfg.prompt, labels)  # as stage 1 would
    model, processor = build_tiny(texts, ModelSpec(tiny={"seed": seed}))
    encoder = audio_tower(model)
    train = features(processor, corpus, "train", emotions, speaker_norm)
    test = features(processor, corpus, "test", emotions, speaker_norm)
    torch.manual_seed(seed)  # the head is drawn from the global generator: same seed, same numbers
    head = torch.nn.Linear(encoder.config.d_model, len(emotions))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    curve = []
    for step in range(1, steps + 1):
        i = torch.randint(0, len(train[2]), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(head(pooled(encoder, train[0][i], train[1][i])), train[2][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps:
            seen = torch.randperm(len(train[2]), generator=gen)[:400]  # train UA on a sample: cheaper
            ua_train = balanced_accuracy_score(train[2][seen], predict(encoder, head, train[0][seen], train[1][seen]))
            ua_test = balanced_accuracy_score(test[2], predict(encoder, head, test[0], test[1]))
            curve.append((step, ua_train, ua_test))
    if save:
        save_checkpoint(model.eval(), processor, save.format(seed=seed), {"stage": "encoder_warmup", "steps": steps})
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", default="40,80", help="ParaSynth speaker counts (train = n - 8 test - 4 dev)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--save", default=None, help="save each model as a stage-1 starting checkpoint; {seed} is replaced")
    ap.add_argument("--speaker-norm", action="store_true", help="normalise each clip by its speaker reference")
    a = ap.parse_args()
    configs = {n: load_run_config(None, [f"data.synth.speakers={n}"]) for n in (int(s) for s in a.speakers.split(","))}
    corpora = {n: _corpus_of(cfg) for n, cfg in configs.items()}  # synthesised on first use, then cached
    print("| speakers | seed | step | UA train voices | UA unseen voices |\n| --- | --- | --- | --- | --- |")
    for speakers, cfg in configs.items():
        for seed in (int(s) for s in a.seeds.split(",")):
            t0 = time.perf_counter()
            for step, ua_train, ua_test in run(cfg, corpora[speakers], seed, a.steps, a.batch, a.lr, a.save,
                                               a.speaker_norm):
                print(f"| {speakers} | {seed} | {step} | {ua_train:.3f} | {ua_test:.3f} |", flush=True)
            print(f"({speakers} speakers, seed {seed}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
