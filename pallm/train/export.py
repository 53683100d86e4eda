"""Merge a LoRA adapter into its base model: `pallm export --merge` (docs/training.md, "Exporting").

    from pallm.train.export import merge_lora
    merge_lora("runs/x/sft/checkpoints/step-200", "runs/x/sft-step200")   # -> a full checkpoint folder

What LoRA runs leave on disk (`pallm/train/common.py`):

- step checkpoints `out/checkpoints/step-N/`: processor files, `pallm.json` with `"lora": "adapter"`
  and the PEFT adapter in `adapter/` -- no model weights;
- the finished run folder `out/`: the merged full weights (`"lora": "merged"`) and the adapter
  alone in `out/adapter/`;
- a plain PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) from elsewhere.

`merge_lora` loads the base, applies the adapter, merges (`merge_and_unload`) and writes a normal
checkpoint with `save_checkpoint`, so `pallm eval`, `pallm chat`, `load_pretrained` and
`pallm train grpo --init` load it like any other. The base is, in this order: `base=` if given;
the checkpoint the run started from (`init` in pallm.json); the stage-1 model's
`model_spec.name_or_path`; for a stage-1 run on the tiny default, the tiny model's random
initialisation, rebuilt exactly as `train_sft` built it (same corpus, seed and spec; the rebuilt
tokenizer must equal the saved one); the adapter's own `base_model_name_or_path`. A folder with
no adapter is refused: it is already a full checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pallm.errors import PallmError
from pallm.model.build import PALLM_META_FILE, ModelSpec, build_tiny, load_pretrained, read_pallm_meta, save_checkpoint
from pallm.model.families import family_of, get_family

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
IN_MEMORY = "in-memory"  # `init` recorded by train_grpo for a (model, processor) pair
TINY_BASE = "<tiny>"  # resolve_base: the tiny default's random init, rebuilt from the run's corpus

Say = Callable[[str], None]


def find_adapter(model_dir: str | os.PathLike) -> Path | None:
    """The PEFT adapter folder of a PALLM checkpoint (`DIR/adapter/`) or a plain PEFT folder (`DIR`)."""
    d = Path(model_dir)
    for cand in (d / ADAPTER_DIR, d):
        if (cand / ADAPTER_CONFIG).is_file():
            return cand
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PallmError(f"{path}: unreadable ({str(e).splitlines()[0][:200]}).") from None


def resolve_base(meta: dict[str, Any], adapter_cfg: dict[str, Any], base: str | os.PathLike | None = None) -> str | None:
    """Where the adapter's base model comes from: a folder or hub id, `TINY_BASE` for the tiny
    default rebuilt from the run's corpus, or None when nothing says (pass `base=`)."""
    if base is not None:
        return str(base)
    init = meta.get("init")
    if init and init != IN_MEMORY:
        return str(init)
    spec = meta.get("model_spec") or {}
    if spec.get("name_or_path"):
        return str(spec["name_or_path"])
    if meta.get("stage") == "sft" and "model_spec" in meta and not init:
        return TINY_BASE
    return adapter_cfg.get("base_model_name_or_path") or None


def rebuild_tiny_base(meta: dict[str, Any], saved_processor=None):
    """The tiny model exactly as `train_sft` built it before LoRA was applied: tokenizer trained on
    the same training texts, weights from `tiny.seed`. Needs the run's corpus (pallm.json `corpus`)."""
    from pallm.data.manifest import manifest_path, read_manifest
    from pallm.prompts.format import PromptConfig
    from pallm.train.examples import select_train_rows, tokenizer_texts

    corpus = meta.get("corpus")
    if not corpus or not Path(corpus).exists():
        raise PallmError(f"the base is the tiny model's random initialisation, rebuilt from the run's corpus ({corpus}), "
                         "which is not there any more; pass --base with the model the run started from.")
    manifest = manifest_path(corpus)
    prompt_cfg = PromptConfig.model_validate(meta.get("task_format") or {})
    budget = (meta.get("train_config") or {}).get("label_budget")
    rows = select_train_rows(read_manifest(manifest), prompt_cfg, budget, int(meta.get("seed", 0)), where=str(manifest))
    model, processor = build_tiny(tokenizer_texts(rows, prompt_cfg, meta.get("labels")), ModelSpec.model_validate(meta["model_spec"]))
    if saved_processor is not None and processor.tokenizer.get_vocab() != saved_processor.tokenizer.get_vocab():
        raise PallmError(f"the tiny base rebuilt from {corpus} has a different tokenizer from the checkpoint's (the corpus "
                         "changed since training); pass --base with the model the run started from.")
    return model, processor


