"""`pallm run`: the whole pipeline as one readable recipe.

    data -> cues -> baselines -> stage 1 (SFT) -> stage 2 (GRPO) -> evaluation + probes -> report

Each stage writes into the run folder and is skipped when its output is already there, so an
interrupted run resumes where it stopped (the trainers themselves resume from their last
checkpoint). A run folder made with another config is never overwritten without --overwrite.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pallm.config import dump_config
from pallm.data.manifest import Row, read_manifest
from pallm.data.parasynth.generate import SynthConfig
from pallm.errors import PallmError
from pallm.model.build import ModelSpec
from pallm.prompts.format import PromptConfig
from pallm.train.grpo import GRPOConfig
from pallm.train.sft import SFTConfig

Say = Callable[[str], None]


# --- the run's config: one schema for every command (`pallm train sft/grpo` read their sections) ---

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Corpus folder holding manifest.jsonl. Null: ParaSynth, generated (and cached) under cache_dir.
    corpus: str | None = None
    cache_dir: str = "cache"
    synth: SynthConfig = Field(default_factory=SynthConfig)
    measure_cues: bool = True


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate on the first N test rows only")
    probes: bool = True  # lexical-shortcut probes (silence, same words with another voice)
    response: bool = True  # reply generation scored by the embedded judge
    response_rows: int = Field(96, ge=1)
    examples: int = Field(6, ge=0, description="example outputs shown in the report")


class RunConfig(BaseModel):
    """One schema for every command: `pallm train sft/grpo` read the sections they need."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stages: list[Literal["sft", "grpo"]] = ["sft", "grpo"]
    grpo_init: str | None = None  # stage-1 checkpoint when 'sft' is not among the stages
    baselines: list[Literal["acoustic", "text"]] = ["acoustic", "text"]


def corpus_for(cfg: RunConfig, say: Say, progress_factory, times: dict[str, float] | None = None) -> Path:
    """The run's corpus folder: the configured one, or ParaSynth generated (and cached) under
    `data.cache_dir`; cues measured (cached) when `data.measure_cues`."""
    times = {} if times is None else times
    t0 = time.perf_counter()
    if cfg.data.corpus is not None:
        corpus = Path(cfg.data.corpus)
    else:
        from pallm.data.parasynth import ensure_parasynth

        target = Path(cfg.data.cache_dir) / f"parasynth-{cfg.data.synth.fingerprint()}"
        with progress_factory("synthesising ParaSynth") as cb:
            corpus, reused = ensure_parasynth(cfg.data.synth, target, cb)
        say(f"data: ParaSynth at {corpus}" + (" (cached)" if reused else ""))
    times["data"] = time.perf_counter() - t0
    if cfg.data.measure_cues:
        from pallm.acoustics import annotate_corpus

        t0 = time.perf_counter()
        with progress_factory("measuring cues") as cb:
            annotate_corpus(corpus, num_workers=cfg.data.synth.workers, progress=cb)
        times["cues"] = time.perf_counter() - t0
    return corpus


def _check_run_folder(cfg: RunConfig, out: Path, overwrite: bool) -> None:
    saved = out / "config.yaml"
    if saved.exists():
        same = yaml.safe_load(saved.read_text()) == cfg.model_dump(mode="json")
        if not same and not overwrite:
            raise PallmError(f"{out} holds a run made with another config. Choose another --out, or pass "
                             "--overwrite to replace it.")
        if not same:
            for sub in ("sft", "grpo", "eval"):
                shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, saved)


def _finished(stage_dir: Path) -> bool:
    return (stage_dir / "pallm.json").exists() and (stage_dir / "train_summary.json").exists()


