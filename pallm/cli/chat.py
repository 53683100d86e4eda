"""`pallm chat`: talk to a checkpoint with your own clips.

    pallm chat --model runs/default/grpo hello.wav
    pallm chat --model runs/default/grpo clips/ --task classify --json

Per clip it prints the model's reasoning (the <think> part), the label (sentiment, or emotion for
models trained on emotions) and a reply. Any sample rate, channel count and length is accepted:
`load_audio` mixes to mono and resamples to 16 kHz, and a clip longer than the model's audio window
is cut into equal windows no longer than it (instead of being truncated), each judged on its own,
with a majority vote over the windows.

The library side (`collect_clips`, `model_window_seconds`, `split_windows`, `chat_clip`) is usable
without the CLI.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pallm.cli.main import app, console, friendly_errors
from pallm.errors import AudioError, ConfigError, PallmError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff")
CHAT_TASKS = ("both", "classify", "respond")
RAW_CHARS = 160  # how much of an unparsable output to show

out_console = Console(highlight=False)  # results go to stdout; progress and errors to stderr (`console`)


# --- library -------------------------------------------------------------------------------------


def collect_clips(path: str | Path) -> list[Path]:
    """A file -> [it]; a folder -> its audio files (by suffix, not recursive, sorted)."""
    p = Path(path).expanduser()
    if p.is_dir():
        clips = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES
                       and not f.name.startswith("."))
        if not clips:
            raise PallmError(f"{p}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder.")
        return clips
    if not p.exists():
        raise AudioError(f"{p}: no such file or folder. Give an audio file or a folder of them.")
    return [p]


def check_clip(path: Path) -> None:
    """Read the header only: unreadable or empty files fail before any model is loaded."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types for broken files
        raise AudioError(f"{path}: unreadable audio ({e}). Give a wav/flac/ogg/mp3 file.") from None
    if info.frames == 0:
        raise AudioError(f"{path}: zero-length audio.")


def model_window_seconds(processor, meta: dict[str, Any] | None = None) -> float:
    """The longest clip the model hears whole: the feature extractor's window (Whisper-style
    `n_samples` = chunk_length * rate; 30 s for Qwen2-Audio), capped by pallm.json's
    `model_spec.max_audio_seconds` for the tiny model (its window is that setting)."""
    fe = processor.feature_extractor
    sr = int(getattr(fe, "sampling_rate", 16_000))
    n = getattr(fe, "n_samples", None) or int(float(getattr(fe, "chunk_length", 30)) * sr)
    seconds = n / sr
    spec = (meta or {}).get("model_spec") or {}
    if spec.get("name_or_path") is None and spec.get("max_audio_seconds"):
        seconds = min(seconds, float(spec["max_audio_seconds"]))
    return seconds


