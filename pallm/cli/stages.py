"""`pallm train`, `pallm eval` and `pallm run`: the pipeline stages."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import typer

from pallm.cli.main import ProgressCallback, app, console, friendly_errors, progress_bar
from pallm.errors import ConfigError

train_app = typer.Typer(no_args_is_help=True, help="Stage 1 (sft) and stage 2 (grpo) training.")
app.add_typer(train_app, name="train")

# Named presets: overrides on the embedded default. `smoke` is the end-to-end check CI runs.
PRESETS: dict[str, list[str]] = {
    "default": [],
    "smoke": [
        "data.synth.n=240", "data.synth.speakers=12", "data.synth.test_speakers=3", "data.synth.dev_speakers=2",
        "sft.steps=30", "sft.eval_every=0", "sft.save_every=0",
        "grpo.steps=3", "grpo.per_device_batch_size=2", "grpo.num_generations=4", "grpo.eval_every=0",
        "grpo.save_every=0", "grpo.max_completion_length=48",
        "eval.limit=24", "eval.response_rows=8", "eval.max_new_tokens=48",
        # every row of the report, at these tiny budgets (the text-only LLM is a default baseline)
        "ablations=[no_cot,single_task_rl]",
    ],
}


@contextlib.contextmanager
def rich_task(description: str):
    """A progress bar as a context manager yielding a `progress(done, total)` callback."""
    with progress_bar() as bar:
        yield ProgressCallback(bar, description)


def load_run_config(config: Optional[Path], overrides: Optional[list[str]], preset: str = "default"):
    from pallm.config import build_config, parse_overrides
    from pallm.pipeline import RunConfig

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; presets: {', '.join(PRESETS)}")
    # Precedence: embedded default < preset < config file < command-line overrides.
    return build_config(RunConfig, config, list(overrides or []), base=parse_overrides(PRESETS[preset]))


def _corpus_of(cfg) -> Path:
    from pallm.pipeline import corpus_for

    return corpus_for(cfg, say=lambda m: console.print(m, highlight=False), progress_factory=rich_task)


def _print_summary(summary: dict) -> None:
    """The run's scalar results on one line each; the full summary is in OUT/train_summary.json."""
    for k, v in summary.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            console.print(f"{k}: {round(v, 4) if isinstance(v, float) else v}", highlight=False)


@train_app.command("sft")
@friendly_errors
def train_sft_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="run config YAML (sections data, model, prompt, sft)"),
    out: Path = typer.Option(Path("runs/sft"), "--out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished run in --out"),
    overrides: Optional[list[str]] = typer.Argument(None, help="config overrides, key=value"),
) -> None:
    """Stage 1: supervised fine-tuning on chain-of-thought targets (resumes from --out's checkpoints)."""
    from pallm.train.sft import train_sft

    cfg = load_run_config(config, overrides)
    corpus = _corpus_of(cfg)
    with rich_task("stage 1 (SFT)") as cb:
        summary = train_sft(cfg.sft, cfg.model, cfg.prompt, corpus, out, seed=cfg.seed,
                            progress=lambda s, n, m: cb(s, n), overwrite=overwrite)
    _print_summary(summary)


@train_app.command("grpo")
@friendly_errors
def train_grpo_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="run config YAML (sections data, prompt, grpo)"),
    init: Path = typer.Option(..., "--init", help="stage-1 checkpoint folder"),
    out: Path = typer.Option(Path("runs/grpo"), "--out"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    overrides: Optional[list[str]] = typer.Argument(None, help="config overrides, key=value"),
) -> None:
    """Stage 2: multi-task GRPO from a stage-1 checkpoint (resumes from --out's checkpoints)."""
    from pallm.train.grpo import train_grpo

    cfg = load_run_config(config, overrides)
    corpus = _corpus_of(cfg)
    with rich_task("stage 2 (GRPO)") as cb:
        summary = train_grpo(cfg.grpo, cfg.prompt, corpus, init, out, seed=cfg.seed,
                             progress=lambda s, n, m: cb(s, n), overwrite=overwrite)
    _print_summary(summary)


