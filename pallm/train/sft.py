"""Stage 1: supervised fine-tuning on chain-of-thought targets built from measured acoustic cues.

    from pallm.train.sft import SFTConfig, train_sft
    summary = train_sft(SFTConfig(), ModelSpec(), PromptConfig(), "data/parasynth", "runs/x/sft")

The same code runs on one CPU and under `accelerate launch` (DDP / FSDP / DeepSpeed): each
process takes its own slice of every global batch, only the main process writes. See
docs/training.md.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field

from pallm.data.manifest import Row, manifest_path, read_manifest
from pallm.errors import PallmError
from pallm.evaluate.predict import model_audio
from pallm.model import IGNORE_INDEX, ModelSpec, build_tiny, encode_batch, load_pretrained
from pallm.model.build import PALLM_META_FILE
from pallm.prompts.format import PromptConfig, label_set
from pallm.train.common import (
    AudioCache,
    BestModelFields,
    LoraSettings,
    RunLogger,
    apply_lora,
    build_optimizer,
    build_scheduler,
    check_resume,
    clear_run,
    configure_deepspeed,
    dev_record,
    finish_run,
    freeze_audio_encoder,
    is_sharded,
    latest_checkpoint,
    load_training_checkpoint,
    make_accelerator,
    peak_rss_mb,
    read_dev_curve,
    read_trainer_state,
    save_training_checkpoint,
    seed_everything,
    set_threads,
    trainable_parameters,
)
from pallm.train.examples import (
    ExampleStream,
    can_serve,
    check_cues,
    TaskWeights,
    check_task_weights,
    select_dev_rows,
    select_train_rows,
    tokenizer_texts,
)

ProgressFn = Callable[[int, int, dict], None]


class SFTConfig(BestModelFields):
    """Stage-1 settings (`sft:` section). Defaults: a tiny-model run that learns in ~2 minutes on
    one CPU thread (see docs/training.md for the measurements behind them)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(400, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per process per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(3e-3, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; null or 0 = off")
    # Task mixture: each epoch every row becomes one example, tasks assigned by these shares.
    task_weights: TaskWeights = {"classify": 0.5, "respond": 0.5}
    # None: every labelled train row. N: a seeded random N of them (nested: same seed, the 100
    # rows of budget 100 are among the 200 of budget 200), for data-scarcity experiments.
    label_budget: int | None = Field(None, ge=1)
    # Share of examples shown without their transcript (and without the words claim in the target):
    # modality dropout, so the voice claim is also learned where only the audio can give it.
    transcript_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    save_every: int = Field(100, ge=0, description="checkpoint every N steps (0 = only the final model)")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(100, ge=0, description="dev evaluation every N steps and at the end (0 = off)")
    eval_rows: int = Field(96, ge=1, description="size of the fixed dev subset")
    eval_batch_size: int = Field(32, ge=1)
    eval_max_new_tokens: int = Field(96, ge=1)
    mixed_precision: Literal["no", "bf16", "auto"] = "auto"  # auto: bf16 on GPUs that support it
    threads: int | None = Field(None, description="torch CPU threads per process; null = torch's default "
                                 "(OMP_NUM_THREADS, which accelerate launch sets to cores / processes; else every core)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze_audio_encoder: bool = False
    gradient_checkpointing: bool = False
    log_every: int = Field(10, ge=1)
    audio_cache: Literal["int16", "float32"] = "int16"


# Fields that change what a resumed run computes; a checkpoint made with other values is refused.
_RESUME_KEYS = ("batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_ratio", "weight_decay",
                "max_grad_norm", "task_weights", "label_budget", "transcript_dropout", "lora", "freeze_audio_encoder",
                "mixed_precision")


# --- data ------------------------------------------------------------------------------------


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on completion tokens only. Returns (mean over the batch's
    completion tokens, per-example mean, per-example token count). Only the labelled positions
    are upcast to float32, not the whole (batch x length x vocab) logits."""
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()
    ce = F.cross_entropy(picked, tgt[mask], reduction="none")
    per_row = torch.zeros(tgt.shape[0], device=ce.device, dtype=ce.dtype)
    rows = mask.nonzero(as_tuple=True)[0]
    per_row.index_add_(0, rows, ce)
    tokens = mask.sum(1)
    loss = ce.sum() / tokens.sum().clamp(min=1)
    return loss, per_row / tokens.clamp(min=1), tokens


# --- run folder --------------------------------------------------------------------------------

def _fingerprint(cfg: SFTConfig, prompt_cfg: PromptConfig, rows: Sequence[Row], seed: int, num_processes: int,
                 model_spec: ModelSpec, init: str | None) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    ids = hashlib.sha1("\n".join(sorted(r.id for r in rows)).encode()).hexdigest()[:16]
    return {"seed": seed, "num_processes": num_processes, "prompt": prompt_cfg.model_dump(mode="json"),
            "train_rows": ids, "model": model_spec.model_dump(mode="json"), "init": init,
            **{k: dump[k] for k in _RESUME_KEYS}}


# --- training --------------------------------------------------------------------------------


def train_sft(
    cfg: SFTConfig,
    model_spec: ModelSpec,
    prompt_cfg: PromptConfig,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    init: str | os.PathLike | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stage 1 into the run folder `out`; returns a summary (also written to
    `out/train_summary.json`).

    Model: `init` (a checkpoint) if given, else `model_spec.name_or_path`, else a tiny model
    whose tokenizer is trained on the training texts. Resumes from the newest complete
    `out/checkpoints/step-N` if there is one. Refuses a folder holding a finished run (its
    `pallm.json`) unless `overwrite`. `progress(step, steps, {"loss", "lr"})` is called on the
    main process after every optimizer step.
    """
    t_start = time.perf_counter()
    cfg.check_average()  # before any work: a run too short to write what it is to average
    set_threads(cfg.threads)
    manifest = manifest_path(corpus)
    corpus_dir = manifest.parent
    out = Path(out)

    # --- data (cheap checks first, before any model is built) ---
    all_rows = read_manifest(manifest)
    try:
        labels = label_set(prompt_cfg, sorted({r.emotion for r in all_rows if r.emotion}))
    except ValueError:
        raise PallmError(f"{manifest}: prompt.target=emotion, but no row has an emotion label.") from None
    train_rows = select_train_rows(all_rows, prompt_cfg, cfg.label_budget, seed, where=str(manifest))
    check_cues(train_rows, prompt_cfg, where=str(corpus_dir))
    weights = check_task_weights(cfg.task_weights)
    if "respond" in weights and not any(can_serve(r, "respond", prompt_cfg) for r in train_rows):
        raise PallmError(f"{manifest}: task_weights gives 'respond' weight {weights['respond']}, but no train row has a "
                         "reference reply (`response`). Set task_weights.respond=0 or add replies.")
    stream = ExampleStream(train_rows, weights, prompt_cfg, labels, seed, cfg.transcript_dropout)

    accelerator = make_accelerator(cfg.grad_accum, cfg.mixed_precision)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes

    dev_rows: list[Row] = []
    if cfg.eval_every:
        dev_rows = select_dev_rows(all_rows, prompt_cfg, cfg.eval_rows, seed)
        if not dev_rows and main:
            warnings.warn(f"{manifest}: no labelled dev rows; the dev evaluation (eval_every) is skipped.", UserWarning, stacklevel=2)
        if dev_rows and is_sharded(accelerator):
            if main:
                warnings.warn("eval_every is not supported under FSDP/DeepSpeed (generation needs every rank); "
                              "evaluate the saved checkpoint with `pallm eval` instead.", UserWarning, stacklevel=2)
            dev_rows = []

    # --- run folder: refuse a finished run, else resume from the newest checkpoint ---
    finished = (out / PALLM_META_FILE).exists()
    accelerator.wait_for_everyone()
    if finished and not overwrite:
        raise PallmError(f"{out}: holds a finished stage-1 run (pallm.json). Choose another output folder, "
                         "or pass overwrite=True (--overwrite) to replace it.")
    if overwrite and main:  # replace whatever run is there, finished or not
        clear_run(out)
    accelerator.wait_for_everyone()
    resume = latest_checkpoint(out)
    init_id = str(Path(init).expanduser().resolve()) if init is not None and Path(init).expanduser().exists() else init
    fingerprint = _fingerprint(cfg, prompt_cfg, train_rows, seed, world, model_spec, str(init_id) if init_id else None)
    if resume is not None:  # before building the model: a mismatch is refused cheaply
        check_resume(read_trainer_state(resume[1]), fingerprint, resume[1])

    # --- model ---
    seed_everything(seed)
    if init is not None:
        model, processor = load_pretrained(init, model_spec)
    elif model_spec.name_or_path:
        model, processor = load_pretrained(model_spec.name_or_path, model_spec)
    else:
        model, processor = build_tiny(tokenizer_texts(train_rows, prompt_cfg, labels), model_spec)
    model.train()
    if cfg.freeze_audio_encoder:
        freeze_audio_encoder(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    n_trainable = trainable_parameters(model)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.steps, cfg.warmup_ratio)
    configure_deepspeed(accelerator, cfg.batch_size)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = consumed = 0
    if resume is not None:
        state = load_training_checkpoint(accelerator, resume[1])
        step, consumed = int(state["step"]), int(state["examples_seen"])
        if state.get("steps") != cfg.steps and main:
            warnings.warn(f"resuming {resume[1]} with steps={cfg.steps} (it was started with {state.get('steps')}); "
                          "the learning-rate schedule is stretched to the new total.", UserWarning, stacklevel=2)
    start_step = step

    meta = {"stage": "sft", "task_format": prompt_cfg.model_dump(mode="json"), "labels": labels,
            "train_config": cfg.model_dump(mode="json"), "model_spec": model_spec.model_dump(mode="json"),
            "corpus": str(corpus_dir.resolve()), "seed": seed, "init": str(init_id) if init_id else None,
            "train_rows": len(train_rows)}

    cache = AudioCache(cfg.audio_cache)
    sr = processor.feature_extractor.sampling_rate
    window = processor.feature_extractor.n_samples / sr
    long = [r for r in train_rows if r.duration is not None and r.duration > window + 1e-6]
    if long and main:
        warnings.warn(f"{len(long)} of {len(train_rows)} train clips are longer than the model's {window:g} s audio "
                      f"window; only their first {window:g} s are heard (truncated).", UserWarning, stacklevel=2)

    logger = RunLogger(out, enabled=main, resume_step=step)
    dev_curve = read_dev_curve(out, step) if (main and resume is not None) else []
    best = cfg.best_model_tracker(out, step if resume is not None else None)
    device = accelerator.device
    g = cfg.batch_size * world  # examples per micro-batch over all processes
    task_ids = {"classify": 0, "respond": 1}
    win = torch.zeros(6, device=device, dtype=torch.float64)  # loss*micro, micro, cls sum, cls n, rsp sum, rsp n
    win_time, win_examples, train_time, examples_run = 0.0, 0, 0.0, 0  # examples/s: training time only
    last: dict[str, Any] = {}

    def dev_eval(at: int) -> None:
        from pallm.evaluate.metrics import classification_metrics
        from pallm.evaluate.predict import predict

        rec = None
        if main:
            net = accelerator.unwrap_model(model)
            preds = predict(net, processor, dev_rows, "classify", prompt_cfg, labels, batch_size=cfg.eval_batch_size,
                            max_new_tokens=cfg.eval_max_new_tokens, audio_fn=cache.get, reference_fn=cache.get)
            rec = dev_record(at, classification_metrics(preds, dev_rows, labels))
            dev_curve.append(rec)
            logger.log(at, {k: v for k, v in rec.items() if k != "step"}, kind="dev")
            model.train()
        accelerator.wait_for_everyone()
        if best is not None:
            best.update(accelerator, model, processor, {**meta, "step": at}, rec)

    try:
        with warnings.catch_warnings():
            if long:  # said once above; keep the model module from repeating it per batch size
                warnings.filterwarnings("ignore", message=r".*longer than the model's audio window.*truncated", category=UserWarning)
            while step < cfg.steps:
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                step_loss = 0.0
                grad_norm = None
                for _ in range(cfg.grad_accum):
                    chunk = stream.take(consumed, g)
                    consumed += g
                    local = chunk[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                    audios = [model_audio(e.row, prompt_cfg, cache.get, cache.get) for e in local]
                    batch = encode_batch(processor, audios, [e.prompt for e in local], [e.target for e in local])
                    targets = batch.pop("labels").to(device)
                    batch = batch.to(device)
                    with accelerator.accumulate(model):
                        logits = model(**batch, use_cache=False).logits
                        loss, per_ex, _ = completion_loss(logits, targets)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    lv = float(loss.detach())
                    step_loss += lv / cfg.grad_accum
                    win[0] += lv
                    win[1] += 1
                    per_ex = per_ex.detach().double()
                    for e, v in zip(local, per_ex):
                        k = task_ids[e.task]
                        win[2 + 2 * k] += v
                        win[3 + 2 * k] += 1
                step += 1
                examples_run += g * cfg.grad_accum
                win_examples += g * cfg.grad_accum
                dt = time.perf_counter() - t0
                train_time += dt
                win_time += dt

                if step % cfg.log_every == 0 or step == cfg.steps:
                    tot = accelerator.reduce(win.clone(), reduction="sum")
                    last = {"loss": float(tot[0] / tot[1]), "lr": lr, "examples_per_s": win_examples / max(win_time, 1e-9),
                            "epoch": consumed / stream.n}
                    if tot[3] > 0:
                        last["loss_classify"] = float(tot[2] / tot[3])
                    if tot[5] > 0:
                        last["loss_respond"] = float(tot[4] / tot[5])
                    if grad_norm is not None:
                        last["grad_norm"] = float(grad_norm)
                    logger.log(step, last)
                    win.zero_()
                    win_examples, win_time = 0, 0.0
                if dev_rows and (step % cfg.eval_every == 0 or step == cfg.steps):
                    dev_eval(step)
                if cfg.saves_step(step):
                    save_training_checkpoint(
                        accelerator, model, processor, out, step, {**meta, "step": step},
                        {"examples_seen": consumed, "steps": cfg.steps, "epoch": consumed / stream.n,
                         "fingerprint": fingerprint},
                        keep=cfg.keep_checkpoints,
                    )
                if main and progress is not None:
                    progress(step, cfg.steps, {"loss": step_loss, "lr": lr})

        wall = time.perf_counter() - t_start
        summary = {
            "steps": step,
            "resumed_from": start_step if resume is not None else None,
            "examples": examples_run,
            "examples_per_s": examples_run / train_time if train_time else None,
            "final_loss": last.get("loss"),
            "final_loss_classify": last.get("loss_classify"),
            "final_loss_respond": last.get("loss_respond"),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "wall_time_s": round(wall, 2),
            "train_time_s": round(train_time, 2),
            "train_rows": len(train_rows),
            "epochs": consumed / stream.n,
            "trainable_parameters": n_trainable,
            "processes": world,
            "threads": torch.get_num_threads(),  # per process
            "dev_curve": dev_curve,
            "audio_cache_mb": round(cache.nbytes / 2**20, 1),
        }
        return finish_run(accelerator, model, processor, out, meta, summary, best=best,
                          average_last=cfg.average_last_checkpoints)
    finally:
        logger.close()


__all__ = ["ExampleStream", "SFTConfig", "completion_loss", "select_dev_rows", "select_train_rows", "train_sft"]
