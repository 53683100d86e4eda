"""`pallm run`: the whole pipeline as one readable recipe.

    data -> cues -> baselines -> stage 1 (SFT) -> stage 2 (GRPO)      (main process)
                               text-only LLM, ablations           (beside them, a second process)
         -> evaluation + probes (+ API models) -> report

The rows of the report beyond SFT and PALLM are chosen in the config: `baselines` (no-LLM
classifiers, the text-only LLM, API models as `api:<name>`) and `ablations` (`no_cot`,
`single_task_rl`); docs/report.md describes each row.

Each stage writes into the run folder and is skipped when its output is already there, so an
interrupted run resumes where it stopped (the trainers themselves resume from their last
checkpoint). A run folder made with another config is never overwritten without --overwrite.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pallm.acoustics.cues import CueBaseline
from pallm.config import dump_config
from pallm.data.manifest import Row, read_manifest
from pallm.data.parasynth.generate import SynthConfig
from pallm.errors import PallmError
from pallm.model.build import ModelSpec
from pallm.prompts.format import PromptConfig
from pallm.train.grpo import GRPOConfig, train_grpo
from pallm.train.sft import SFTConfig, train_sft

Say = Callable[[str], None]


# --- the run's config: one schema for every command (`pallm train sft/grpo` read their sections) ---

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Corpus folder holding manifest.jsonl. Null: ParaSynth, generated (and cached) under cache_dir.
    corpus: str | None = None
    cache_dir: str = "cache"
    synth: SynthConfig = Field(default_factory=SynthConfig)
    measure_cues: bool = True
    # What the cue bins are relative to: "speaker" (the speaker's own habit) or "gender" (the
    # corpus's speakers of the same gender: the norm a listener applies to one clip of a stranger).
    cue_baseline: CueBaseline = "speaker"


class LLMJudgeConfig(BaseModel):
    """`eval.llm_judge`: score the replies with an LLM judge too (pallm.rewards.make_llm_judge), next
    to the embedded one. Any OpenAI-compatible chat-completions endpoint (vLLM, a hosted API)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str  # e.g. http://localhost:8000/v1 or https://api.openai.com/v1
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # the env var's NAME; unset -> no Authorization header
    max_concurrency: int = Field(4, ge=1)
    timeout: float = Field(30.0, gt=0, description="seconds per socket operation")
    retries: int = Field(3, ge=0)
    cache_dir: str | None = None  # null: <data.cache_dir>/llm_judge


