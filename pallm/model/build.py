"""Get a (model, processor) pair: a tiny random one for laptops/tests, or a real checkpoint; and
save one as a PALLM checkpoint (a plain `from_pretrained` folder + `pallm.json`)."""

from __future__ import annotations

import contextlib

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

import pallm
from pallm.errors import PallmError
from pallm.model.families import Family, family_for_model_type, family_of, get_family

PALLM_META_FILE = "pallm.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TinySize(BaseModel):
    """Sizes of the embedded tiny model (~1.3M parameters with the defaults)."""

    model_config = ConfigDict(extra="forbid")
    vocab_size: int = 1024  # upper bound for the locally trained BPE
    num_mel_bins: int = 80
    audio_d_model: int = 128
    audio_layers: int = 2
    audio_heads: int = 4
    audio_ffn: int = 512
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_ffn: int = 512
    max_positions: int = 2048
    seed: int = 0


class ModelSpec(BaseModel):
    """Which model to use. `name_or_path=None` means the tiny model built from `tiny`."""

    model_config = ConfigDict(extra="forbid")
    family: str = "qwen2_audio"
    name_or_path: str | None = None
    tiny: TinySize = TinySize()
    # Tiny: the encoder window (whole seconds). Real checkpoints keep their own window (30 s for
    # Qwen2-Audio); pass this to encode_batch/generate to cap clips further.
    max_audio_seconds: float = 4.0
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"


def _torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else _DTYPES[name]


def build_tiny(tokenizer_texts: Iterable[str], spec: ModelSpec | None = None):
    """Random-init tiny model + a processor whose tokenizer is trained on `tokenizer_texts`."""
    spec = spec or ModelSpec()
    family = get_family(spec.family)
    if family.build_tiny is None:
        raise PallmError(f"family '{family.name}' has no tiny variant; set model.name_or_path to a checkpoint.")
    model, processor = family.build_tiny(list(tokenizer_texts), spec)
    if spec.dtype not in ("float32", "auto"):
        model = model.to(_DTYPES[spec.dtype])
    return model.eval(), processor


def load_model(spec: ModelSpec, tokenizer_texts: Iterable[str] | None = None, **from_pretrained_kwargs):
    """One entry point for configs: tiny when `spec.name_or_path` is None, else `load_pretrained`."""
    if spec.name_or_path is None:
        if tokenizer_texts is None:
            raise PallmError("the tiny model needs texts to train its tokenizer (pass the training targets).")
        return build_tiny(tokenizer_texts, spec)
    return load_pretrained(spec.name_or_path, spec, **from_pretrained_kwargs)


# --- loading ---------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _read_json(f: Path) -> dict[str, Any]:
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PallmError(f"{f}: unreadable ({_first_line(e)}); the checkpoint is damaged.") from None