def _examples(preds, rows: list[Row], k: int) -> list[dict[str, Any]]:
    """A few outputs to read: half congruent, half conflict, right and wrong mixed."""
    by_id = {r.id: r for r in rows}
    picked: list = []
    for congruent in (True, False):
        pool = [p for p in preds if by_id[p.id].congruent is congruent]
        picked += pool[: max(1, k // 2)]
    out = []
    for p in picked[:k]:
        r = by_id[p.id]
        out.append({"id": p.id, "gold": p.gold, "lexical": r.lexical_sentiment, "congruent": r.congruent,
                    "transcript": r.transcript, "output": p.output, "correct": p.correct})
    return out


def evaluate_checkpoint(ckpt: Path, rows: list[Row], cfg: RunConfig, out: Path, name: str,
                        progress_factory) -> dict[str, Any]:
    """Classification metrics, shortcut probes and reply scores for one checkpoint on `rows`."""
    from pallm.evaluate import classification_metrics, predict, response_metrics, shortcut_probes, write_eval
    from pallm.model import load_pretrained, read_pallm_meta
    from pallm.prompts.format import PromptConfig
    from pallm.rewards import get_reward

    meta = read_pallm_meta(ckpt)
    prompt_cfg = PromptConfig.model_validate(meta.get("task_format") or cfg.prompt.model_dump())
    labels = meta.get("labels")
    model, processor = load_pretrained(ckpt)
    model.eval()
    ev = cfg.eval
    with progress_factory(f"evaluating {name}") as cb:
        preds = predict(model, processor, rows, "classify", prompt_cfg, labels, batch_size=ev.batch_size,
                        max_new_tokens=ev.max_new_tokens, progress=cb)
    metrics = classification_metrics(preds, rows, labels or ["negative", "neutral", "positive"])
    result: dict[str, Any] = {"kind": name, "checkpoint": str(ckpt), "metrics": metrics}
    write_eval(out / "eval" / name, str(ckpt), "test", metrics, preds)
    if ev.probes:
        with progress_factory(f"shortcut probes {name}") as cb:
            result["probes"] = shortcut_probes(model, processor, rows, prompt_cfg, ev.batch_size, labels=labels,
                                               real=preds, max_new_tokens=ev.max_new_tokens, progress=cb)
    if ev.response:
        resp_rows = [r for r in rows if r.response][: ev.response_rows]
        with progress_factory(f"replies {name}") as cb:
            rpreds = predict(model, processor, resp_rows, "respond", prompt_cfg, batch_size=ev.batch_size,
                             max_new_tokens=ev.max_new_tokens, progress=cb)
        result["response"] = response_metrics(rpreds, resp_rows, judge=get_reward("response_judge"),
                                              prompt_cfg=prompt_cfg)
        result["response_examples"] = [{"id": p.id, "output": p.output} for p in rpreds[: ev.examples]]
    result["examples"] = _examples(preds, rows, ev.examples)
    return result


def run_pipeline(cfg: RunConfig, out: Path, say: Say, progress_factory, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage into `out`; returns the run's metrics (also in `out/metrics.json`)."""
    from pallm.evaluate import acoustic_baseline, classification_metrics, text_baseline
    from pallm.evaluate.report import plot_series, read_log, write_report

    out = Path(out)
    _check_run_folder(cfg, out, overwrite)
    times: dict[str, float] = {}
    notes: list[str] = []
    models: dict[str, Any] = {}

    corpus = corpus_for(cfg, say, progress_factory, times)

    rows = read_manifest(corpus)
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    if not test:
        raise PallmError(f"{corpus}: no rows in the test split; the run evaluates on split 'test'.")
    if cfg.eval.limit:
        test = test[: cfg.eval.limit]
    labels = ["negative", "neutral", "positive"]

    t0 = time.perf_counter()
    if "acoustic" in cfg.baselines:
        preds = acoustic_baseline(train, test, Path(corpus) / ".pallm_cache" / "egemaps.parquet",
                                  num_workers=cfg.data.synth.workers)
        models["eGeMAPS + LR"] = {"kind": "baseline", "metrics": classification_metrics(preds, test, labels)}
    if "text" in cfg.baselines:
        preds = text_baseline(train, test)
        models["text TF-IDF + LR"] = {"kind": "baseline", "metrics": classification_metrics(preds, test, labels)}
    times["baselines"] = time.perf_counter() - t0

    curves: list[tuple[str, Path]] = []
    stage_dirs: dict[str, Path] = {}
    if "sft" in cfg.stages:
        from pallm.train.sft import train_sft

        t0 = time.perf_counter()
        sft_dir = out / "sft"
        if _finished(sft_dir):
            say(f"stage 1: reusing {sft_dir}")
        else:
            with progress_factory("stage 1 (SFT)") as cb:
                train_sft(cfg.sft, cfg.model, cfg.prompt, corpus, sft_dir, seed=cfg.seed,
                          progress=lambda s, n, m: cb(s, n))
        stage_dirs["SFT (stage 1)"] = sft_dir
        times["stage 1 (SFT)"] = time.perf_counter() - t0
        log = read_log(sft_dir / "train_log.jsonl")
        for title, keys, kind, name in (
            ("stage 1: training loss", ["loss", "loss_classify", "loss_respond"], "train", "sft_loss.png"),
            ("stage 1: dev UA (the lexical-shortcut curve)", ["ua_congruent", "ua_conflict", "follows_words_rate"],
             "dev", "sft_dev.png"),
        ):
            png = plot_series(log, keys, title, out / name, kind=kind)
            if png:
                curves.append((title, png))
    if "grpo" in cfg.stages:
        from pallm.train.grpo import train_grpo

        t0 = time.perf_counter()
        grpo_dir = out / "grpo"
        init = out / "sft" if "sft" in cfg.stages else cfg.grpo_init
        if init is None:
            raise PallmError("stage 2 needs a stage-1 checkpoint: keep 'sft' in stages or set grpo_init.")
        if _finished(grpo_dir):
            say(f"stage 2: reusing {grpo_dir}")
        else:
            with progress_factory("stage 2 (GRPO)") as cb:
                train_grpo(cfg.grpo, cfg.prompt, corpus, init, grpo_dir, seed=cfg.seed,
                           progress=lambda s, n, m: cb(s, n))
        stage_dirs["PALLM (SFT + GRPO)"] = grpo_dir
        times["stage 2 (GRPO)"] = time.perf_counter() - t0
        log = read_log(grpo_dir / "train_log.jsonl")
        reward_keys = sorted({k for r in log for k in r if k.startswith("reward") or k.startswith("rewards/")})
        for title, keys, kind, name in (
            ("stage 2: rewards", reward_keys, "train", "grpo_rewards.png"),
            ("stage 2: accuracy, parse rate, zero-variance groups",
             [k for k in ("accuracy", "parse_rate", "zero_variance_share", "frac_zero_std") if any(k in r for r in log)],
             "train", "grpo_accuracy.png"),
            ("stage 2: KL, entropy, clip fraction", ["kl", "entropy", "clip_fraction", "clip_ratio"], "train",
             "grpo_kl.png"),
            ("stage 2: dev UA", ["ua_congruent", "ua_conflict", "follows_words_rate"], "dev", "grpo_dev.png"),
        ):
            png = plot_series(log, keys, title, out / name, kind=kind)
            if png:
                curves.append((title, png))

    t0 = time.perf_counter()
    for name, ckpt in stage_dirs.items():
        models[name] = evaluate_checkpoint(ckpt, test, cfg, out, name.split(" ")[0].lower(), progress_factory)
    times["evaluation"] = time.perf_counter() - t0

    results = {"models": models, "times": times, "corpus": str(corpus), "n_test": len(test),
               "examples": {n: m.get("examples", []) for n, m in models.items() if m.get("examples")},
               "notes": notes}
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_report(out, results, config_text=(out / "config.yaml").read_text(), curves=curves)
    return results