class ApiEvalConfig(BaseModel):
    """`eval.api`: how the API models named in `baselines` (`api:<name>`) are asked."""

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int = Field(4, ge=1)
    rpm: float | None = Field(None, gt=0, description="requests per minute; null = no limit")
    timeout: float = Field(60.0, gt=0)
    retries: int = Field(4, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    # The shortcut probes (silence, same words with another voice) cost two more requests per row.
    probes: bool = False
    cache_dir: str | None = None  # null: <data.cache_dir>/api


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate on the first N test rows only")
    probes: bool = True  # lexical-shortcut probes (silence, same words with another voice)
    response: bool = True  # reply generation scored by the embedded judge
    response_rows: int = Field(96, ge=1)
    examples: int = Field(6, ge=0, description="example outputs shown in the report")
    llm_judge: LLMJudgeConfig | None = None  # null: the embedded judge only
    api: ApiEvalConfig = Field(default_factory=ApiEvalConfig)


# Rows of the report beyond SFT and PALLM. `api:<name>` (a model of pallm.evaluate.api_models) is a
# baseline too. Names in the report and in metrics.json:
BASELINES = ("acoustic", "text", "text_llm")
ABLATIONS = ("no_cot", "single_task_rl")
ROW_NAMES = {"acoustic": "eGeMAPS + LR", "text": "text TF-IDF + LR", "text_llm": "text-only LLM (SFT on transcripts)",
             "no_cot": "SFT, no CoT", "single_task_rl": "GRPO, single task"}
# The text-only LLM hears this much silence instead of every clip (see text_only_corpus).
TEXT_ONLY_SILENCE_S = 1.0


class AblationSteps(BaseModel):
    """Training budget of the ablations (`ablation_steps:`)."""

    model_config = ConfigDict(extra="forbid")

    # "SFT, no CoT": optimizer steps; null = sft.steps (the same budget as stage 1).
    sft: int | None = Field(None, ge=1)
    # "GRPO, single task": optimizer steps. "same" = grpo.steps. "matched" = grpo.steps x the
    # expected share of classify prompts in stage 2 (0.625 by default: 250 of 400 steps), i.e. the
    # single-task run sees as many classification prompts (and completions) as PALLM's stage 2.
    grpo: int | Literal["same", "matched"] = "matched"

    @field_validator("grpo")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or 'same' / 'matched')")
        return v


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
    # acoustic: eGeMAPS + LR; text: TF-IDF + LR; text_llm: the same tiny LLM and SFT recipe on
    # transcripts alone; api:<name>: an API audio model (skipped with a note when its key is unset).
    baselines: list[str] = ["acoustic", "text", "text_llm"]
    # no_cot: stage 1 with prompt.cot=false; single_task_rl: stage 2 on classification only.
    ablations: list[str] = ["no_cot", "single_task_rl"]
    ablation_steps: AblationSteps = Field(default_factory=AblationSteps)
    # Train the rows beside the main line (text-only LLM, ablations) in a second process while
    # stage 1 and stage 2 train in this one: they are independent and each gets half the cores
    # (unless `threads` is set), so on two cores the run takes ~3 minutes less. Same numbers
    # either way (tests/test_cli.py).
    parallel_rows: bool = True

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        unknown = [b for b in v if b not in BASELINES]
        if unknown:
            from pallm.evaluate.api_models import API_MODELS  # only when an api:<name> is named

            known = BASELINES + tuple(f"api:{n}" for n in API_MODELS)
            unknown = [b for b in unknown if b not in known]
            if unknown:
                raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(known)}")
        return list(dict.fromkeys(v))  # duplicates dropped, order kept

    @field_validator("ablations")
    @classmethod
    def _known_ablations(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in ABLATIONS]
        if unknown:
            raise ValueError(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _ablation_init(self) -> RunConfig:
        if "single_task_rl" in self.ablations and "sft" not in self.stages and self.grpo_init is None:
            raise ValueError("ablation single_task_rl starts from the stage-1 checkpoint: keep 'sft' in stages "
                             "or set grpo_init")
        return self


def classify_share(grpo: GRPOConfig) -> float:
    """Expected share of stage-2 prompts that are classification prompts: hard-row oversampling
    and conflict prompts are classify prompts, the rest follow the task weights."""
    w = {t: float(x) for t, x in grpo.task_weights.items() if x > 0}
    base = w.get("classify", 0.0) / sum(w.values()) if w else 0.0
    return 1.0 - (1.0 - grpo.oversample_hard) * (1.0 - grpo.conflict_share) * (1.0 - base)


def single_task_steps(cfg: RunConfig) -> int:
    """Optimizer steps of the "GRPO, single task" ablation (see AblationSteps.grpo)."""
    b = cfg.ablation_steps.grpo
    if b == "same":
        return cfg.grpo.steps
    if b == "matched":
        return max(1, round(cfg.grpo.steps * classify_share(cfg.grpo)))
    return int(b)


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
            annotate_corpus(corpus, num_workers=cfg.data.synth.workers, progress=cb, baseline=cfg.data.cue_baseline)
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
            for sub in ("sft", "grpo", "eval", "text_llm", "text_only_corpus", "ablations"):
                shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, saved)


def _timed(train: Callable[..., Any], kwargs: dict[str, Any]) -> float:
    """`train(**kwargs)` in the second process (module level, so `spawn` can find it); returns its
    wall time."""
    t0 = time.perf_counter()
    train(**kwargs)
    return time.perf_counter() - t0


def _finished(stage_dir: Path) -> bool:
    return (stage_dir / "pallm.json").exists() and (stage_dir / "train_summary.json").exists()


