"""Do two rollout implementations sample the same behaviour? Same policy, same classify prompts.

    python benchmarks/rollout_ab.py --model runs/x/grpo --data cache/parasynth-<hash> \
        --other /path/to/other/checkout/pallm/train/rollout.py --batches 60

Loads `HFBackend` from `--other` (e.g. an older checkout's `pallm/train/rollout.py`) beside this
checkout's, draws `--batches` batches of 4 train rows (classify prompts), samples G=8 completions
per prompt from each backend (temperature 1, different RNG draws), and prints, paired by prompt,
the sampled accuracy, parse rate and completion length of each and their difference with its
standard error, plus seconds per batch. Tests check that the distributions are equal step by
step; this checks the whole rollout's behaviour at scale. Prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a PALLM checkpoint folder")
    ap.add_argument("--data", required=True, help="a corpus folder with manifest.jsonl")
    ap.add_argument("--other", required=True, help="path to another rollout.py whose HFBackend is compared")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from pallm.data.audio import load_audio
    from pallm.data.manifest import read_manifest
    from pallm.model import load_pretrained, read_pallm_meta
    from pallm.prompts.format import PromptConfig, build_prompt, parse_completion
    from pallm.train.rollout import HFBackend

    spec = importlib.util.spec_from_file_location("other_rollout", args.other)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    meta = read_pallm_meta(args.model)
    prompt_cfg, labels = PromptConfig(**meta["task_format"]), meta["labels"]
    model, processor = load_pretrained(args.model)
    rows = [r for r in read_manifest(args.data) if r.split == "train" and r.sentiment]
    rng = np.random.default_rng(args.seed)
    arms = {"other": other.HFBackend(model, processor), "this": HFBackend(model, processor)}
    stats = {k: {"accuracy": [], "parse_rate": [], "length": []} for k in arms}
    seconds = dict.fromkeys(arms, 0.0)
    G = 8
    for b in range(args.batches):
        picked = [rows[i] for i in rng.choice(len(rows), 4, replace=False)]
        audios = [load_audio(r.audio) for r in picked]
        prompts = [build_prompt("classify", r, prompt_cfg, labels) for r in picked]
        for k, backend in arms.items():
            torch.manual_seed(2 * b + (k == "this"))
            t0 = time.perf_counter()
            ids = backend.generate(audios, prompts, G, 1.0, 1.0, 96)
            seconds[k] += time.perf_counter() - t0
            for g, row in enumerate(picked):
                group = ids[g * G:(g + 1) * G]
                parsed = [parse_completion(processor.tokenizer.decode(x, skip_special_tokens=True), "classify", labels,
                                           prompt_cfg.cot) for x in group]
                stats[k]["accuracy"].append(np.mean([p.label == row.sentiment for p in parsed]))
                stats[k]["parse_rate"].append(np.mean([p.label is not None for p in parsed]))
                stats[k]["length"].append(np.mean([len(x) for x in group]))
    for name in ("accuracy", "parse_rate", "length"):
        diff = np.array(stats["this"][name]) - np.array(stats["other"][name])
        print(f"{name}: other {np.mean(stats['other'][name]):.4f}  this {np.mean(stats['this'][name]):.4f}  "
              f"this - other {diff.mean():+.4f} (se {diff.std(ddof=1) / len(diff) ** 0.5:.4f}, {len(diff)} prompts)")
    print("seconds per batch: " + ", ".join(f"{k} {v / args.batches:.3f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
