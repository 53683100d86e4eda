"""vLLM rollouts for GRPO: a colocated vLLM engine per training process (TRL's "colocate" mode).

    grpo:
      use_vllm: true                    # TRL's names
      vllm_gpu_memory_utilization: 0.3  # share of each GPU the engine (weights + KV cache) may take
      vllm_max_model_length: null       # context of the engine; null = the model's

`VLLMBackend` implements `pallm.train.rollout.RolloutBackend`. vLLM is imported lazily: this module
imports on any machine, and everything but the engine itself is a pure function, tested without
vLLM (tests/test_rollout_vllm.py uses a fake `vllm` module):

- `build_requests`: (audios, prompts) -> vLLM prompts, `{"prompt": chat-templated text with one
  audio placeholder per clip, "multi_modal_data": {"audio": [(samples, rate), ...]}}` (two clips
  with `prompt.speaker_reference`: the speaker's reference, then the clip). vLLM's Qwen2-Audio
  processor expands the placeholder from the clip's length, as the transformers processor does for
  the scorer; clips are cut/padded by `prepare_audio` exactly as `encode_batch` does, so both see
  the same audio.
- `sampling_kwargs`: SamplingParams with n = G, the policy's temperature/top_p, no top-k /
  min-p / repetition penalty, the end-of-turn stop ids, and logit_bias -100 on the audio
  placeholders (and on output rows beyond the tokenizer), as `HFBackend` suppresses them.
- `outputs_to_ids`: RequestOutputs -> `len(prompts) * G` id rows grouped per prompt, cut after the
  first stop token (the stop token kept).
- `iter_vllm_weights`: the policy's weights under the names `save_pretrained` gives them (the
  on-disk layout vLLM loads), LoRA merged in on the fly (W + ΔW; the live model is not touched), PEFT wrappers
  removed. `sync_weights` pushes them with `load_weights` on the engine's model and resets the
  prefix cache, as TRL's colocate mode does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pallm.errors import PallmError
from pallm.model.batch import banned_token_ids, clips_of, prepare_audio
from pallm.model.families import family_of
from pallm.train.common import base_model, is_peft
from pallm.train.rollout import cut_at_stop, stop_token_ids

BANNED_LOGIT_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100] (OpenAI's range): e^-100 ~ never sampled
# Fallback when transformers cannot tell (no `revert_weight_conversion`): transformers 5 module
# names -> the checkpoint layout it writes (and vLLM loads) for Qwen2-Audio.
CHECKPOINT_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# Where TRL's colocate mode finds the engine's torch model (vLLM >= 0.10); the second path is older.
ENGINE_MODEL_PATHS = ("llm_engine.model_executor.driver_worker.model_runner.model",
                      "llm_engine.model_executor.driver_worker.worker.model_runner.model")


def require_vllm():
    """`import vllm`, or a one-line PallmError saying what to install; vLLM also needs a CUDA GPU."""
    try:
        import vllm
    except ImportError:
        raise PallmError("grpo.use_vllm=true needs vLLM, which is not installed: `pip install vllm` (Linux, NVIDIA GPU, "
                         "a build matching your torch), or set grpo.use_vllm=false to sample with the training model.") from None
    except Exception as e:  # noqa: BLE001 - a broken install raises all sorts
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PallmError(f"grpo.use_vllm=true: vLLM is installed but does not import ({msg}); reinstall a vLLM build "
                         "matching your torch and CUDA, or set grpo.use_vllm=false.") from None
    if not torch.cuda.is_available():
        raise PallmError("grpo.use_vllm=true needs a CUDA GPU and none is visible here; run on a GPU node or set "
                         "grpo.use_vllm=false to sample with the training model (HFBackend).")
    return vllm


# --- pure pieces ------------------------------------------------------------------------------


def build_requests(processor, audios: Sequence[np.ndarray | tuple[np.ndarray, ...]], prompts: Sequence[str], *,
                   system: str | None = None, max_audio_seconds: float | None = None) -> list[dict[str, Any]]:
    """vLLM prompts for (clip, prompt) pairs: the family's chat template (one audio placeholder per
    clip, `system` or the template's default system turn, the assistant turn opened) and the clips
    with their sample rate, prepared as `encode_batch` prepares them. An entry of `audios` is a clip
    or a tuple of clips (speaker reference, clip), as in `encode_batch`."""
    family = family_of(processor)
    if len(audios) != len(prompts):
        raise PallmError(f"build_requests: {len(audios)} audios for {len(prompts)} prompts; they must match one to one.")
    for p in prompts:
        if any(t in p for t in family.audio_tokens):
            raise PallmError(f"prompt contains an audio special token ({', '.join(family.audio_tokens)}): {p[:80]!r}")
    sr = int(processor.feature_extractor.sampling_rate)
    out = []
    for a, p in zip(audios, prompts):
        wavs = prepare_audio(processor, clips_of(a), max_audio_seconds)
        text = processor.apply_chat_template(family.messages(p, system, len(wavs)), tokenize=False, add_generation_prompt=True)
        out.append({"prompt": text, "multi_modal_data": {"audio": [(w, sr) for w in wavs]}})
    return out


def sampling_kwargs(num_generations: int, temperature: float, top_p: float, max_new_tokens: int,
                    stop_ids: Sequence[int], banned_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams`: exactly the policy (G samples at `temperature`,
    nucleus `top_p`, nothing else), the stop ids, and the banned ids pushed to -100."""
    if temperature <= 0:
        raise PallmError(f"temperature must be > 0 for GRPO sampling, got {temperature}.")
    return {
        "n": int(num_generations),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": -1,  # off (vLLM >= 0.9 prefers 0 but accepts -1; older versions need -1)
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": int(max_new_tokens),
        "stop_token_ids": [int(t) for t in stop_ids],
        "logit_bias": {int(t): BANNED_LOGIT_BIAS for t in banned_ids},
        "detokenize": False,  # the trainer decodes the ids itself
    }