def _published_step(stage_dir: Path) -> str:
    """A sentence for the report when load_best_model_at_end or average_last_checkpoints picked
    the published model."""
    summary = json.loads((stage_dir / "train_summary.json").read_text(encoding="utf-8"))
    if summary.get("averaged_steps"):
        return f" Published: the weight average of the checkpoints of steps {', '.join(map(str, summary['averaged_steps']))}."
    best = summary.get("best_model")
    if not best:
        return ""
    which = "the last step" if best["step"] == summary["steps"] else f"step {best['step']}, not the last step"
    return f" Published: the dev-best model ({which}; dev {best['metric']} {best['value']:.3f})."


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


def text_only_corpus(corpus: Path, out_dir: Path) -> Path:
    """The corpus as the text-only LLM sees it: the same rows (ids, splits, labels, transcripts,
    measured cues, reference replies) with every clip (and speaker reference) replaced by one shared clip of
    TEXT_ONLY_SILENCE_S seconds of silence, at train and at test time.

    Why silence and not a prompt without the audio turn: the model, its chat template, the prompt
    and the SFT recipe stay exactly those of PALLM's stage 1 (only the information in the audio
    is gone), so the row isolates what the words alone teach the same learner. Why one fixed
    length and not silence as long as each clip: the number of audio tokens would still tell the
    clip's duration, and duration carries speaking rate, a voice cue."""
    import numpy as np
    import soundfile as sf

    from pallm.data.audio import SAMPLE_RATE
    from pallm.data.manifest import write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    silence = out_dir / "silence.wav"
    if not silence.exists():
        sf.write(silence, np.zeros(int(TEXT_ONLY_SILENCE_S * SAMPLE_RATE), dtype=np.int16), SAMPLE_RATE,
                 subtype="PCM_16")
    rows = []
    for r in read_manifest(corpus, resolve_audio=False):
        d = r.to_json()
        d.pop("channel", None)  # stereo conversational corpora: the silence is mono
        d.update(audio=silence.name, duration=TEXT_ONLY_SILENCE_S)
        if d.get("reference_audio"):  # the speaker reference, when the prompt plays one, is silent too
            d["reference_audio"] = silence.name
        rows.append(d)
    write_manifest(rows, out_dir, overwrite=True)
    return out_dir


def _make_llm_judge(cfg: RunConfig, notes: list[str]):
    """The `eval.llm_judge` reward function, or None (not configured, or it could not be made)."""
    j = cfg.eval.llm_judge
    if j is None:
        return None
    from pallm.rewards import make_llm_judge

    if not cfg.eval.response:
        notes.append("LLM judge: configured, but eval.response is off, so there are no replies to judge.")
        return None

    if j.api_key_env and not os.environ.get(j.api_key_env):
        notes.append(f"LLM judge: {j.api_key_env} is not set; its requests go without a key.")
    try:
        return make_llm_judge(j.base_url, j.model, j.api_key_env,
                              cache_dir=j.cache_dir or str(Path(cfg.data.cache_dir) / "llm_judge"),
                              max_concurrency=j.max_concurrency, timeout=j.timeout, retries=j.retries, fallback=None)
    except Exception as e:  # noqa: BLE001 - an optional judge never costs the run
        notes.append(f"LLM judge: not used ({type(e).__name__}: {e}).")
        return None


