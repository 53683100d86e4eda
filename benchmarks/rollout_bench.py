"""Rollout speed: GRPO's `HFBackend` against transformers' `generate`, same batches, same process.

    python benchmarks/rollout_bench.py --model runs/x/sft --data cache/parasynth-<hash>
    python benchmarks/rollout_bench.py --model runs/x/sft --data DIR --batches 6 --reps 3 --generations 8
    python benchmarks/rollout_bench.py --model runs/x/sft --data DIR --threads 1,2 --update

Draws `--batches` prompt batches from the corpus's train split (half classify, half respond, as
the default task weights), each `--batch` prompts x `--generations` samples at temperature 1 up
to `--max-new-tokens`, and times, interleaved `--reps` times so that a noisy machine slows both
arms alike:

- backend: `HFBackend.generate` (one prefill per prompt, rows leave the batch as they finish,
  inverse-CDF sampling), what stage 2 runs;
- generate: `pallm.model.generate(do_sample=True, num_return_sequences=G)`, i.e. transformers'
  `generate` with the same logits processors (it prefills every prompt G times).

With `--update`, also the stage-2 update of each batch: `PolicyScorer` forward and backward of a
policy-gradient loss over the backend's completions of that batch (what one micro-batch costs).
`--threads 1,2` runs every arm at each torch thread count, interleaved in the same way.

Prints seconds per batch, completion tokens per second and the mean longest completion per batch
(decode steps). Prints numbers; it is not a test.
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
    ap.add_argument("--threads", default=str(torch.get_num_threads()),
                    help="comma-separated torch thread counts to compare, e.g. 1,2 (default: torch's)")
    ap.add_argument("--update", action="store_true", help="also time the update (scorer forward + backward)")
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    from pallm.data.audio import load_audio
    from pallm.data.manifest import read_manifest
    from pallm.model import encode_batch, generate, load_pretrained, read_pallm_meta
    from pallm.prompts.format import PromptConfig, build_prompt
    from pallm.train.grpo import PolicyScorer, completion_tensors
    from pallm.train.rollout import HFBackend

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
    scorer = PolicyScorer(model, temperature=1.0)
    rollouts = [backend.generate(a, p, G, 1.0, 1.0, n_new) for a, p in batches]  # the update's inputs

    def update(audios, prompts, rows):
        enc = encode_batch(processor, audios, prompts, padding_side="left")
        ids, mask = completion_tensors(rows, 0)
        model.train()
        model.zero_grad()
        logp, _ = scorer(enc["input_ids"], enc["attention_mask"], enc["input_features"],
                         enc["feature_attention_mask"], ids, mask, with_entropy=False)
        (-(logp * mask).sum() / mask.sum()).backward()
        model.eval()
        return rows

    kinds = {
        "backend": lambda a, p, r: backend.generate(a, p, G, 1.0, 1.0, n_new),
        "generate": lambda a, p, r: generate(model, processor, a, p, do_sample=True, temperature=1.0, top_p=1.0,
                                             num_return_sequences=G, max_new_tokens=n_new, return_ids=True)[1],
    }
    if args.update:
        kinds["update"] = update
    arms = {(f"{k}@{t}threads" if len(thread_counts) > 1 else k): (fn, t)
            for t in thread_counts for k, fn in kinds.items()}
    totals = {k: {"seconds": 0.0, "tokens": 0, "decode_steps": 0} for k in arms}
    for fn, t in arms.values():
        torch.set_num_threads(t)
        fn(*batches[0], rollouts[0])
    for _ in range(args.reps):
        for name, (fn, t) in arms.items():
            torch.set_num_threads(t)
            for (audios, prompts), rows in zip(batches[1:], rollouts[1:]):
                t0 = time.perf_counter()
                ids = fn(audios, prompts, rows)
                totals[name]["seconds"] += time.perf_counter() - t0
                totals[name]["tokens"] += sum(map(len, ids))
                totals[name]["decode_steps"] += max(map(len, ids))
    n = args.batches * args.reps
    out = {name: {"s_per_batch": t["seconds"] / n, "tokens_per_s": t["tokens"] / t["seconds"],
                  "mean_tokens_per_row": t["tokens"] / n / (args.batch * G),
                  "mean_longest_row": t["decode_steps"] / n} for name, t in totals.items()}
    for t in thread_counts:
        at = f"@{t}threads" if len(thread_counts) > 1 else ""
        out[f"speedup{at}"] = out[f"generate{at}"]["s_per_batch"] / out[f"backend{at}"]["s_per_batch"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
