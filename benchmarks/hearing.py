"""What does a trained speech LLM hear, and does its answer use it? A diagnostic for one checkpoint.

    python benchmarks/hearing.py --model runs/l4/seed0/sft_long --data cache/parasynth-5f0522412da5

1. Encoder: a logistic-regression probe on the checkpoint's audio-encoder output (mean over the
   clip), fitted on the train split's voice emotions, scored (UA) on the test split's unseen
   speakers: how much of the voice the encoder carries, whether or not the language model reads it.
2. Language model, from `pallm eval`'s predictions on the test split (`MODEL/eval-test`, written
   if missing): how often its "the voice sounds E" claim and its cue claims are right, and how far
   the voice claim is fixed by the cue claims it made before it (the share of outputs whose voice
   claim is the majority one among outputs with the same cue claims; 1.0 = the model names the
   emotion from its own claims, not from the audio). Recall per voice emotion of claim and answer.

Prints numbers; it is not a test (docs/stage2_experiments.md, "Where the hearing is lost").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from pallm.data.manifest import manifest_path, read_manifest
from pallm.model.build import load_pretrained, read_pallm_meta
from pallm.prompts.format import parse_completion
from pallm.train.common import audio_tower

from encoder_voices import mels, pooled  # the same features and clip average as the encoder is trained with there


def encoder_features(model, processor, rows, speaker_norm: bool = False) -> np.ndarray:
    """The encoder output averaged over each clip, 64 clips at a time (real checkpoints' windows are
    long); the clips normalised by their speaker reference for `prompt.speaker_norm` models."""
    encoder, out = audio_tower(model), []
    for i in range(0, len(rows), 64):
        x, frames = mels(processor, rows[i : i + 64], speaker_norm)
        with torch.no_grad():
            out.append(pooled(encoder, x, frames).numpy())
    return np.concatenate(out)


def probe(model_dir: Path, data: Path) -> float:
    model, processor = load_pretrained(model_dir)
    norm = bool((read_pallm_meta(model_dir).get("task_format") or {}).get("speaker_norm"))
    train, test = read_manifest(data, split="train"), read_manifest(data, split="test")
    x_train, x_test = encoder_features(model, processor, train, norm), encoder_features(model, processor, test, norm)
    scale = StandardScaler().fit(x_train)
    lr = LogisticRegression(max_iter=3000).fit(scale.transform(x_train), [r.emotion for r in train])
    return balanced_accuracy_score([r.emotion for r in test], lr.predict(scale.transform(x_test)))


def claims(model_dir: Path, data: Path) -> dict:
    preds = model_dir / "eval-test" / "predictions.jsonl"
    if not preds.exists():
        subprocess.run([sys.executable, "-m", "pallm", "eval", "--model", str(model_dir), "--data", str(data),
                        "--split", "test", "--no-probes", "--out", str(preds.parent)], check=True, capture_output=True)
    scored_on = json.loads((preds.parent / "metrics.json").read_text())["data"]
    if manifest_path(scored_on).resolve() != manifest_path(data).resolve():  # same ids, other clips: silent nonsense
        sys.exit(f"{preds.parent} was evaluated on {scored_on}, not on {data}: pass --data {scored_on}")
    rows = {r.id: r for r in read_manifest(data, split="test")}
    by_claims: dict[tuple, Counter] = defaultdict(Counter)
    voice_right, cue_right = [], []
    recall: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for line in preds.read_text().splitlines():
        p = json.loads(line)
        row = rows[p["id"]]
        recall["answer"][row.emotion].append(p["label"] == p["gold"])
        parsed = parse_completion(p["output"], "classify")
        said = parsed.voice_claim
        if said is None:
            continue
        voice_right.append(said == row.emotion)
        recall["voice claim"][row.emotion].append(said == row.emotion)
        made = parsed.cue_claims
        if made and row.cues:
            cue_right.append(np.mean([row.cues.get(c) == v for c, v in made.items()]))
        by_claims[tuple(sorted(made.items()))][said] += 1
    fixed = sum(c.most_common(1)[0][1] for c in by_claims.values()) / max(1, sum(sum(c.values()) for c in by_claims.values()))
    return {"voice claims right": np.mean(voice_right), "cue claims right": np.mean(cue_right),
            "voice claim fixed by cue claims": fixed,
            **{f"recall ({k})": {e: round(float(np.mean(v)), 2) for e, v in sorted(r.items())} for k, r in recall.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, nargs="+", help="checkpoint folder(s)")
    ap.add_argument("--data", type=Path, required=True, help="the corpus (train split for the probe, test to score)")
    ap.add_argument("--no-probe", action="store_true", help="skip the encoder probe (part 1)")
    a = ap.parse_args()
    for m in a.model:
        print(f"{m}:")
        if not a.no_probe:
            print(f"  encoder probe, emotion UA on unseen speakers: {probe(m, a.data):.3f}")
        for k, v in claims(m, a.data).items():
            print(f"  {k}: {v if isinstance(v, dict) else round(float(v), 3)}")


if __name__ == "__main__":
    main()