def outputs_to_ids(outputs: Sequence[Any], num_generations: int, stop: Sequence[int]) -> list[list[int]]:
    """vLLM `RequestOutput`s (one per prompt, in prompt order) -> `len(outputs) * G` rows of ids
    grouped per prompt ([p0s0 .. p0s(G-1), p1s0 ..]), each cut after its first stop token."""
    rows: list[list[int]] = []
    for i, out in enumerate(outputs):
        comps = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(comps) != num_generations:
            raise PallmError(f"vLLM returned {len(comps)} completions for prompt {i}, expected {num_generations} (n).")
        for c in comps:
            ids = [int(t) for t in c.token_ids]
            reason = getattr(c, "stop_reason", None)
            # vLLM keeps the stop token in token_ids; restore it if a version ever drops it, since
            # the model must be trained to emit it.
            if (getattr(c, "finish_reason", None) == "stop" and isinstance(reason, int) and reason in stop
                    and (not ids or ids[-1] != reason)):
                ids.append(reason)
            rows.append(ids)
    return cut_at_stop(rows, stop)


def checkpoint_name(name: str) -> str:
    """A Qwen2-Audio parameter name of the live (transformers 5) model -> its name in the saved
    checkpoint, by fixed prefixes (the fallback of `checkpoint_names`)."""
    for new, old in CHECKPOINT_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def checkpoint_names(model, names: Sequence[str]) -> dict[str, str]:
    """Live parameter names -> the names `save_pretrained` writes (the layout vLLM loads), by
    transformers' own save-time renaming (`revert_weight_conversion`, transformers 5) run on empty
    stand-in tensors; the fixed Qwen2-Audio prefixes when that is unavailable or not a renaming."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        probe = {n: torch.empty(0) for n in names}
        try:
            out = revert_weight_conversion(model, dict(probe))
        except Exception:  # noqa: BLE001 - any failure: use the fallback
            out = None
        by_id = {id(t): n for n, t in probe.items()}
        if out is not None and len(out) == len(probe) and all(id(t) in by_id for t in out.values()):
            return {by_id[id(t)]: new for new, t in out.items()}
    return {n: checkpoint_name(n) for n in names}


def _lora_delta(module) -> torch.Tensor | None:
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None  # already in the base weight / adapters off
    deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in getattr(module, "lora_A", {})]
    return sum(deltas) if deltas else None


def iter_vllm_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every parameter, LoRA merged in on the fly. PEFT names lose
    `base_model.model.` and `.base_layer`, `lora_*` tensors and `original_module` copies are
    skipped and `modules_to_save.<adapter>.` is dropped (TRL's `_sync_*_params_to_vllm` does the
    same renaming); unlike TRL's merge_adapter/unmerge_adapter, the live weights are never changed."""
    model = getattr(model, "module", model)
    peft = is_peft(model)
    modules = dict(model.named_modules()) if peft else {}
    adapter = getattr(model, "active_adapter", "default") if peft else None
    params = []  # (live name without PEFT wrapping, PEFT name, parameter)
    for name, p in model.named_parameters():
        plain = name
        if peft:
            if "lora_" in name or ".original_module." in name:
                continue
            plain = (name.removeprefix("base_model.model.").replace(".base_layer", "")
                     .replace(f".modules_to_save.{adapter}.", "."))
        params.append((plain, name, p))
    saved = checkpoint_names(base_model(model), [plain for plain, _, _ in params])
    for plain, name, p in params:  # one tensor at a time: merged LoRA weights are never all in memory
        t = p.detach()
        if peft and name.endswith(".base_layer.weight"):
            delta = _lora_delta(modules[name.rsplit(".base_layer.", 1)[0]])
            if delta is not None:
                t = t + delta.to(t.dtype)
        yield saved[plain], t