@app.command("eval")
@friendly_errors
def evaluate(
    model: Path = typer.Option(..., "--model", help="checkpoint folder"),
    data: Path = typer.Option(..., "--data", help="manifest.jsonl or the corpus folder holding it"),
    out: Optional[Path] = typer.Option(None, "--out", help="where metrics.json goes (default: MODEL/eval-SPLIT)"),
    split: str = typer.Option("test", "--split"),
    task: str = typer.Option("classify", "--task", help="classify or respond"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    batch_size: int = typer.Option(32, "--batch-size"),
    probes: bool = typer.Option(True, "--probes/--no-probes", help="lexical-shortcut probes (classify)"),
    config: Optional[Path] = typer.Option(None, "--config", help="run config YAML: its eval.llm_judge also scores replies"),
    overrides: Optional[list[str]] = typer.Argument(None, help="config overrides, key=value (e.g. eval.llm_judge=...)"),
) -> None:
    """Score a checkpoint on any manifest: UA/WA/F1/parse rate per subset, confusion, shortcut probes;
    with --task respond, the reply metrics (embedded judge, and the LLM judge when configured)."""
    from pallm.data.manifest import read_manifest
    from pallm.evaluate import classification_metrics, predict, response_metrics, shortcut_probes, write_eval
    from pallm.model import load_pretrained, read_pallm_meta
    from pallm.prompts.format import PromptConfig, label_set
    from pallm.rewards import get_reward

    if task not in ("classify", "respond"):
        raise ConfigError(f"--task must be classify or respond, not '{task}'")
    net, processor = load_pretrained(model)  # first: it checks the folder thoroughly
    net.eval()
    meta = read_pallm_meta(model)
    prompt_cfg = PromptConfig.model_validate(meta.get("task_format") or {})
    rows = read_manifest(data, split=split)[:limit]
    labels = meta.get("labels") or label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))
    gold_field = "sentiment" if prompt_cfg.target == "sentiment" else "emotion"
    outside = sorted({getattr(r, gold_field) for r in rows if getattr(r, gold_field)} - set(labels))
    if task == "classify" and outside:
        raise ConfigError(f"{data}: labels {outside} are outside the model's label set {labels}. "
                          "Map them with a taxonomy (pallm data prepare --taxonomy) or evaluate a model trained on them.")
    out = out or Path(model) / f"eval-{split}"
    t0 = time.perf_counter()
    with rich_task(f"evaluating {len(rows)} rows") as cb:
        preds = predict(net, processor, rows, task, prompt_cfg, labels, batch_size=batch_size, progress=cb)
    if task == "classify":
        metrics = classification_metrics(preds, rows, labels)
        if probes:
            with rich_task("shortcut probes") as cb:
                metrics["probes"] = shortcut_probes(net, processor, rows, prompt_cfg, batch_size, labels=labels,
                                                    real=preds, progress=cb)
    else:
        from pallm.pipeline import _make_llm_judge

        notes: list[str] = []
        llm_judge = _make_llm_judge(load_run_config(config, overrides), notes)
        for n in notes:
            console.print(f"note: {n}", highlight=False)
        metrics = {"response": response_metrics(preds, rows, judge=get_reward("response_judge"), prompt_cfg=prompt_cfg,
                                                extra_judges={"llm_judge": llm_judge} if llm_judge else None)}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_eval(out, str(model), str(data), metrics, preds)
    if task == "classify":
        s = metrics["subsets"]
        line = " | ".join(f"{k}: UA {v['ua']:.3f} (n={v['n']})" for k, v in s.items() if k in ("all", "congruent", "conflict"))
        console.print(line + f" | parse rate {s['all']['parse_rate']:.3f}")
    else:
        r = metrics["response"]
        judged = "".join(f" | {k} {r[k]:.3f}" for k in ("judge", "llm_judge") if isinstance(r.get(k), float))
        console.print(f"replies: {len(rows)}{judged} | affect acknowledged {r.get('affect_ack_rate', 0):.3f}")
    console.print(f"wrote {path}")


@app.command("run")
@friendly_errors
def run(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config; the embedded default when omitted"),
    out: Path = typer.Option(Path("runs/default"), "--out", help="run folder"),
    preset: str = typer.Option("default", "--preset", help=f"one of: {', '.join(PRESETS)}"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run made with another config in --out"),
    overrides: Optional[list[str]] = typer.Argument(None, help="config overrides, key=value"),
) -> None:
    """The whole pipeline: data, cues, baselines, stage 1, stage 2, evaluation, report."""
    from pallm.pipeline import run_pipeline

    cfg = load_run_config(config, overrides, preset)
    t0 = time.perf_counter()
    results = run_pipeline(cfg, out, say=lambda m: console.print(m, highlight=False), progress_factory=rich_task,
                           overwrite=overwrite)
    width = max((len(n) for n in results["models"]), default=0)
    for name, m in results["models"].items():
        s = m["metrics"]["subsets"]
        console.print(f"{name:>{width}}: UA all {s['all']['ua']:.3f}  congruent {s.get('congruent', {}).get('ua', float('nan')):.3f}"
                      f"  conflict {s.get('conflict', {}).get('ua', float('nan')):.3f}", highlight=False, soft_wrap=True)
    for note in results.get("notes", []):
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'report.md'}  ({time.perf_counter() - t0:.0f} s)")