def _evaluate_model(run_predict, rows: list[Row], cfg: RunConfig, out: Path, slug: str, prompt_cfg: PromptConfig,
                    labels: list[str], progress_factory, *, kind: str, source: str, probes: bool,
                    llm_judge=None) -> dict[str, Any]:
    """Classification metrics, shortcut probes and reply scores for any model behind
    `run_predict(rows, task, audio_fn, progress) -> list[Prediction]`; writes out/eval/<slug>."""
    from pallm.evaluate import classification_metrics, response_metrics, shortcut_probes, write_eval
    from pallm.rewards import get_reward

    ev = cfg.eval
    t0 = time.perf_counter()
    with progress_factory(f"evaluating {slug}") as cb:
        preds = run_predict(rows, "classify", None, cb)
    metrics = classification_metrics(preds, rows, labels)
    result: dict[str, Any] = {"kind": kind, "checkpoint": source, "metrics": metrics}
    write_eval(out / "eval" / slug, source, "test", metrics, preds)
    if probes:
        with progress_factory(f"shortcut probes {slug}") as cb:
            result["probes"] = shortcut_probes(None, None, rows, prompt_cfg, ev.batch_size, labels=labels, real=preds,
                                               predict_fn=lambda sub, audio_fn: run_predict(sub, "classify", audio_fn, cb))
    if ev.response:
        resp_rows = [r for r in rows if r.response][: ev.response_rows]
        if resp_rows:
            with progress_factory(f"replies {slug}") as cb:
                rpreds = run_predict(resp_rows, "respond", None, cb)
            result["response"] = response_metrics(rpreds, resp_rows, judge=get_reward("response_judge"),
                                                  prompt_cfg=prompt_cfg,
                                                  extra_judges={"llm_judge": llm_judge} if llm_judge else None)
            result["response_examples"] = [{"id": p.id, "output": p.output} for p in rpreds[: ev.examples]]
    result["examples"] = _examples(preds, rows, ev.examples)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def evaluate_checkpoint(ckpt: Path, rows: list[Row], cfg: RunConfig, out: Path, name: str,
                        progress_factory, *, kind: str | None = None, llm_judge=None) -> dict[str, Any]:
    """Classification metrics, shortcut probes and reply scores for one checkpoint on `rows`
    (written to out/eval/<name>; `kind` defaults to `name`)."""
    from pallm.evaluate import predict
    from pallm.model import load_pretrained, read_pallm_meta

    meta = read_pallm_meta(ckpt)
    prompt_cfg = PromptConfig.model_validate(meta.get("task_format") or cfg.prompt.model_dump())
    labels = meta.get("labels") or ["negative", "neutral", "positive"]
    model, processor = load_pretrained(ckpt)
    model.eval()
    ev = cfg.eval

    def run_predict(subset, task, audio_fn, progress):
        return predict(model, processor, subset, task, prompt_cfg, labels, batch_size=ev.batch_size,
                       max_new_tokens=ev.max_new_tokens, audio_fn=audio_fn, progress=progress)

    return _evaluate_model(run_predict, rows, cfg, out, name, prompt_cfg, labels, progress_factory,
                           kind=kind or name, source=str(ckpt), probes=ev.probes, llm_judge=llm_judge)


def evaluate_api_models(names: list[str], rows: list[Row], cfg: RunConfig, out: Path, progress_factory,
                        notes: list[str], llm_judge=None) -> dict[str, Any]:
    """Rows for API models (`api:<name>` baselines): {"<name> (API)": result}. A model whose key is
    not set, or that fails for good (rejected key, unknown model), is left out with a note; the
    run goes on. Answers are cached (eval.api.cache_dir), so a re-run resumes where one stopped."""
    from pallm.evaluate.api_models import available_api_models
    from pallm.prompts.format import label_set

    a = cfg.eval.api
    cache_dir = a.cache_dir or str(Path(cfg.data.cache_dir) / "api")
    found = available_api_models(cache_dir=cache_dir, names=names, max_concurrency=a.max_concurrency, rpm=a.rpm,
                                 timeout=a.timeout, retries=a.retries, max_tokens=a.max_tokens)
    prompt_cfg = cfg.prompt
    labels = label_set(prompt_cfg, sorted({r.emotion for r in rows if r.emotion}))
    results: dict[str, Any] = {}
    for name in names:
        m = found[name]
        if isinstance(m, str):
            notes.append(f"API model {m} (no row; set the key to add it).")
            continue
        failed: dict[str, str] = {}

        def run_predict(subset, task, audio_fn, progress, m=m, failed=failed):
            preds = m.predict(subset, task, prompt_cfg, labels, progress=progress, audio_fn=audio_fn)
            failed.update({f"{task}:{k}": v for k, v in m.errors.items()})
            return preds

        try:
            res = _evaluate_model(run_predict, rows, cfg, out, f"api-{name}", prompt_cfg, labels, progress_factory,
                                  kind="api", source=f"{m.model} at {m.base_url}", probes=a.probes,
                                  llm_judge=llm_judge)
        except PallmError as e:
            notes.append(f"API model {name}: no row ({e}).")
            continue
        res["source"] = res.pop("checkpoint")
        res["api"] = {"model": m.model, "base_url": m.base_url, **m.stats}
        if m.stats["failures"]:
            first = next(iter(failed.values()), "")
            notes.append(f"API model {name}: {m.stats['failures']} answer(s) still failed after {a.retries} retries and "
                         f"count as unparsable (first: {first}). They are not cached: re-run to ask again.")
        results[f"{name} (API)"] = res
    return results