def engine_kwargs(model_path: str, *, gpu_memory_utilization: float = 0.3, max_model_length: int | None = None,
                  seed: int = 0, audios_per_prompt: int = 1) -> dict[str, Any]:
    """`vllm.LLM(...)` arguments for an engine colocated with one training process (as TRL's
    colocate mode: one engine per rank, in-process, no tensor parallelism)."""
    return {
        "model": str(model_path),
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "max_model_len": max_model_length,
        "distributed_executor_backend": "external_launcher",
        "seed": int(seed),
        "limit_mm_per_prompt": {"audio": int(audios_per_prompt)},  # 2 with prompt.speaker_reference
        "enable_prefix_caching": True,  # n = G samples share the prompt's KV cache
        "max_num_batched_tokens": 4096,
    }


# --- the backend ------------------------------------------------------------------------------


class VLLMBackend:
    """G completions per prompt from a vLLM engine loaded from `model_path` (the GRPO init
    checkpoint) and kept in sync with the trained policy by `sync_weights`."""

    def __init__(self, model_path: str | os.PathLike, processor, *, system: str | None = None,
                 max_audio_seconds: float | None = None, banned_ids: Sequence[int] | None = None,
                 gpu_memory_utilization: float = 0.3, max_model_length: int | None = None, seed: int = 0,
                 audios_per_prompt: int = 1, llm=None, **llm_kwargs):
        vllm = require_vllm()
        self.processor, self.system, self.max_audio_seconds = processor, system, max_audio_seconds
        self._sampling_params = vllm.SamplingParams
        self._stop = stop_token_ids(processor)
        if banned_ids is None:
            tok = processor.tokenizer
            banned_ids = tok.convert_tokens_to_ids(list(family_of(processor).banned_tokens))
        self._banned = sorted({int(t) for t in banned_ids})
        if llm is None:
            kw = engine_kwargs(str(model_path), gpu_memory_utilization=gpu_memory_utilization,
                               max_model_length=max_model_length, seed=seed, audios_per_prompt=audios_per_prompt)
            llm = vllm.LLM(**{**kw, **llm_kwargs})
        self.llm = llm

    @classmethod
    def for_grpo(cls, cfg, init: str, policy, processor, accelerator, seed: int, audios_per_prompt: int = 1) -> VLLMBackend:
        """The backend `train_grpo` builds when `grpo.use_vllm` is true: vLLM must import and a GPU
        must be visible (else a one-line PallmError), `init` must be a checkpoint folder."""
        require_vllm()
        if not init or not Path(init).is_dir():
            raise PallmError(f"grpo.use_vllm=true loads the policy into vLLM from the --init checkpoint folder; got {init!r} "
                             "(an in-memory model). Pass a checkpoint folder as init.")
        # vLLM's external launcher joins the torch.distributed world the trainer runs in (as TRL sets it).
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return cls(init, processor, banned_ids=banned_token_ids(getattr(policy, "module", policy), processor),
                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, max_model_length=cfg.vllm_max_model_length,
                   seed=seed, audios_per_prompt=audios_per_prompt)

    def generate(self, audios, prompts, num_generations, temperature, top_p, max_new_tokens) -> list[list[int]]:
        if not prompts:
            return []
        params = self._sampling_params(**sampling_kwargs(num_generations, temperature, top_p, max_new_tokens,
                                                         self._stop, self._banned))
        requests = build_requests(self.processor, audios, prompts, system=self.system,
                                  max_audio_seconds=self.max_audio_seconds)
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return outputs_to_ids(outputs, num_generations, self._stop)

    def _engine_model(self):
        for path in ENGINE_MODEL_PATHS:
            obj = self.llm
            try:
                for attr in path.split("."):
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            return obj
        raise PallmError("this vLLM version exposes none of " + ", ".join(ENGINE_MODEL_PATHS) + " (where TRL's colocate "
                         "mode loads new weights); use a vLLM version that TRL supports.")

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        self._engine_model().load_weights(iter_vllm_weights(model))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights


__all__ = ["VLLMBackend", "build_requests", "checkpoint_name", "checkpoint_names", "engine_kwargs", "iter_vllm_weights",
           "outputs_to_ids", "require_vllm", "sampling_kwargs"]
