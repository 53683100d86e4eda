"""The run report: one markdown file with tables and PNG plots, readable on its own.

Input is the run's `metrics.json` structure:
    {"models": {name: {"kind": ..., "metrics": <pallm eval metrics>, "probes": {...}, "response": {...},
                       "description": "what the row is"}},
     "times": {stage: seconds}, "examples": {name: [{"id", "gold", "congruent", "output"}, ...]}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the report is written, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_series(records: list[dict[str, Any]], keys: list[str], title: str, out_png: Path,
                kind: str | None = None, ylabel: str = "") -> Path | None:
    """One line per key present in the log; None when the log has none of them."""
    if kind is not None:
        records = [r for r in records if r.get("kind", "train") == kind]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = 0
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
        if pts:
            xs, ys = np.array(pts, dtype=float).T
            if len(pts) >= 30:  # per-step RL metrics are noisy: faint raw line, moving average on top
                k = max(3, len(pts) // 20)
                line, = ax.plot(xs, ys, alpha=0.25, lw=0.8)
                smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
                ax.plot(xs[k - 1:], smooth, color=line.get_color(), label=f"{key} (mean of {k})")
            else:
                ax.plot(xs, ys, marker="o", ms=3, label=key)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_confusions(models: dict[str, Any], out_png: Path) -> Path | None:
    named = [(n, m["metrics"]["confusion"]) for n, m in models.items() if m.get("metrics", {}).get("confusion")]
    if not named:
        return None
    fig, axes = plt.subplots(1, len(named), figsize=(3.0 * len(named), 3.1), squeeze=False)
    for ax, (name, conf) in zip(axes[0], named):
        m = np.array(conf["matrix"], dtype=float)
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        labels = conf["labels"]
        ax.set_xticks(range(len(labels)), [lab[:3] for lab in labels], fontsize=7)
        ax.set_yticks(range(len(labels)), [lab[:3] for lab in labels], fontsize=7)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
    axes[0][0].set_ylabel("gold", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_conflict_bars(models: dict[str, Any], out_png: Path) -> Path | None:
    names = [n for n, m in models.items() if "congruent" in m.get("metrics", {}).get("subsets", {})]
    if not names:
        return None
    cong = [models[n]["metrics"]["subsets"]["congruent"]["ua"] for n in names]
    conf = [models[n]["metrics"]["subsets"].get("conflict", {}).get("ua", 0.0) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.2))
    ax.bar(x - 0.2, cong, 0.4, label="congruent")
    ax.bar(x + 0.2, conf, 0.4, label="conflict")
    ax.axhline(1 / 3, color="grey", ls="--", lw=1, label="chance (3-way)")
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("UA")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("words and voice agree vs disagree")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _classification_table(models: dict[str, Any]) -> list[str]:
    lines = ["| model | kind | UA all | UA congruent | UA conflict | follows words (conflict) | WA all | macro-F1 | parse rate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in models.items():
        met = m.get("metrics")
        if not met:
            continue
        s = met["subsets"]
        fw = (met.get("follows_words_rate") or {}).get("rate")
        lines.append(
            f"| {name} | {m.get('kind', '')} | {_fmt(s['all']['ua'])} | {_fmt(s.get('congruent', {}).get('ua'))} | "
            f"{_fmt(s.get('conflict', {}).get('ua'))} | {_fmt(fw)} | {_fmt(s['all']['wa'])} | "
            f"{_fmt(s['all']['macro_f1'])} | {_fmt(s['all'].get('parse_rate'))} |")
    return lines


def _probe_table(models: dict[str, Any]) -> list[str]:
    rows = [(n, m["probes"]) for n, m in models.items() if m.get("probes")]
    if not rows:
        return []
    lines = ["| model | UA real audio | UA silence | unchanged under silence | UA same words, other voice | unchanged under swap | voice dependence |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in rows:
        lines.append(
            f"| {name} | {_fmt(p.get('real', {}).get('ua'))} | {_fmt(p.get('silence', {}).get('ua'))} | "
            f"{_fmt(p.get('silence', {}).get('unchanged'))} | {_fmt(p.get('same_words', {}).get('ua'))} | "
            f"{_fmt(p.get('same_words', {}).get('unchanged'))} | {_fmt(p.get('voice_dependence'))} |")
    return lines


# Column headers of the reply table (other keys are shown as they are).
_RESPONSE_HEADERS = {"judge": "embedded judge", "llm_judge": "LLM judge", "llm_judge_failures": "LLM judge failures"}


def _response_table(models: dict[str, Any]) -> list[str]:
    rows = [(n, m["response"]) for n, m in models.items() if m.get("response")]
    if not rows:
        return []
    keys = sorted({k for _, r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    lines = ["| model | " + " | ".join(_RESPONSE_HEADERS.get(k, k) for k in keys) + " |",
             "| --- |" + " --- |" * len(keys)]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return lines


def write_report(run_dir: Path, results: dict[str, Any], config_text: str | None = None,
                 curves: list[tuple[str, Path]] | None = None) -> Path:
    """Write `run_dir/report.md` (plots beside it). Returns its path."""
    run_dir = Path(run_dir)
    models = results.get("models", {})
    md = ["# PALLM run report", ""]
    if results.get("summary"):
        md += [results["summary"], ""]
    md += ["## Sentiment from audio: every model on the test split", "",
           "UA is unweighted (balanced) accuracy. *Conflict* rows are those where the words' sentiment "
           "differs from the voice's; a model that reads the words instead of listening fails there, "
           "and *follows words* is how often its answer on those rows is the words' sentiment.", ""]
    md += _classification_table(models) + [""]
    described = [(n, m["description"]) for n, m in models.items() if m.get("description")]
    if described:
        md += ["What each row is:", ""] + [f"- **{n}**: {d}" for n, d in described] + [""]
    bars = plot_conflict_bars(models, run_dir / "conflict_vs_congruent.png")
    if bars:
        md += [f"![congruent vs conflict]({bars.name})", ""]
    probes = _probe_table(models)
    if probes:
        md += ["## Lexical-shortcut probes", "",
               "The same test rows with the audio replaced: by silence of the same length, and by another "
               "clip of the same words spoken with a different voice label. *Unchanged* is the share of "
               "answers that stay the same; *voice dependence* = 1 − unchanged under silence.", ""] + probes + [""]
    resp = _response_table(models)
    if resp:
        md += ["## Paralinguistics-aware replies", "",
               "Replies to the first test rows that have a reference reply. *embedded judge*: the lexicon scorer "
               "of pallm.rewards (0–1); *LLM judge* (when `eval.llm_judge` is set): the rubric judge's mean score "
               "(0–1) over the replies it could score, its failures counted beside it.", ""] + resp + [""]
    conf = plot_confusions(models, run_dir / "confusion.png")
    if conf:
        md += ["## Confusion matrices (test, all rows)", "", f"![confusion matrices]({conf.name})", ""]
    if curves:
        md += ["## Training curves", ""]
        md += [f"![{title}]({png.name})" for title, png in curves] + [""]
    for name, examples in (results.get("examples") or {}).items():
        md += [f"## Example outputs: {name}", ""]
        for ex in examples:
            tag = "congruent" if ex.get("congruent") else "conflict"
            md += [f"- `{ex['id']}` ({tag}; voice: **{ex.get('gold')}**, words: {ex.get('lexical')}) "
                   f"\"{ex.get('transcript', '')}\"", f"  ```\n  {ex['output']}\n  ```"]
        md.append("")
    if results.get("times"):
        md += ["## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
        md += [f"| {k} | {v:.1f} |" for k, v in results["times"].items()] + [""]
    if results.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if config_text:
        md += ["## Resolved config", "", "```yaml", config_text.rstrip(), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path