def _train_curves(log_dir: Path, out: Path, curves: list, stage: str) -> None:
    from pallm.evaluate.report import plot_series, read_log

    log = read_log(log_dir / "train_log.jsonl")
    if stage == "sft":
        specs = (
            ("stage 1: training loss", ["loss", "loss_classify", "loss_respond"], "train", "sft_loss.png"),
            ("stage 1: dev UA (the lexical-shortcut curve)", ["ua_congruent", "ua_conflict", "follows_words_rate"],
             "dev", "sft_dev.png"),
        )
    else:
        reward_keys = sorted({k for r in log for k in r if k.startswith("reward") or k.startswith("rewards/")})
        specs = (
            ("stage 2: rewards", reward_keys, "train", "grpo_rewards.png"),
            ("stage 2: accuracy, parse rate, zero-variance groups",
             [k for k in ("accuracy", "parse_rate", "zero_variance_share", "frac_zero_std") if any(k in r for r in log)],
             "train", "grpo_accuracy.png"),
            ("stage 2: KL, entropy, clip fraction", ["kl", "entropy", "clip_fraction", "clip_ratio"], "train",
             "grpo_kl.png"),
            ("stage 2: dev UA", ["ua_congruent", "ua_conflict", "follows_words_rate"], "dev", "grpo_dev.png"),
        )
    for title, keys, kind, name in specs:
        png = plot_series(log, keys, title, out / name, kind=kind)
        if png:
            curves.append((title, png))


