"""Does stage 2 beat stage 1 at the same training budget? The experiment behind issue 4's claim.

    python benchmarks/stage2_vs_stage1.py                       # 3 seeds, ~13 min per seed alone here
    python benchmarks/stage2_vs_stage1.py grpo.conflict_share=0.5 --seeds 0 --out runs/s2
    python benchmarks/stage2_vs_stage1.py --style-strength 1.0 --out runs/s2_hard   # the harder corpus
    python benchmarks/stage2_vs_stage1.py prompt.speaker_reference=true --out runs/ref  # both stages hear a reference
    python benchmarks/stage2_vs_stage1.py --select-best sft.keep_checkpoints=8 sft.eval_rows=300 \
        grpo.keep_checkpoints=9 grpo.eval_rows=300 --out runs/sel    # + dev-best checkpoints compared
    python benchmarks/stage2_vs_stage1.py --average-last 2 --out runs/s2   # + last-2 checkpoint averages

Per seed (the run seed and the tiny model's init seed: initial weights, data order, sampling):

- `sft`        stage 1, `--sft-steps` steps (the start of stage 2);
- `sft_long`   stage 1 for `--sft-steps + --grpo-steps` steps: the same number of optimizer steps
               as stage 1 + stage 2 (the budget-matched comparison the issue asks for);
- `grpo`       stage 2 from `sft`, the default multi-task recipe (plus any overrides given);
- `grpo_single` the same, classification only (task_weights classify 1 / respond 0).

Every model is evaluated with `pallm eval` (greedy) on the ParaSynth test split. Prints UA on all /
congruent / conflict rows per seed, the means, and the issue's three checks:
conflict(grpo) - conflict(sft_long) >= +8 points, congruent(grpo) >= congruent(sft_long) - 2, and
UA all(grpo) >= UA all(grpo_single) (classification). Finished steps are reused, so an interrupted run resumes.
Several processes at once (e.g. one per seed) on a small CPU: add `sft.threads=1 grpo.threads=1`, or
each trainer takes every core and they spin-wait on each other (docs/training.md, "Threads").
Prints numbers; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import get_args

from pallm.cli.stages import load_run_config
from pallm.errors import PallmError
from pallm.model.build import average_checkpoints
from pallm.train.common import BestModelFields, DevMetric, checkpoints_to_average


def sh(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "pallm", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed (exit {r.returncode}): pallm {' '.join(args)}\n  see {log}")


def corpus_path(cfg) -> Path:
    """The ParaSynth corpus these runs train on, prepared (synthesised + cues) on first use, as
    `pallm train` does."""
    from pallm.cli.stages import _corpus_of

    return _corpus_of(cfg)


def ua(model_dir: Path, corpus: Path) -> dict[str, float]:
    out = model_dir / "eval-test"
    if not (out / "metrics.json").exists():
        sh(["eval", "--model", str(model_dir), "--data", str(corpus), "--split", "test", "--no-probes", "--out", str(out)],
           model_dir.parent / f"{model_dir.name}.eval.log")
    m = json.loads((out / "metrics.json").read_text())
    subsets = m["subsets"]  # the contract's eval metrics.json
    return {k: subsets[k]["ua"] for k in ("all", "congruent", "conflict")}


def test_voices(corpus: Path) -> dict[str, tuple[str, str]]:
    """Test row id -> (voice emotion, its sentiment)."""
    from pallm.data.manifest import read_manifest

    return {r.id: (r.emotion, r.sentiment) for r in read_manifest(corpus, split="test")}


def by_emotion(model_dir: Path, emotion: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Per voice emotion (`test_voices`), the share of test clips answered with that emotion's
    sentiment. On ParaSynth the hard pair is angry vs happy (both loud and raised): a model that
    hears arousal but not valence calls angry voices positive."""
    hits: dict[str, list[bool]] = {}
    for line in (model_dir / "eval-test" / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        e, gold = emotion[p["id"]]
        hits.setdefault(e, []).append(p["label"] == gold)
    return {e: statistics.fmean(v) for e, v in sorted(hits.items())}


def dev_best(run: Path, metric: str = "ua") -> Path:
    """The model `load_best_model_at_end` would publish: the step with the best dev `metric` (the
    earliest of ties), read off the run's dev curve; the run folder when that is the last step."""
    summary = json.loads((run / "train_summary.json").read_text())
    curve = summary["dev_curve"]
    if not curve:
        sys.exit(f"{run}: no dev evaluation; --select-best needs eval_every > 0")
    if any(d.get(metric) is None for d in curve):
        sys.exit(f"{run}: {metric} is not in the dev curve (made before pallm recorded it, or no such rows in dev)")
    sign = 1 if BestModelFields(metric_for_best_model=metric).best_is_greater else -1  # the trainer's own rule
    top = max(sign * d[metric] for d in curve)
    step = next(d["step"] for d in curve if sign * d[metric] == top)
    if step == summary["steps"]:
        return run
    ckpt = run / "checkpoints" / f"step-{step}"
    if not ckpt.exists():
        sys.exit(f"{ckpt}: not kept; --select-best needs every evaluated step kept "
                 "(e.g. sft.keep_checkpoints=8 grpo.keep_checkpoints=9)")
    return ckpt


def averaged(run: Path, n: int) -> Path:
    """The uniform weight average of `run`'s last `n` kept step checkpoints (what
    average_last_checkpoints=n publishes), built once beside the run as `avg{n}_{name}`."""
    out = run.parent / f"avg{n}_{run.name}"
    if not (out / "pallm.json").exists():
        summary = json.loads((run / "train_summary.json").read_text())
        try:
            ckpts = checkpoints_to_average(run, n, summary["steps"])
            average_checkpoints([p for _, p in ckpts], out, {"averaged_steps": [s for s, _ in ckpts]})
        except PallmError as e:
            sys.exit(str(e))
    return out


def train(kind: str, out: Path, seed: int, extra: list[str], init: Path | None = None) -> None:
    if (out / "train_summary.json").exists():
        return
    args = ["train", kind, "--out", str(out), "--overwrite", f"seed={seed}", *extra]
    if init is not None:
        args[2:2] = ["--init", str(init)]
    sh(args, out.parent / f"{out.name}.train.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                    help="comma-separated, e.g. 0,1,2 (one process per seed can share --out)")
    ap.add_argument("--sft-steps", type=int, default=None, help="default: the config's sft.steps (400)")
    ap.add_argument("--grpo-steps", type=int, default=None, help="default: the config's grpo.steps (400)")
    ap.add_argument("--out", type=Path, default=Path("runs/stage2_vs_stage1"))
    ap.add_argument("--style-strength", type=float, default=None,
                    help="ParaSynth's data.synth.style_strength for every run (default: the config's)")
    ap.add_argument("--sft-init", default=None,
                    help="start both stage-1 runs from this checkpoint instead of a fresh tiny model; "
                         "{seed} is replaced by the seed (e.g. runs/warm/seed{seed})")
    ap.add_argument("--skip-single", action="store_true", help="no classification-only run (and no multi vs single check)")
    ap.add_argument("--select-best", action="store_true",
                    help="also compare the dev-best checkpoints of the budget-matched stage 1 and of stage 2 (what "
                         "load_best_model_at_end publishes); keep every evaluated checkpoint and use a larger dev "
                         "set, e.g. sft.keep_checkpoints=8 sft.eval_rows=300 grpo.keep_checkpoints=9 grpo.eval_rows=300")
    ap.add_argument("--select-metric", default="ua", choices=get_args(DevMetric),
                    help="dev metric for --select-best (metric_for_best_model), e.g. worst_emotion_accuracy")
    ap.add_argument("--average-last", type=int, default=0, metavar="N",
                    help="also compare every arm but the start published as the weight average of its last N kept "
                         "checkpoints (what average_last_checkpoints=N publishes; built from finished runs, "
                         "needs keep_checkpoints >= N)")
    ap.add_argument("overrides", nargs="*",
                    help="config overrides: grpo.* go to both stage-2 runs, anything else (e.g. "
                         "prompt.speaker_reference=true) to every run, stage 1 included")
    a = ap.parse_args()
    common = [] if a.style_strength is None else [f"data.synth.style_strength={a.style_strength}"]
    common += [o for o in a.overrides if not o.startswith("grpo.")]
    stage2 = [o for o in a.overrides if o.startswith("grpo.")]
    defaults = load_run_config(None, common)
    a.sft_steps = a.sft_steps or defaults.sft.steps
    a.grpo_steps = a.grpo_steps or defaults.grpo.steps
    corpus = corpus_path(defaults)
    voices = test_voices(corpus)
    kinds = ("sft", "sft_long", "grpo") if a.skip_single else ("sft", "sft_long", "grpo", "grpo_single")
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    if a.select_best:  # the start (sft) stays the last step: stage 2 starts from it either way
        rows.update({f"{k}@best": [] for k in kinds if k != "sft"})
    avg = f"@avg{a.average_last}"
    if a.average_last > 1:  # the start stays the last step, as with --select-best
        rows.update({f"{k}{avg}": [] for k in kinds if k != "sft"})
    for seed in a.seeds:
        d = a.out / f"seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        init = [f"model.tiny.seed={seed}"]  # the seed draws the tiny model's initial weights too
        if a.sft_init:
            init.append(f"model.name_or_path={a.sft_init.format(seed=seed)}")
        train("sft", d / "sft", seed, [*common, *init, f"sft.steps={a.sft_steps}"])
        train("sft", d / "sft_long", seed, [*common, *init, f"sft.steps={a.sft_steps + a.grpo_steps}"])
        grpo = [*common, f"grpo.steps={a.grpo_steps}", *stage2]
        train("grpo", d / "grpo", seed, grpo, init=d / "sft")
        if not a.skip_single:
            train("grpo", d / "grpo_single", seed, [*grpo, "grpo.task_weights.classify=1", "grpo.task_weights.respond=0"],
                  init=d / "sft")
        for k in rows:
            if k.endswith("@best"):
                model = dev_best(d / k.removesuffix("@best"), a.select_metric)
            elif k.endswith(avg):
                model = averaged(d / k.removesuffix(avg), a.average_last)
            else:
                model = d / k
            rows[k].append(ua(model, corpus))
            r = rows[k][-1]
            emo = "  ".join(f"{e} {v:.2f}" for e, v in by_emotion(model, voices).items())
            at = f" (step {model.name.removeprefix('step-')})" if model.name.startswith("step-") else ""
            print(f"seed {seed} {k + at:12s} UA all {r['all']:.3f}  congruent {r['congruent']:.3f}  conflict {r['conflict']:.3f}"
                  f"  | recall by voice: {emo}", flush=True)

    def mean(k: str, s: str) -> float:
        return statistics.fmean(r[s] for r in rows[k])

    def sd(k: str, s: str) -> float:
        return statistics.stdev(r[s] for r in rows[k]) if len(rows[k]) > 1 else 0.0

    print(f"\nmeans over seeds {a.seeds} (sd), ParaSynth test, greedy:")
    print("| model | steps | UA all | congruent | conflict |\n| --- | --- | --- | --- | --- |")
    steps = {"sft": f"SFT {a.sft_steps}", "sft_long": f"SFT {a.sft_steps + a.grpo_steps}",
             "grpo": f"SFT {a.sft_steps} + GRPO {a.grpo_steps}", "grpo_single": f"SFT {a.sft_steps} + GRPO {a.grpo_steps}"}
    for k in rows:
        cells = " | ".join(f"{mean(k, s):.3f} ({sd(k, s):.3f})" for s in ("all", "congruent", "conflict"))
        print(f"| {k} | {steps[k.split('@')[0]]} | {cells} |")
    checks(mean, "", a.skip_single, a.sft_steps)
    if a.select_best:
        print("\nthe same, dev-best checkpoints of the budget-matched stage 1 and of stage 2:")
        checks(mean, "@best", a.skip_single, a.sft_steps)
    if a.average_last > 1:
        print(f"\nthe same, every arm but the start published as the average of its last {a.average_last} checkpoints:")
        checks(mean, avg, a.skip_single, a.sft_steps)


def checks(mean, tag: str, skip_single: bool, sft_steps: int) -> None:
    """The issue's three checks on the means; `tag` "@best" reads the dev-selected models."""
    grpo, long, single = f"grpo{tag}", f"sft_long{tag}", f"grpo_single{tag}"
    gain = 100 * (mean(grpo, "conflict") - mean(long, "conflict"))
    loss = 100 * (mean(long, "congruent") - mean(grpo, "congruent"))
    vs_start = 100 * (mean(grpo, "conflict") - mean("sft", "conflict"))
    print(f"\nconflict gain over budget-matched stage 1: {gain:+.1f} points (need >= +8): {'PASS' if gain >= 8 else 'FAIL'}")
    print(f"congruent loss vs budget-matched stage 1: {loss:+.1f} points (need <= 2): {'PASS' if loss <= 2 else 'FAIL'}")
    if not skip_single:
        vs_single = 100 * (mean(grpo, "all") - mean(single, "all"))
        print(f"multi-task minus single-task RL, UA all: {vs_single:+.1f} points (need >= 0): "
              f"{'PASS' if vs_single >= 0 else 'FAIL'}")
    print(f"(conflict gain over stage 2's own starting point, SFT {sft_steps}: {vs_start:+.1f} points)")


if __name__ == "__main__":
    main()