def _saved_processor(model_dir: Path, family):
    """The checkpoint's own processor when it has one (PALLM step checkpoints do), else None."""
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        return None
    try:
        if hasattr(family, "processor_from_pretrained"):
            return family.processor_from_pretrained(str(model_dir))
        cls = family.processor_cls[0] if isinstance(family.processor_cls, tuple) else family.processor_cls
        return cls.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PallmError(f"{model_dir}: unreadable processor files ({msg}).") from None


def merge_lora(model_dir: str | os.PathLike, out: str | os.PathLike, *, base: str | os.PathLike | None = None,
               overwrite: bool = False, say: Say | None = None) -> dict[str, Any]:
    """Base + the LoRA adapter of `model_dir`, merged, saved as a full checkpoint at `out`.

    Returns {"out", "base", "adapter", "parameters"}. Raises PallmError (one line) when `model_dir`
    has no adapter, `out` exists without `overwrite`, or the base cannot be found or does not fit.
    """
    say = say or (lambda _m: None)
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    if not model_dir.is_dir():
        raise PallmError(f"{model_dir}: no such checkpoint folder.")
    adapter = find_adapter(model_dir)
    if adapter is None:
        what = "a full checkpoint" if (model_dir / "config.json").exists() else "not a checkpoint"
        raise PallmError(f"{model_dir}: is {what} with no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_CONFIG}): nothing to merge. "
                         "A full checkpoint loads as it is (pallm eval --model DIR).")
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise PallmError(f"{out}: --out must be a new folder outside --model {model_dir}.")
    if out.exists() and not overwrite:
        raise PallmError(f"{out}: already exists. Choose another --out, or pass --overwrite to replace it.")

    meta = read_pallm_meta(model_dir) if (model_dir / PALLM_META_FILE).exists() else {}
    adapter_cfg = _read_json(adapter / ADAPTER_CONFIG)
    source = resolve_base(meta, adapter_cfg, base)
    if source is None:
        raise PallmError(f"{adapter}: nothing records which base model this adapter was trained on; pass --base "
                         "(the checkpoint folder or hub id the LoRA run started from).")

    if source == TINY_BASE:
        say(f"rebuilding the tiny base model from {meta.get('corpus')} (seed {meta.get('seed', 0)})")
        family = get_family((meta.get("model_spec") or {}).get("family", "qwen2_audio"))
        saved = _saved_processor(model_dir, family)
        model, processor = rebuild_tiny_base(meta, saved)
    else:
        say(f"loading base model {source}")
        model, processor = load_pretrained(source)
        saved = _saved_processor(model_dir, family_of(model))
        if not meta and Path(source).is_dir():
            meta = read_pallm_meta(source)
    if saved is not None:
        processor = saved

    say(f"merging adapter {adapter}")
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PallmError(f"{adapter}: does not fit the base model {source} ({msg}); pass --base with the model "
                         "the LoRA run started from.") from None
    merged = peft_model.merge_and_unload().eval()

    new_meta = {k: v for k, v in meta.items() if k not in ("pallm_version", "family")}
    new_meta.update({"lora": "merged", "merged_from": {"adapter": str(adapter.resolve()), "base": source}})
    from pallm.train.common import quiet_save

    with quiet_save():
        save_checkpoint(merged, processor, out, new_meta)
    say(f"wrote {out}")
    return {"out": str(out), "base": source, "adapter": str(adapter),
            "parameters": sum(p.numel() for p in merged.parameters())}


__all__ = ["TINY_BASE", "find_adapter", "merge_lora", "rebuild_tiny_base", "resolve_base"]