def split_windows(wav: np.ndarray, window_seconds: float, sr: int = 16_000) -> list[tuple[float, float, np.ndarray]]:
    """Cut a clip into the fewest equal windows of at most `window_seconds`: [(start_s, end_s, samples)].
    Equal lengths: no sliver of a last window, no overlap counted twice in the vote."""
    limit = max(1, int(window_seconds * sr))
    n = max(1, math.ceil(len(wav) / limit))
    bounds = np.linspace(0, len(wav), n + 1).round().astype(int)
    return [(a / sr, b / sr, wav[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def majority(labels: list[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent parsed label (None on a tie or when nothing parsed) and the votes."""
    votes = Counter(x for x in labels if x is not None)
    ranked = votes.most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None, dict(votes)
    return ranked[0][0], dict(votes)


def chat_clip(
    model,
    processor,
    path: str | Path,
    task: str,
    prompt_cfg,
    labels: list[str],
    window_seconds: float,
    transcript: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    reference=None,
) -> dict[str, Any]:
    """Run the model on one clip (windowed if longer than `window_seconds`); a JSON-able result.
    `reference` (samples) is the speaker's reference clip, heard before each window by models
    trained with `prompt.speaker_reference`, or each window is normalised by it (`prompt.speaker_norm`)."""
    import soundfile as sf

    from pallm.data.audio import SAMPLE_RATE, load_audio
    from pallm.data.manifest import Row
    from pallm.evaluate.predict import with_reference
    from pallm.model import generate
    from pallm.prompts.format import build_prompt, parse_completion

    path = Path(path)
    wav = load_audio(path)  # checks missing / unreadable / empty, mixes to mono, resamples
    info = sf.info(str(path))
    windows = split_windows(wav, window_seconds, SAMPLE_RATE)
    notes = []
    if transcript and len(windows) > 1:
        notes.append("the transcript covers the whole clip, not one window: windows are judged on the audio alone")
        transcript = None
    row = Row(id=path.stem, audio=str(path), corpus="chat", speaker="chat", split="test", transcript=transcript)
    tasks = ["classify", "respond"] if task == "both" else [task]
    outputs: dict[str, list[str]] = {}
    for t in tasks:
        prompt = build_prompt(t, row, prompt_cfg, labels)
        texts: list[str] = []
        for start in range(0, len(windows), batch_size):
            chunk = [w if reference is None else with_reference(w, reference, prompt_cfg)
                     for _, _, w in windows[start : start + batch_size]]
            texts += generate(model, processor, chunk, [prompt] * len(chunk), max_new_tokens=max_new_tokens,
                              do_sample=False)
        outputs[t] = texts

    results = []
    for i, (a, b, _) in enumerate(windows):
        parsed = {t: parse_completion(outputs[t][i], t, labels, cot=prompt_cfg.cot) for t in tasks}
        think_from = parsed.get("classify") or parsed["respond"]
        results.append({
            "start": round(a, 2), "end": round(b, 2),
            "reasoning": think_from.think,
            "label": parsed["classify"].label if "classify" in parsed else None,
            "reply": parsed["respond"].response if "respond" in parsed else None,
            "outputs": {t: outputs[t][i] for t in tasks},
        })
    label, votes = majority([w["label"] for w in results]) if "classify" in tasks else (None, {})
    return {
        "clip": str(path), "seconds": round(len(wav) / SAMPLE_RATE, 2), "sample_rate": info.samplerate,
        "channels": info.channels, "window_seconds": window_seconds, "transcript": transcript,
        "label_kind": "sentiment" if prompt_cfg.target == "sentiment" else "emotion",
        "label": label, "votes": votes, "windows": results, "notes": notes,
    }


# --- rendering -----------------------------------------------------------------------------------


def _value(text: str | None, missing: str) -> Text:
    return Text(text) if text else Text(missing, style="dim italic")


def _label_text(label: str | None, raw: str | None) -> Text:
    if label:
        style = {"positive": "bold green", "negative": "bold red", "neutral": "bold yellow"}.get(label, "bold cyan")
        return Text(label, style=style)
    t = Text("unparsable", style="dim italic")
    if raw is not None:
        shown = raw if len(raw) <= RAW_CHARS else raw[:RAW_CHARS] + "…"
        t.append(f" (model said: {shown!r})", style="dim")
    return t


def render(result: dict[str, Any]) -> Panel:
    kind = result["label_kind"]
    wins = result["windows"]
    title = (f"[bold]{Path(result['clip']).name}[/]  {result['seconds']:g} s · {result['sample_rate']} Hz · "
             f"{result['channels']} ch")
    has_label, has_reply = "classify" in wins[0]["outputs"], "respond" in wins[0]["outputs"]
    parts: list[Any] = []
    if len(wins) == 1:
        w = wins[0]
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row("reasoning", _value(w["reasoning"], "(no reasoning given)"))
        if has_label:
            grid.add_row(kind, _label_text(w["label"], w["outputs"]["classify"]))
        if has_reply:
            grid.add_row("reply", _value(w["reply"], "(no reply parsed)"))
        parts.append(grid)
    else:
        parts.append(Text(f"longer than the model's {result['window_seconds']:g} s window: "
                          f"{len(wins)} windows of {wins[0]['end'] - wins[0]['start']:.1f} s", style="dim"))
        table = Table(show_edge=False, pad_edge=False, expand=True)
        table.add_column("window", no_wrap=True)
        table.add_column("reasoning", ratio=3)
        if has_label:
            table.add_column(kind, no_wrap=True)
        if has_reply:
            table.add_column("reply", ratio=2)
        for w in wins:
            cells: list[Any] = [f"{w['start']:.1f}-{w['end']:.1f} s", _value(w["reasoning"], "-")]
            if has_label:
                cells.append(_label_text(w["label"], None))
            if has_reply:
                cells.append(_value(w["reply"], "-"))
            table.add_row(*cells)
        parts.append(table)
        if has_label:
            n_voted = sum(result["votes"].values())
            if result["label"]:
                line = Text("majority: ", style="bold")
                line.append_text(_label_text(result["label"], None))
                line.append(f" ({result['votes'][result['label']]} of {len(wins)} windows)")
            elif n_voted:
                line = Text(f"majority: none (tie: {json.dumps(result['votes'])})", style="bold")
            else:
                line = Text("majority: none (no window gave a parsable label)", style="bold")
            parts.append(line)
    for note in result["notes"]:
        parts.append(Text(f"note: {note}", style="yellow"))
    return Panel(Group(*parts), title=title, title_align="left", border_style="blue")


# --- command -------------------------------------------------------------------------------------


@app.command("chat")
@friendly_errors
def chat(
    clip: Path = typer.Argument(..., help="an audio file (any rate/channels/length), or a folder of them"),
    model: str = typer.Option(..., "--model", help="checkpoint folder (or a hub id)"),
    task: str = typer.Option("both", "--task", help="both, classify or respond"),
    transcript: Optional[str] = typer.Option(
        None, "--transcript", help="the words spoken, for one clip (default: CLIP.txt beside the clip, if any)"),
    no_transcript: bool = typer.Option(False, "--no-transcript", help="never give the words, even if CLIP.txt exists"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size", help="windows decoded together"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per clip on stdout instead of panels"),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="a clip of the same speaker in their usual voice (models trained with prompt.speaker_reference or speaker_norm)"),
) -> None:
    """Ask a checkpoint how clips sound: reasoning, sentiment and a reply (long clips in windows, majority vote)."""
    from pydantic import ValidationError

    from pallm.model import load_pretrained, read_pallm_meta
    from pallm.prompts.format import PromptConfig, label_set

    if task not in CHAT_TASKS:
        raise ConfigError(f"--task must be one of {', '.join(CHAT_TASKS)}, not '{task}'.")
    if transcript is not None and no_transcript:
        raise ConfigError("--transcript and --no-transcript contradict each other; give one.")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be at least 1.")
    clips = collect_clips(clip)
    if transcript is not None and len(clips) > 1:
        raise ConfigError(f"--transcript gives the words of one clip, but {clip} holds {len(clips)}; "
                          "put CLIP.txt beside each clip instead.")
    n_clips = len(clips)
    failed: list[tuple[Path, str]] = []
    for path in clips:
        try:
            check_clip(path)
        except AudioError as e:
            if n_clips == 1:
                raise
            failed.append((path, str(e)))
            console.print(f"[yellow]skipped[/] {e}", highlight=False, soft_wrap=True)
    clips = [c for c in clips if c not in {p for p, _ in failed}]
    if not clips:
        raise AudioError(f"{clip}: none of the {n_clips} audio files could be read (first: {failed[0][1]})")

    net, processor = load_pretrained(model)  # checks the folder and says what is missing
    meta = read_pallm_meta(model) if Path(model).is_dir() else {}
    try:
        prompt_cfg = PromptConfig.model_validate(meta.get("task_format") or {})
    except ValidationError as e:
        raise PallmError(f"{model}/pallm.json: task_format is invalid ({e.errors()[0]['msg']}).") from None
    labels = meta.get("labels")
    if not labels:
        if prompt_cfg.target != "sentiment":
            raise PallmError(f"{model}/pallm.json: an emotion model needs its 'labels' list; none found.")
        labels = label_set(prompt_cfg)
    ref_wav = None
    if prompt_cfg.reference_switch:
        if reference is None:
            how = "first" if prompt_cfg.speaker_reference else "as a baseline"
            raise ConfigError(f"{model} was trained to hear the speaker's usual voice {how} ({prompt_cfg.reference_switch}): "
                              "pass --reference CLIP, a recording of the same speaker speaking normally.")
        from pallm.data.audio import load_audio

        check_clip(reference)
        ref_wav = load_audio(reference)
    elif reference is not None:
        console.print(f"[yellow]note[/] {model} does not use a speaker reference; --reference is ignored.", highlight=False)
    window = model_window_seconds(processor, meta)
    console.print(f"[dim]{model}: {len(clips)} clip(s), audio window {window:g} s, task {task}[/]", highlight=False)

    for path in clips:
        words = transcript
        side = path.with_suffix(".txt")
        if words is None and not no_transcript and side.is_file() and side != path:
            words = side.read_text(encoding="utf-8", errors="replace").strip() or None
        try:
            result = chat_clip(net, processor, path, task, prompt_cfg, labels, window, words,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, reference=ref_wav)
        except AudioError as e:
            if n_clips == 1:
                raise
            failed.append((path, str(e)))
            console.print(f"[yellow]skipped[/] {e}", highlight=False, soft_wrap=True)
            continue
        if as_json:
            typer.echo(json.dumps(result, ensure_ascii=False))
        else:
            out_console.print(render(result))
    if failed:
        raise AudioError(f"{len(failed)} of {n_clips} clips could not be read (first: {failed[0][1]})")
