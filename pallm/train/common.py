"""Training plumbing shared by stage 1 (`sft.py`) and stage 2 (GRPO).

- `seed_everything`, `set_threads`, `resolve_mixed_precision`
- `AudioCache`: decode each clip once, keep it in memory (int16 or float32)
- `LoraSettings` + `apply_lora`, `freeze_audio_encoder`
- `build_optimizer` (AdamW, no decay on biases/norms) and `build_scheduler` (warmup + decay)
- `make_accelerator`: an `Accelerator` whose scheduler steps once per optimizer step
- checkpoints: `save_training_checkpoint` / `load_training_checkpoint` / `latest_checkpoint`
  (`out/checkpoints/step-N/`: a from_pretrained folder + `trainer/` accelerate state +
  `trainer_state.json`), `save_model` (full weights, gathered under FSDP/DeepSpeed),
  `publish_final` (the final model into the run folder without touching logs/checkpoints)
- `RunLogger`: TensorBoard under `out/logs/` + `out/train_log.jsonl`, main process only
- `peak_rss_mb`

Everything that writes is main-process only; functions marked *collective* must be called on
every rank.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pallm.data.audio import load_audio
from pallm.data.manifest import Row
from pallm.errors import ConfigError, PallmError
from pallm.model.build import PALLM_META_FILE, average_checkpoints, replace_dir, save_checkpoint

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
ACCELERATE_STATE = "trainer"  # subfolder of a step checkpoint holding accelerate's save_state
LOGS_DIR = "logs"
TRAIN_LOG = "train_log.jsonl"
BEST_MODEL_DIR = "best"  # the best-on-dev model so far (load_best_model_at_end)
# Keys of a dev record (`dev_record`) a run can select its published model by.
DevMetric = Literal["ua", "ua_congruent", "ua_conflict", "parse_rate", "follows_words_rate", "worst_emotion_accuracy"]


# --- process setup ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and all GPUs) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_threads(n: int | None) -> None:
    """torch CPU threads (None: leave torch's default, which follows OMP_NUM_THREADS; `accelerate
    launch` sets that to cores / processes). One thread is faster only when the cores are shared."""
    if n is not None:
        if n < 1:
            raise ConfigError(f"threads must be >= 1 (or null for torch's default), got {n}.")
        torch.set_num_threads(n)


def resolve_mixed_precision(mode: str) -> str:
    """'auto' -> 'bf16' on GPUs that support it, else 'no'. 'bf16'/'no' pass through."""
    if mode == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mode not in ("no", "bf16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'auto', got {mode!r}.")
    return mode


def make_accelerator(grad_accum: int, mixed_precision: str):
    """An Accelerator whose prepared scheduler steps exactly when called: call `scheduler.step()`
    only when `accelerator.sync_gradients` (accelerate's default would step it num_processes
    times per optimizer step)."""
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Several processes (torchrun / accelerate launch) but no accelerator device: accelerate only
    # sets up CPU DDP (gloo) when asked for the CPU; otherwise each process would train alone.
    cpu = world > 1 and not _has_device()
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum,
        mixed_precision=resolve_mixed_precision(mixed_precision),
        step_scheduler_with_optimizer=False,
        cpu=cpu,
    )
    if accelerator.num_processes != world:
        raise PallmError(f"launched as {world} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes}; "
                         "they would train independently into the same folder. Check the launcher (docs/training.md).")
    return accelerator


def _has_device() -> bool:
    if torch.cuda.is_available():
        return True
    from accelerate import utils as au

    for name in ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_hpu_available"):
        fn = getattr(au, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a probe that fails means "not available"
            pass
    return False


def is_sharded(accelerator) -> bool:
    """FSDP / DeepSpeed: parameters live in shards; full weights need a gather."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(accelerator, micro_batch_size: int) -> None:
    """Without a prepared DataLoader, accelerate cannot fill DeepSpeed's "auto" micro-batch size:
    set it from the trainer's per-process batch size (no-op for other backends)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# --- audio -----------------------------------------------------------------------------------


class AudioCache:
    """Decode each clip once and keep it in memory.

    `dtype="int16"` halves the memory of float32 and is lossless for 16-bit sources (ParaSynth,
    IEMOCAP, RAVDESS); clips come back as float32 either way, as `load_audio` returns them.
    `get(row)` is usable as the `audio_fn` of `pallm.evaluate.predict`.
    """

    def __init__(self, dtype: Literal["int16", "float32"] = "int16"):
        if dtype not in ("int16", "float32"):
            raise ConfigError(f"audio cache dtype must be 'int16' or 'float32', got {dtype!r}.")
        self.dtype = dtype
        self._clips: dict[str, np.ndarray] = {}
        self.decoded = 0  # number of file decodes (a cache hit does not count)

    def _key(self, row: Row) -> str:
        channel = getattr(row, "channel", None)
        return f"{row.audio}#{channel}" if channel is not None else row.audio

    def get(self, row: Row) -> np.ndarray:
        key = self._key(row)
        clip = self._clips.get(key)
        if clip is None:
            wav = load_audio(row.audio, channel=getattr(row, "channel", None))
            self.decoded += 1
            if self.dtype == "int16":
                clip = np.round(np.clip(wav, -1.0, 32767 / 32768) * 32768).astype(np.int16)
            else:
                clip = wav
            self._clips[key] = clip
        if clip.dtype == np.int16:
            return clip.astype(np.float32) / 32768.0
        return clip

    __call__ = get

    def __len__(self) -> int:
        return len(self._clips)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._clips.values())


# --- model surgery ---------------------------------------------------------------------------

# Qwen2-Audio (transformers 5): model.language_model.layers.N.{self_attn,mlp}.*_proj. The audio
# encoder also has q/k/v projections; the default pattern leaves it alone.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LoraSettings(BaseModel):
    """LoRA on the language model (PEFT). `enabled: false` trains all (unfrozen) weights."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # A regex matched against full module names (PEFT), or a list of module-name suffixes.
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS
    # Trained in full next to the adapters (the audio->text projector is small and task-critical).
    modules_to_save: list[str] = ["multi_modal_projector"]


def audio_tower(model) -> torch.nn.Module | None:
    for obj in (model, getattr(model, "model", None)):
        tower = getattr(obj, "audio_tower", None) if obj is not None else None
        if isinstance(tower, torch.nn.Module):
            return tower
    return None


def freeze_audio_encoder(model) -> int:
    """requires_grad=False on the audio encoder; returns the number of frozen parameters."""
    tower = audio_tower(model)
    if tower is None:
        raise PallmError(f"freeze_audio_encoder: {type(model).__name__} has no audio_tower.")
    n = 0
    for p in tower.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def apply_lora(model, settings: LoraSettings):
    """Wrap `model` in a PEFT LoRA model (base weights frozen). Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=list(settings.modules_to_save) or None,
        bias="none",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"lora: {e}".splitlines()[0]) from None


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def base_model(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it), else `model`."""
    return model.get_base_model() if is_peft(model) else model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- optimisation ----------------------------------------------------------------------------


def build_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over trainable parameters; matrices decay, biases and norm weights (1-D) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise PallmError("no trainable parameters (everything is frozen).")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer, name: str, steps: int, warmup_ratio: float):
    """transformers' schedule `name` (cosine, linear, constant_with_warmup, ...) over `steps`
    optimizer steps, the first ceil(warmup_ratio * steps) of them warming up linearly."""
    from transformers import get_scheduler

    warmup = math.ceil(warmup_ratio * steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


# --- checkpoints -----------------------------------------------------------------------------


def _step_of(p: Path) -> int | None:
    if not p.name.startswith(STEP_PREFIX):
        return None
    try:
        return int(p.name[len(STEP_PREFIX):])
    except ValueError:
        return None


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints under `out/checkpoints`, oldest first. A folder is complete once
    its `trainer_state.json` exists (written last, then the folder is renamed into place)."""
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = _step_of(p)
        if step is not None and p.is_dir() and (p / TRAINER_STATE).exists():
            found.append((step, p))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


@contextlib.contextmanager
def quiet_save():
    """No per-save "Writing model shards" bars from transformers (one line per checkpoint)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_model(accelerator, model, processor, out_dir: str | os.PathLike, meta: dict[str, Any], merge_lora: bool = True) -> None:
    """*Collective.* The full model as a PALLM checkpoint (`save_checkpoint`, atomic) at `out_dir`.

    LoRA: `merge_lora=True` saves a merged copy of the weights (the live model is not changed)
    plus the adapter in `out_dir/adapter/`; `merge_lora=False` saves the adapter, processor and
    pallm.json only. Under FSDP/DeepSpeed the full state dict is gathered first.
    """
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        with quiet_save():
            _save_full(unwrapped, processor, Path(out_dir), meta, merge_lora, state_dict)
    accelerator.wait_for_everyone()


def _save_full(unwrapped, processor, out: Path, meta: dict[str, Any], merge_lora: bool, state_dict) -> None:
    if is_peft(unwrapped):
        _save_peft(unwrapped, processor, out, meta, merge_lora)
    elif state_dict is not None:
        # save_checkpoint calls model.save_pretrained(dir); feed it the gathered weights.
        unwrapped.save_pretrained = functools.partial(type(unwrapped).save_pretrained, unwrapped, state_dict=state_dict)
        try:
            save_checkpoint(unwrapped, processor, out, meta)
        finally:
            del unwrapped.save_pretrained
    else:
        save_checkpoint(unwrapped, processor, out, meta)


def _save_peft(peft_model, processor, out: Path, meta: dict[str, Any], merge: bool) -> None:
    if merge:
        import copy

        merged = copy.deepcopy(peft_model).merge_and_unload()
        save_checkpoint(merged, processor, out, {**meta, "lora": "merged"})
        del merged
    else:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        processor.save_pretrained(tmp)
        (tmp / PALLM_META_FILE).write_text(json.dumps({**meta, "lora": "adapter"}, indent=2, sort_keys=True) + "\n")
        peft_model.save_pretrained(tmp / "adapter")
        replace_dir(tmp, out)
        return
    peft_model.save_pretrained(out / "adapter")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_training_checkpoint(
    accelerator,
    model,
    processor,
    out: str | os.PathLike,
    step: int,
    meta: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path | None:
    """*Collective.* `out/checkpoints/step-N/`: the model (from_pretrained folder, LoRA: adapter),
    `trainer/` (accelerate's save_state: model, optimizer, scheduler, per-rank RNG states) and
    `trainer_state.json` (step, data position, ...). Built in a hidden folder and renamed into
    place, so an interrupted save is never mistaken for a checkpoint. Keeps the newest `keep`."""
    root = Path(out) / CHECKPOINTS_DIR
    final = root / f"{STEP_PREFIX}{step}"
    tmp = root / f".{STEP_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_model(accelerator, model, processor, tmp, meta, merge_lora=False)
    accelerator.save_state(str(tmp / ACCELERATE_STATE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(tmp / TRAINER_STATE, {**trainer_state, "step": step, "saved_at": time.time()})
        replace_dir(tmp, final)
        if keep:
            for _, p in list_checkpoints(out)[:-keep]:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The `trainer_state.json` of a step checkpoint."""
    path = Path(path)
    try:
        return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PallmError(f"{path}: unreadable {TRAINER_STATE} ({e}); delete this checkpoint folder to resume from an older one.") from None


def load_training_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """*Collective.* Restore model, optimizer, scheduler and RNG states saved by
    `save_training_checkpoint` into the prepared objects; returns its trainer_state."""
    path = Path(path)
    state = read_trainer_state(path)
    try:
        accelerator.load_state(str(path / ACCELERATE_STATE))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PallmError(f"{path}: cannot resume from this checkpoint ({msg}). It was made with a different model, "
                         "LoRA setting or number of processes; use another --out to start afresh.") from None
    return state


def publish_final(accelerator, model, processor, out: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """*Collective.* Save the final model into the run folder `out` itself, next to its
    `checkpoints/`, `logs/` and `train_log.jsonl` (which `save_checkpoint(..., out)` would replace
    wholesale). The checkpoint is written complete into a hidden subfolder, its files are renamed
    into `out` one by one, and `pallm.json` goes last: a run folder with `pallm.json` is always a
    complete, finished checkpoint."""
    out = Path(out)
    tmp = out / ".final.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_model(accelerator, model, processor, tmp, meta, merge_lora=True)
    if accelerator.is_main_process:
        _move_into(tmp, out)
    accelerator.wait_for_everyone()
    return out


def _move_into(src: Path, out: Path) -> None:
    """Rename a complete checkpoint folder's files into the run folder, `pallm.json` last."""
    for f in sorted(src.iterdir()):
        if f.name == PALLM_META_FILE:
            continue
        dst = out / f.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(f, dst)
    os.replace(src / PALLM_META_FILE, out / PALLM_META_FILE)
    shutil.rmtree(src, ignore_errors=True)


class BestModelFields(BaseModel):
    """Which model the SFT and GRPO runs publish: the last step, the best on dev (transformers'
    names), or the weight average of the last few step checkpoints."""

    model_config = ConfigDict(extra="forbid")
    # Publish the model that scored best on the dev rows instead of the last step (needs eval_every).
    load_best_model_at_end: bool = False
    metric_for_best_model: DevMetric = "ua"
    greater_is_better: bool | None = Field(None, description="null: true, except for follows_words_rate")
    # Publish the uniform weight average of the last N step checkpoints (the final step is saved as
    # one) instead of the last step; 1 = the last step. Why: RL oscillates between checkpoints
    # (docs/stage2_experiments.md, eleventh look); their average is steadier than any one of them.
    average_last_checkpoints: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _needs_eval(self):
        if self.load_best_model_at_end and not getattr(self, "eval_every", 0):
            raise ValueError("load_best_model_at_end needs a dev evaluation: set eval_every > 0")
        n = self.average_last_checkpoints
        if n > 1:
            if self.load_best_model_at_end:
                raise ValueError("average_last_checkpoints and load_best_model_at_end both choose the published model: set one")
            if not getattr(self, "save_every", 0) or getattr(self, "keep_checkpoints", 0) < n:
                raise ValueError(f"average_last_checkpoints={n} averages kept step checkpoints: set save_every > 0 "
                                 f"and keep_checkpoints >= {n}")
            if getattr(self, "lora").enabled:
                raise ValueError("average_last_checkpoints does not average LoRA adapters yet (their checkpoints hold the "
                                 "adapter only); set it to 1 with lora.enabled")
            try:
                self.check_average()
            except PallmError as e:
                raise ValueError(str(e)) from None
        return self

    def check_average(self) -> None:
        """Refuse, before training, a run too short to write the checkpoints it is to average (also
        for configs derived with `model_copy`, which skips validation: the trainers call this)."""
        n, every, steps = self.average_last_checkpoints, getattr(self, "save_every", 0), getattr(self, "steps")
        if n > 1:
            written = steps // every + (steps % every != 0) if every else 0
            if written < n:
                raise PallmError(f"average_last_checkpoints={n}: a run of {steps} steps with save_every={every} writes "
                                 f"{written} step checkpoint(s); lower save_every or average_last_checkpoints.")

    def saves_step(self, step: int) -> bool:
        """Whether the run writes a step checkpoint at `step` (every save_every steps, and the
        final step when averaging)."""
        every = getattr(self, "save_every", 0)
        return bool(every) and (step % every == 0 or (self.average_last_checkpoints > 1 and step == getattr(self, "steps")))

    @property
    def best_is_greater(self) -> bool:
        return self.metric_for_best_model != "follows_words_rate" if self.greater_is_better is None else self.greater_is_better

    def best_model_tracker(self, out: Path, resume_step: int | None) -> BestModel | None:
        if not self.load_best_model_at_end:
            return None
        return BestModel(out, self.metric_for_best_model, self.best_is_greater, getattr(self, "steps"), resume_step)


class BestModel:
    """Transformers' `load_best_model_at_end` / `metric_for_best_model` / `greater_is_better`.

    After each dev evaluation the model that scored best so far is kept, one copy, in `out/best/`;
    at the end it is published in place of the last step. Why: at a constant learning rate RL
    moves a lot between evaluations (dev UA by up to 27 points 50 steps apart), so the last
    iterate is a noisy draw, and the dev speakers are in neither train nor test.
    """

    def __init__(self, out: Path, metric: str, greater_is_better: bool, final_step: int, resume_step: int | None = None):
        self.dir = Path(out) / BEST_MODEL_DIR
        self.metric, self.sign, self.final_step = metric, (1.0 if greater_is_better else -1.0), final_step
        self.step: int | None = None
        self.value: float | None = None
        saved = self.dir / PALLM_META_FILE
        if resume_step is not None and saved.exists():
            # A best saved after the checkpoint we resume from is found again: the resumed run is exact.
            rec = json.loads(saved.read_text(encoding="utf-8")).get("best_model") or {}
            if rec.get("metric") == metric and rec.get("step") is not None and rec["step"] <= resume_step:
                self.step, self.value = int(rec["step"]), float(rec["value"])

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "metric": self.metric, "value": self.value}

    def update(self, accelerator, model, processor, meta: dict[str, Any], rec: dict[str, Any] | None) -> bool:
        """*Collective.* `rec`: the dev record on the main process (None elsewhere). Keeps the model
        if it beats the best so far; returns whether it did."""
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [rec]
            broadcast_object_list(box)
            rec = box[0]
        if rec is None:
            return False
        if rec.get(self.metric) is None:
            have = ", ".join(k for k, v in rec.items() if k != "step" and v is not None)
            raise PallmError(f"metric_for_best_model={self.metric!r} is not measured on this dev set (it has: {have}); "
                             "ua_congruent / ua_conflict need a manifest with a `congruent` field, "
                             "worst_emotion_accuracy one with an `emotion` field.")
        value = float(rec[self.metric])
        if self.value is not None and self.sign * value <= self.sign * self.value:
            return False  # ties keep the earlier model, as transformers does
        self.step, self.value = int(rec["step"]), value
        if self.step != self.final_step:  # the last step is published anyway
            save_model(accelerator, model, processor, self.dir, {**meta, "step": self.step, "best_model": self.record()})
        return True

    def publish(self, accelerator, model, processor, out: Path, meta: dict[str, Any]) -> Path:
        """*Collective.* Publish the best model into `out` (the live model if the last step was
        best, or no evaluation ran), then drop `out/best/`."""
        if self.step is None or self.step == self.final_step:
            publish_final(accelerator, model, processor, out, meta)
        elif accelerator.is_main_process:
            kept = json.loads((self.dir / PALLM_META_FILE).read_text(encoding="utf-8"))
            (self.dir / PALLM_META_FILE).write_text(json.dumps({**kept, "summary": meta.get("summary")}, indent=2, sort_keys=True) + "\n",
                                                    encoding="utf-8")
            _move_into(self.dir, out)
        if accelerator.is_main_process:
            shutil.rmtree(self.dir, ignore_errors=True)
        accelerator.wait_for_everyone()
        return out


# --- logging ---------------------------------------------------------------------------------


class RunLogger:
    """Scalars to TensorBoard (`out/logs/`) and one JSON object per line to `out/train_log.jsonl`.

    Inactive (no files) unless `enabled` (pass `accelerator.is_main_process`). Resuming at step
    N drops the log lines and TensorBoard events after N, written by the interrupted run."""

    def __init__(self, out: str | os.PathLike, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out) / TRAIN_LOG
        self.writer = None
        if not enabled:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            _write_lines_atomic(self.path, kept)
        elif not resume_step and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out) / LOGS_DIR), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **scalars}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_lines_atomic(path: Path, lines: Sequence[str]) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    os.replace(tmp, path)


# --- run folder (shared by both stages) ------------------------------------------------------

SUMMARY_FILE = "train_summary.json"
# What a finished run leaves in its folder (removed by overwrite=True; nothing else is touched).
RUN_FILES = (PALLM_META_FILE, SUMMARY_FILE, TRAIN_LOG, "config.json", "generation_config.json", "model.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "processor_config.json", "preprocessor_config.json")
RUN_DIRS = (CHECKPOINTS_DIR, LOGS_DIR, BEST_MODEL_DIR, "adapter", ".final.tmp")


def clear_run(out: Path) -> None:
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for f in out.glob("model-*-of-*.safetensors"):
        f.unlink()


def check_resume(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    old = saved.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    if diff:
        raise PallmError(
            f"{path}: this checkpoint was made with different {', '.join(diff)}; resuming would not continue the "
            "same run. Use the same settings, or another --out (or overwrite) to start afresh."
        )


def dev_record(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    subsets = metrics["subsets"]
    rec: dict[str, Any] = {"step": step, "ua": subsets["all"]["ua"], "parse_rate": subsets["all"]["parse_rate"]}
    for name in ("congruent", "conflict"):
        if name in subsets:
            rec[f"ua_{name}"] = subsets[name]["ua"]
    fw = metrics.get("follows_words_rate")
    if isinstance(fw, dict):
        rec["follows_words_rate"] = fw["rate"]
    # The voice emotion whose clips are answered worst. UA can rise while one raised voice
    # (angry read as positive) collapses; this is the number that sees it.
    per_emotion = {k.removeprefix("emotion:"): v["accuracy"] for k, v in subsets.items() if k.startswith("emotion:")}
    if per_emotion:
        rec["worst_emotion_accuracy"] = min(per_emotion.values())
        rec.update({f"accuracy/{e}": v for e, v in per_emotion.items()})
    return rec


def read_dev_curve(out: Path, upto: int) -> list[dict[str, Any]]:
    path = out / TRAIN_LOG
    if not path.exists():
        return []
    curve = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("kind") == "dev" and rec["step"] <= upto:
                curve.append({k: v for k, v in rec.items() if k not in ("kind", "time")})
    return curve


def publish_average(accelerator, out: Path, meta: dict[str, Any], ckpts: Sequence[tuple[int, Path]]) -> Path:
    """*Collective.* Publish into the run folder `out` the uniform weight average of the step
    checkpoints `ckpts` (`checkpoints_to_average`), `pallm.json` last as `publish_final` does."""
    if accelerator.is_main_process:
        tmp = out / ".final.tmp"
        steps = [s for s, _ in ckpts]
        average_checkpoints([p for _, p in ckpts], tmp, {**meta, "step": steps[-1], "averaged_steps": steps})
        _move_into(tmp, out)
    accelerator.wait_for_everyone()
    return out


def checkpoints_to_average(out: Path, n: int, final_step: int) -> list[tuple[int, Path]]:
    """The last `n` kept step checkpoints (step, folder) of the run in `out`, which must end at `final_step`."""
    ckpts = list_checkpoints(out)[-n:]
    steps = [s for s, _ in ckpts]
    if len(steps) < n or steps[-1] != final_step:
        raise PallmError(f"{out / CHECKPOINTS_DIR}: average_last_checkpoints={n} needs the last {n} step checkpoints "
                         f"up to step {final_step}, found steps {steps}; raise keep_checkpoints, or set "
                         "average_last_checkpoints=1 to publish the last step.")
    return ckpts


def finish_run(accelerator, model, processor, out: Path, meta: dict[str, Any], summary: dict[str, Any],
               meta_exclude: Sequence[str] = ("dev_curve",), best: BestModel | None = None,
               average_last: int = 1) -> dict[str, Any]:
    """Write `train_summary.json`, then publish the final model (with `best`, the best on dev;
    with `average_last` > 1, the average of the last that many step checkpoints) with the summary
    in pallm.json."""
    if best is not None:
        summary["best_model"] = best.record() if best.step is not None else None
    ckpts = checkpoints_to_average(out, average_last, summary["steps"]) if average_last > 1 else None
    if ckpts is not None:
        summary["averaged_steps"] = [s for s, _ in ckpts]
    meta["summary"] = {k: v for k, v in summary.items() if k not in meta_exclude}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if best is not None:
        best.publish(accelerator, model, processor, out, meta)
    elif ckpts is not None:
        publish_average(accelerator, out, meta, ckpts)
    else:
        publish_final(accelerator, model, processor, out, meta)
    summary["out"] = str(out)
    return summary

