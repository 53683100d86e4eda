"""Rollout speed: GRPO's `HFBackend` against transformers' `generate`, same batches, same process.

    python benchmarks/rollout_bench.py --model runs/x/sft --data cache/parasynth-<hash>
    python benchmarks/rollout_bench.py --model runs/x/sft --data DIR --batches 6 --reps 3 --generations 8

Draws `--batches` prompt batches from the corpus's train split (half classify, half respond, as
the default task weights), each `--batch` prompts x `--generations` samples at temperature 1 up
to `--max-new-tokens`, and times, interleaved `--reps` times so that a noisy machine slows both
arms alike:

- backend: `HFBackend.generate` (one prefill per prompt, rows leave the batch as they finish,
  inverse-CDF sampling), what stage 2 runs;
- generate: `pallm.model.generate(do_sample=True, num_return_sequences=G)`, i.e. transformers'
  `generate` with the same logits processors (it prefills every prompt G times).

Prints seconds per batch, completion tokens per second and the mean longest completion per batch
(decode steps). One torch thread, as the trainer. Prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a PALLM checkpoint folder (e.g. runs/x/sft)")
    ap.add_argument("--data", required=True, help="a corpus folder with manifest.jsonl")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="prompts per batch (grpo.per_device_batch_size)")
    ap.add_argument("--generations", type=int, default=8, help="G (grpo.num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="grpo.max_completion_length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from pallm.data.audio import load_audio
    from pallm.data.manifest import read_manifest
    from pallm.model import generate, load_pretrained, read_pallm_meta
    from pallm.prompts.format import PromptConfig, build_prompt
    from pallm.train.rollout import HFBackend

    torch.set_num_threads(1)
    meta = read_pallm_meta(args.model)
    prompt_cfg = PromptConfig(**meta["task_format"])
    model, processor = load_pretrained(args.model)
    rows = [r for r in read_manifest(args.data) if r.split == "train" and r.response and r.sentiment]
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(args.batches + 1):  # the first is a warm-up, not timed
        picked = [rows[i] for i in rng.choice(len(rows), args.batch, replace=False)]
        tasks = ["classify" if k % 2 == 0 else "respond" for k in range(args.batch)]
        batches.append(([load_audio(r.audio) for r in picked],
                        [build_prompt(t, r, prompt_cfg, meta["labels"]) for t, r in zip(tasks, picked)]))

    G, n_new = args.generations, args.max_new_tokens
    backend = HFBackend(model, processor)
    arms = {
        "backend": lambda a, p: backend.generate(a, p, G, 1.0, 1.0, n_new),
        "generate": lambda a, p: generate(model, processor, a, p, do_sample=True, temperature=1.0, top_p=1.0,
                                          num_return_sequences=G, max_new_tokens=n_new, return_ids=True)[1],
    }
    totals = {k: {"seconds": 0.0, "tokens": 0, "decode_steps": 0} for k in arms}
    for fn in arms.values():
        fn(*batches[0])
    for _ in range(args.reps):
        for name, fn in arms.items():
            for audios, prompts in batches[1:]:
                t0 = time.perf_counter()
                ids = fn(audios, prompts)
                totals[name]["seconds"] += time.perf_counter() - t0
                totals[name]["tokens"] += sum(map(len, ids))
                totals[name]["decode_steps"] += max(map(len, ids))
    n = args.batches * args.reps
    out = {name: {"s_per_batch": t["seconds"] / n, "tokens_per_s": t["tokens"] / t["seconds"],
                  "mean_tokens_per_row": t["tokens"] / n / (args.batch * G),
                  "mean_longest_row": t["decode_steps"] / n} for name, t in totals.items()}
    out["speedup"] = out["generate"]["s_per_batch"] / out["backend"]["s_per_batch"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