def _check_local_checkpoint(path: Path) -> Family:
    """Fail early with a message that names what is missing, instead of a deep transformers error."""
    if not (path / "config.json").exists() and any((d / "adapter_config.json").exists() for d in (path, path / "adapter")):
        raise PallmError(f"{path}: is a LoRA adapter, not a full checkpoint. Merge it first: "
                         f"pallm export --merge --model {path} --out MERGED_DIR")
    if not (path / "config.json").exists():
        raise PallmError(f"{path}: not a model checkpoint (no config.json). Point to a folder written by save_checkpoint.")
    cfg = _read_json(path / "config.json")
    family = family_for_model_type(cfg.get("model_type"), str(path))

    index = next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (path / n).exists()), None)
    if index is not None:
        shards = set(_read_json(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            raise PallmError(f"{path}: incomplete checkpoint, missing weight shard(s): {', '.join(missing[:3])}.")
    elif not any((path / n).exists() for n in ("model.safetensors", "pytorch_model.bin")):
        raise PallmError(f"{path}: incomplete checkpoint, no model weights (model.safetensors).")

    if not ((path / "tokenizer.json").exists() or ((path / "vocab.json").exists() and (path / "merges.txt").exists())):
        raise PallmError(f"{path}: incomplete checkpoint, no tokenizer files (tokenizer.json).")
    if not (path / "preprocessor_config.json").exists() and "feature_extractor" not in _read_json(path / "processor_config.json"):
        # transformers 5 nests the feature extractor in processor_config.json; 4.x wrote its own file
        raise PallmError(f"{path}: incomplete checkpoint, no audio feature extractor (preprocessor_config.json, or processor_config.json with a feature_extractor).")
    return family


def load_pretrained(name_or_path: str | os.PathLike, spec: ModelSpec | None = None, **from_pretrained_kwargs):
    """`from_pretrained` for model and processor of a local folder or a hub id (e.g.
    `Qwen/Qwen2-Audio-7B-Instruct`). Extra kwargs (device_map, attn_implementation, ...) go to the
    model's `from_pretrained`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        family = _check_local_checkpoint(path)
        source = str(path)
    elif path.exists():
        raise PallmError(f"{path}: is a file; a checkpoint is a folder (config.json, model.safetensors, tokenizer).")
    elif _HUB_ID.match(str(name_or_path)) and not str(name_or_path).startswith("."):
        from transformers import AutoConfig

        try:  # config first: cheap, and tells us the family before any weights are fetched
            config = AutoConfig.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as e:
            raise PallmError(
                f"{name_or_path}: no such local folder, and it could not be loaded from the Hugging Face hub "
                f"({_first_line(e)}). Check the path, or download the checkpoint first."
            ) from None
        family = family_for_model_type(getattr(config, "model_type", None), str(name_or_path))
        source = str(name_or_path)
    else:
        raise PallmError(f"{path}: checkpoint folder not found.")

    if spec is not None and spec.family != family.name:
        raise PallmError(f"{name_or_path}: is a '{family.name}' checkpoint but model.family is '{spec.family}'.")
    try:
        # Without a spec, keep the checkpoint's own dtype (bf16 for the released Qwen models).
        dtype = _torch_dtype(spec.dtype) if spec is not None else "auto"
        with _quiet_loading(path.is_dir()):
            model = family.model_cls.from_pretrained(source, dtype=dtype, **from_pretrained_kwargs)
        processor = family.processor_from_pretrained(source)
    except (OSError, ValueError) as e:
        raise PallmError(f"{name_or_path}: failed to load ({_first_line(e)}).") from None
    return model.eval(), processor


@contextlib.contextmanager
def _quiet_loading(local: bool):
    """No per-tensor progress bar for local checkpoints (it floods logs during evaluation loops);
    downloads of real checkpoints keep theirs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if local and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and was:
            hf_logging.enable_progress_bar()


# --- saving ----------------------------------------------------------------------------------


def save_checkpoint(model, processor, out_dir: str | os.PathLike, pallm_meta: dict[str, Any]) -> Path:
    """Write a checkpoint loadable by `from_pretrained` (safetensors, tokenizer, processor, chat
    template, generation config) plus `pallm.json`.

    Written to a hidden sibling folder and renamed into place, so a crash never leaves a
    half-written `out_dir`; an existing `out_dir` is replaced only once the new one is complete.
    LoRA/PEFT models must be merged (`merge_and_unload()`) by the caller first.
    """
    out = Path(out_dir).expanduser().resolve()
    family = family_of(model)
    meta = {"pallm_version": pallm.__version__, "family": family.name, **pallm_meta}
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise PallmError(f"pallm_meta for {out} is not JSON-serialisable ({e}).") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)  # safetensors in transformers >= 4.35
        processor.save_pretrained(tmp)
        (tmp / PALLM_META_FILE).write_text(meta_text + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete folder `src` to `dst`, replacing `dst` if it exists."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)  # a directory cannot be renamed onto a non-empty one
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


WEIGHT_INDEX = "model.safetensors.index.json"


def _weight_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a checkpoint folder (sharded or not)."""
    if (path / WEIGHT_INDEX).exists():
        return dict(_read_json(path / WEIGHT_INDEX).get("weight_map", {}))
    if not (path / "model.safetensors").exists():
        raise PallmError(f"{path}: no safetensors weights (model.safetensors); re-save it with save_checkpoint to average it.")
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def average_checkpoints(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, pallm_meta: dict[str, Any]) -> Path:
    """Uniform average of the weights of checkpoints of one model (e.g. a run's last step
    checkpoints: RL oscillates between them, their average is steadier than any one), written as a
    checkpoint folder like `save_checkpoint`'s: the last source's config, processor and shard layout,
    every tensor replaced by its mean over the sources, `pallm.json` = the last source's + `pallm_meta`
    + `averaged_from`.

    Streams tensor by tensor (sum in float64, stored in the checkpoint's dtype), so a 7B model
    averages in the memory of one shard. Atomic as save_checkpoint: an existing `out_dir` is replaced
    only once the new one is complete. LoRA adapters are refused (merge them first).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    paths = [Path(p).expanduser() for p in sources]
    if not paths:
        raise PallmError("average_checkpoints: no checkpoints given.")
    maps = []
    for p in paths:
        if not p.is_dir():
            raise PallmError(f"{p}: checkpoint folder not found.")
        _check_local_checkpoint(p)
        maps.append(_weight_files(p))
    last, layout = paths[-1], maps[-1]
    for p, m in zip(paths, maps):
        if m.keys() != layout.keys():
            odd = sorted(m.keys() ^ layout.keys())[:3]
            raise PallmError(f"{p}: holds different tensors from {last} ({', '.join(odd)}); average checkpoints of one model only.")

    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    weights = set(layout.values())
    try:  # everything of the last source but its weights (rewritten below) and training state
        shutil.copytree(last, tmp, ignore=lambda d, names: [n for n in names if Path(d) == last and (
            n in weights or n in ("trainer", "trainer_state.json", "adapter"))])
        with contextlib.ExitStack() as stack:
            opened: dict[tuple[int, str], Any] = {}

            def handle(i: int, file: str):
                if (i, file) not in opened:
                    opened[(i, file)] = stack.enter_context(safe_open(paths[i] / file, framework="pt"))
                return opened[(i, file)]

            for file in sorted(set(layout.values())):
                names = [n for n, f in layout.items() if f == file]
                averaged = {}
                for name in names:
                    total = None
                    for i, m in enumerate(maps):
                        t = handle(i, m[name]).get_tensor(name)
                        if total is not None and t.shape != total.shape:
                            raise PallmError(f"{paths[i]}: tensor {name} has shape {tuple(t.shape)}, {paths[0]} "
                                             f"{tuple(total.shape)}; average checkpoints of one model only.")
                        total = t.double() if total is None else t.double() + total
                    averaged[name] = (total / len(paths)).to(t.dtype)  # the last source's dtype
                save_file(averaged, str(tmp / file), metadata={"format": "pt"})
        meta = {**read_pallm_meta(last), **pallm_meta, "averaged_from": [str(p) for p in paths]}
        (tmp / PALLM_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_pallm_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """`pallm.json` of a checkpoint ({} for a plain transformers folder, e.g. a hub model)."""
    return _read_json(Path(checkpoint_dir) / PALLM_META_FILE)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
