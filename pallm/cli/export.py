"""`pallm export --merge`: a LoRA checkpoint (base + adapter) -> one merged full checkpoint.

    pallm export --merge --model runs/x/sft/checkpoints/step-200 --out runs/x/sft-step200
    pallm export --merge --model my_adapter/ --base Qwen/Qwen2-Audio-7B-Instruct --out merged/

The library side is `pallm.train.export.merge_lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pallm.cli.main import app, console, friendly_errors
from pallm.errors import ConfigError


@app.command("export")
@friendly_errors
def export(
    model: Path = typer.Option(..., "--model", help="LoRA checkpoint: a run folder, a step checkpoint, or a PEFT adapter folder"),
    out: Path = typer.Option(..., "--out", help="folder for the merged full checkpoint"),
    merge: bool = typer.Option(False, "--merge", help="merge the LoRA adapter into its base model (required)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model folder or hub id (default: the one the run started from)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Write a LoRA checkpoint as one merged full checkpoint that eval, chat and --init load."""
    from pallm.train.export import merge_lora

    if not merge:
        raise ConfigError("export writes merged checkpoints only: pass --merge.")
    result = merge_lora(model, out, base=base, overwrite=overwrite, say=lambda m: console.print(m, highlight=False))
    console.print(f"merged {result['adapter']} into {result['base']}: {result['parameters']:,} parameters", highlight=False)
