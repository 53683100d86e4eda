"""The `pallm` command line. Thin: it parses, validates, shows progress, and calls the library."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pallm.errors import PallmError

console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="PALLM: teach speech LLMs to hear how something is said.")
data_app = typer.Typer(no_args_is_help=True, help="Make and measure corpora.")
app.add_typer(data_app, name="data")


def friendly_errors(fn: Callable) -> Callable:
    """A user's mistake becomes one line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PallmError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console)


class ProgressCallback:
    """Adapts the library's `progress(done, total)` callbacks to a rich task."""

    def __init__(self, progress: Progress, description: str):
        self.progress, self.description, self.task = progress, description, None

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total)
        self.progress.update(self.task, completed=done, total=total)


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Path = typer.Option(..., "--out", help="folder to write the corpus into"),
    n: int = typer.Option(3000, "--n", help="number of utterances"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(2, "--workers", help="processes rendering audio"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing corpus in --out"),
    cues: bool = typer.Option(False, "--cues/--no-cues", help="also measure acoustic cues"),
    overrides: Optional[list[str]] = typer.Argument(None, help="synth config overrides, key=value"),
) -> None:
    """Generate the ParaSynth corpus (eSpeak NG speech, emotional prosody, conflicting words)."""
    from pallm.config import build_config
    from pallm.data.parasynth import SynthConfig, synthesize

    cfg = build_config(SynthConfig, overrides=overrides, base={"n": n, "seed": seed, "workers": workers})
    with progress_bar() as bar:
        stats = synthesize(cfg, out, overwrite=overwrite, progress=ProgressCallback(bar, "synthesising"))
    console.print(f"wrote {stats['n']} utterances ({stats['splits']}) to {out} in {stats['seconds']} s "
                  f"= {stats['utterances_per_second']} utt/s, {stats['audio_hours']} h of audio")
    if cues:
        _measure(out, workers)


def _measure(corpus: Path, workers: int, baseline: str = "speaker") -> None:
    from pallm.acoustics import annotate_corpus

    with progress_bar() as bar:
        path = annotate_corpus(corpus, num_workers=workers, progress=ProgressCallback(bar, "measuring cues"), baseline=baseline)
    console.print(f"cues written to {path}")


@data_app.command("cues")
@friendly_errors
def data_cues(
    corpus: Path = typer.Argument(..., help="corpus folder holding manifest.jsonl"),
    workers: int = typer.Option(2, "--workers"),
    baseline: str = typer.Option("speaker", "--baseline",
                                 help="cue bins relative to the speaker's own voice, or to the corpus's speakers of the same gender"),
) -> None:
    """Measure eGeMAPS functionals and cue bins (speaker- or gender-relative); store them as `cues` per row."""
    from pallm.acoustics.cues import CUE_BASELINES

    if baseline not in CUE_BASELINES:
        raise PallmError(f"--baseline {baseline}: choose one of {', '.join(CUE_BASELINES)}.")
    _measure(corpus, workers, baseline)


@data_app.command("prepare")
@friendly_errors
def data_prepare(
    corpus: str = typer.Argument(..., help="iemocap, ravdess or expresso"),
    root: Path = typer.Option(..., "--root", help="the corpus release folder on disk"),
    out: Path = typer.Option(..., "--out", help="folder for the manifest (audio stays in place)"),
    taxonomy: Optional[Path] = typer.Option(None, "--taxonomy", help="YAML overriding label->sentiment mapping"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    cues: bool = typer.Option(False, "--cues/--no-cues", help="also measure acoustic cues"),
    workers: int = typer.Option(2, "--workers"),
) -> None:
    """Turn an IEMOCAP / RAVDESS / Expresso release on disk into a manifest corpus."""
    from pallm.data.corpora import prepare_corpus

    report = prepare_corpus(corpus, root, out, taxonomy_path=taxonomy, overwrite=overwrite)
    console.print(report.summary(), highlight=False)
    if cues:
        _measure(out, workers)


@data_app.command("merge")
@friendly_errors
def data_merge(
    sources: list[Path] = typer.Argument(..., help="corpus folders (or manifest files) to combine"),
    out: Path = typer.Option(..., "--out", help="folder for the combined manifest"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Combine several corpora (e.g. IEMOCAP + RAVDESS + Expresso) into one manifest."""
    from pallm.data.manifest import merge_manifests

    path = merge_manifests(sources, out, overwrite=overwrite)
    console.print(f"wrote {path}")


from pallm.cli import stages  # noqa: E402,F401  (registers train/eval/run commands)
from pallm.cli import chat  # noqa: E402,F401  (registers the chat command)
from pallm.cli import export  # noqa: E402,F401  (registers the export command)
