"""`pallm train`, `pallm eval` and `pallm run`: the pipeline stages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pallm.cli.main import ProgressCallback, app, console, friendly_errors, progress_bar

train_app = typer.Typer(no_args_is_help=True, help="Stage 1 (sft) and stage 2 (grpo) training.")
app.add_typer(train_app, name="train")


def _not_yet(what: str) -> None:
    console.print(f"[yellow]{what}: not yet available in this version of PALLM.[/]")


@train_app.command("sft")
@friendly_errors
def train_sft(config: Path = typer.Option(..., "--config"), out: Optional[Path] = typer.Option(None, "--out"),
              overrides: Optional[list[str]] = typer.Argument(None)) -> None:
    """Stage 1: supervised fine-tuning on chain-of-thought targets."""
    _not_yet("pallm train sft")


@train_app.command("grpo")
@friendly_errors
def train_grpo(config: Path = typer.Option(..., "--config"), init: Optional[Path] = typer.Option(None, "--init"),
               out: Optional[Path] = typer.Option(None, "--out"),
               overrides: Optional[list[str]] = typer.Argument(None)) -> None:
    """Stage 2: multi-task GRPO from a stage-1 checkpoint."""
    _not_yet("pallm train grpo")


@app.command("eval")
@friendly_errors
def evaluate(model: Path = typer.Option(..., "--model"), data: Path = typer.Option(..., "--data"),
             out: Optional[Path] = typer.Option(None, "--out")) -> None:
    """Score a checkpoint on any manifest."""
    _not_yet("pallm eval")


@app.command("run")
@friendly_errors
def run(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config; the embedded default when omitted"),
    out: Path = typer.Option(Path("runs/default"), "--out", help="run folder"),
    overrides: Optional[list[str]] = typer.Argument(None, help="config overrides, key=value"),
) -> None:
    """The whole pipeline: data, cues, stage 1, stage 2, evaluation, report."""
    from pallm.config import RunConfig, build_config, dump_config
    from pallm.data.parasynth import ensure_parasynth

    cfg = build_config(RunConfig, config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    if cfg.data.corpus is None:
        corpus = Path(cfg.data.cache_dir) / f"parasynth-{cfg.data.synth.fingerprint()}"
        with progress_bar() as bar:
            corpus, reused = ensure_parasynth(cfg.data.synth, corpus, ProgressCallback(bar, "synthesising ParaSynth"))
        console.print(f"data: ParaSynth at {corpus}" + (" (cached)" if reused else ""))
    else:
        corpus = Path(cfg.data.corpus)
    times["data"] = time.perf_counter() - t0

    if cfg.data.measure_cues:
        t0 = time.perf_counter()
        from pallm.acoustics import annotate_corpus

        with progress_bar() as bar:
            annotate_corpus(corpus, num_workers=cfg.data.synth.workers, progress=ProgressCallback(bar, "measuring cues"))
        times["cues"] = time.perf_counter() - t0

    for stage in ("stage 1 (SFT)", "stage 2 (GRPO)", "evaluation and report"):
        _not_yet(stage)
    console.print("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