def run_pipeline(cfg: RunConfig, out: Path, say: Say, progress_factory, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage into `out`; returns the run's metrics (also in `out/metrics.json`)."""
    from pallm.evaluate import acoustic_baseline, classification_metrics, text_baseline
    from pallm.evaluate.report import write_report

    out = Path(out)
    _check_run_folder(cfg, out, overwrite)
    times: dict[str, float] = {}
    notes: list[str] = []
    descriptions: dict[str, str] = {}
    baselines: dict[str, Any] = {}

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
        baselines[ROW_NAMES["acoustic"]] = {"kind": "baseline", "metrics": classification_metrics(preds, test, labels)}
        descriptions[ROW_NAMES["acoustic"]] = ("eGeMAPS v02 functionals, z-scored per speaker, logistic regression: "
                                               "listens, cannot read.")
    if "text" in cfg.baselines:
        preds = text_baseline(train, test)
        baselines[ROW_NAMES["text"]] = {"kind": "baseline", "metrics": classification_metrics(preds, test, labels)}
        descriptions[ROW_NAMES["text"]] = ("character n-gram TF-IDF of the transcript, logistic regression: reads, "
                                           "cannot listen.")
    times["baselines"] = time.perf_counter() - t0

    curves: list[tuple[str, Path]] = []
    # name -> (checkpoint, eval folder name, kind, test rows it is evaluated on)
    trained: dict[str, tuple[Path, str, str, list[Row]]] = {}
    main_rows: dict[str, tuple[Path, str, str, list[Row]]] = {}
    ablation_rows: dict[str, tuple[Path, str, str, list[Row]]] = {}

    def timed_stage(title: str, out_dir: Path, train: Callable[..., Any]) -> None:
        """Train into `out_dir` unless a finished run is there already; time it either way."""
        t0 = time.perf_counter()
        if _finished(out_dir):
            say(f"{title}: reusing {out_dir}")
        else:
            with progress_factory(title) as cb:
                train(progress=lambda s, n, m: cb(s, n))
        times[title] = time.perf_counter() - t0

    cores = os.cpu_count() or 1
    side = (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            if cfg.parallel_rows and cores >= 2 else None)
    side_jobs: dict[str, Future] = {}

    def stage(title: str, out_dir: Path, train: Callable[..., Any], kwargs: dict[str, Any], beside: bool) -> None:
        """Train one stage here (with a progress bar), or, for a row `beside` the main line, in the
        second process when there is one (collected by `wait_beside`)."""
        if side is not None and kwargs["cfg"].threads is None:
            # Two trainers at once: each takes half the cores. Both taking all of them, OpenMP
            # spin-waits and each runs several times slower (docs/training.md, "Threads").
            kwargs = {**kwargs, "cfg": kwargs["cfg"].model_copy(update={"threads": cores // 2})}
        if beside and side is not None and not _finished(out_dir):
            say(f"{title}: training in a second process")
            side_jobs[title] = side.submit(_timed, train, kwargs)
            return
        timed_stage(title, out_dir, lambda **kw: train(**kwargs, **kw))

    def wait_beside() -> None:
        for title, job in side_jobs.items():
            with progress_factory(f"{title} (second process)") as cb:
                times[title] = job.result()  # the worker's error, if any, is raised here
                cb(1, 1)
        side_jobs.clear()

    def sft_run(title: str, out_dir: Path, prompt_cfg: PromptConfig, sft_cfg, corpus_dir: Path, beside: bool = False) -> None:
        stage(title, out_dir, train_sft, dict(cfg=sft_cfg, model_spec=cfg.model, prompt_cfg=prompt_cfg, corpus=corpus_dir,
                                            out=out_dir, seed=cfg.seed), beside)

    def grpo_run(title: str, out_dir: Path, grpo_cfg, init, beside: bool = False) -> None:
        stage(title, out_dir, train_grpo, dict(cfg=grpo_cfg, prompt_cfg=cfg.prompt, corpus=corpus, init=init,
                                               out=out_dir, seed=cfg.seed), beside)

    init = out / "sft" if "sft" in cfg.stages else cfg.grpo_init
    g = cfg.grpo
    try:
        # Rows that need no stage-1 checkpoint start first (beside stage 1), the single-task
        # ablation once stage 1 is there (beside stage 2).
        if "text_llm" in cfg.baselines:
            name = ROW_NAMES["text_llm"]
            tdir = text_only_corpus(Path(corpus), out / "text_only_corpus")
            sft_run("text-only LLM (SFT)", out / "text_llm", cfg.prompt, cfg.sft, tdir, beside=True)
            silent = {r.id: r for r in read_manifest(tdir, split="test")}
            trained[name] = (out / "text_llm", "text_llm", "baseline", [silent[r.id] for r in test])
            descriptions[name] = (f"the same tiny model and SFT recipe as stage 1 ({cfg.sft.steps} steps), with every "
                                  f"clip replaced by {TEXT_ONLY_SILENCE_S:g} s of silence at train and test time: it gets "
                                  "the transcript (and the CoT targets), never the voice.")
        if "no_cot" in cfg.ablations:
            name = ROW_NAMES["no_cot"]
            steps = cfg.ablation_steps.sft or cfg.sft.steps
            sft_run("ablation: SFT, no CoT", out / "ablations" / "no_cot", cfg.prompt.model_copy(update={"cot": False}),
                    cfg.sft.model_copy(update={"steps": steps}), corpus, beside=True)
            ablation_rows[name] = (out / "ablations" / "no_cot", "no_cot", "ablation", test)
            descriptions[name] = (f"stage 1 with prompt.cot=false (answer tags only, no reasoning), {steps} steps "
                                  f"(stage 1: {cfg.sft.steps}).")
        if "sft" in cfg.stages:
            sft_run("stage 1 (SFT)", out / "sft", cfg.prompt, cfg.sft, corpus)
            main_rows["SFT (stage 1)"] = (out / "sft", "sft", "sft", test)
            descriptions["SFT (stage 1)"] = (f"stage 1: SFT, {cfg.sft.steps} steps x {cfg.sft.batch_size * cfg.sft.grad_accum}."
                                             + _published_step(out / "sft"))
            _train_curves(out / "sft", out, curves, "sft")
        if "single_task_rl" in cfg.ablations:
            name = ROW_NAMES["single_task_rl"]
            steps = single_task_steps(cfg)
            grpo_run("ablation: GRPO, single task", out / "ablations" / "single_task_rl",
                     g.model_copy(update={"task_weights": {"classify": 1.0, "respond": 0.0}, "steps": steps}), init,
                     beside=True)
            ablation_rows[name] = (out / "ablations" / "single_task_rl", "single_task_rl", "ablation", test)
            share = classify_share(g)
            budget = {"matched": f"the number of classification prompts PALLM's stage 2 sees ({g.steps} steps x "
                                 f"{share:.2f} classify share)",
                      "same": "as many steps as PALLM's stage 2"}.get(str(cfg.ablation_steps.grpo),
                                                                      "set by ablation_steps.grpo")
            descriptions[name] = (f"stage 2 from the same stage-1 checkpoint with classification only (task weights "
                                  f"classify 1 / respond 0), {steps} steps x {g.per_device_batch_size} prompts x "
                                  f"{g.num_generations} completions: {budget}.")
        if "grpo" in cfg.stages:
            if init is None:
                raise PallmError("stage 2 needs a stage-1 checkpoint: keep 'sft' in stages or set grpo_init.")
            grpo_run("stage 2 (GRPO)", out / "grpo", g, init)
            main_rows["PALLM (SFT + GRPO)"] = (out / "grpo", "pallm", "pallm", test)
            descriptions["PALLM (SFT + GRPO)"] = (f"stage 2: multi-task GRPO from stage 1, {g.steps} steps x "
                                                  f"{g.per_device_batch_size} prompts x {g.num_generations} completions."
                                                  + _published_step(out / "grpo"))
            _train_curves(out / "grpo", out, curves, "grpo")
        wait_beside()
    finally:
        if side is not None:
            side.shutdown(cancel_futures=True)

    off = [a for a in ABLATIONS if a not in cfg.ablations]
    if off:
        notes.append("Not run: " + ", ".join(f"{ROW_NAMES[a]} (`{a}`)" for a in off) + "; add to `ablations` to run "
                     "(docs/report.md).")
    llm_judge = _make_llm_judge(cfg, notes)
    t0 = time.perf_counter()
    evaluated: dict[str, Any] = {}
    for name, (ckpt, slug, kind, rows_) in {**trained, **main_rows, **ablation_rows}.items():
        evaluated[name] = evaluate_checkpoint(ckpt, rows_, cfg, out, slug, progress_factory, kind=kind,
                                              llm_judge=llm_judge)
    times["evaluation"] = time.perf_counter() - t0

    api_names = [b.split(":", 1)[1] for b in cfg.baselines if b.startswith("api:")]
    api_rows: dict[str, Any] = {}
    if api_names:
        t0 = time.perf_counter()
        api_rows = evaluate_api_models(api_names, test, cfg, out, progress_factory, notes, llm_judge=llm_judge)
        for name, res in api_rows.items():
            descriptions[name] = (f"{res['api']['model']} through {res['api']['base_url']}, the same prompt and parser "
                                  f"({res['api']['requests']} requests, {res['api']['cache_hits']} cached answers).")
        times["API models"] = time.perf_counter() - t0

    # Report order: reference points first, then PALLM's stages, then the ablations.
    models: dict[str, Any] = {**baselines, **{n: evaluated[n] for n in trained}, **api_rows,
                              **{n: evaluated[n] for n in main_rows}, **{n: evaluated[n] for n in ablation_rows}}
    for name, m in models.items():
        if name in descriptions:
            m.setdefault("description", descriptions[name])
    if llm_judge is not None:
        fails = sum((m.get("response") or {}).get("llm_judge_failures", 0) for m in models.values())
        total = sum((m.get("response") or {}).get("n", 0) for m in models.values())
        j = cfg.eval.llm_judge
        notes.append(f"LLM judge ({j.model} at {j.base_url}): {fails} of {total} replies could not be scored (failed "
                     "requests or unusable answers, logged); they are left out of its mean, nothing else.")
    results = {"models": models, "times": times, "corpus": str(corpus), "n_test": len(test),
               "examples": {n: m.get("examples", []) for n, m in models.items() if m.get("examples")},
               "notes": notes}
    if llm_judge is not None:
        results["llm_judge"] = {"model": cfg.eval.llm_judge.model, "base_url": cfg.eval.llm_judge.base_url,
                                **llm_judge.stats}
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_report(out, results, config_text=(out / "config.yaml").read_text(), curves=curves)
    return results
