"""`pallm export --merge`: LoRA checkpoints (base + adapter) become full checkpoints with the same outputs.

A tiny ParaSynth (40 utterances, rendered once per module), LoRA SFT runs of 2 steps (as in
tests/test_sft.py: 2 s audio window, one thread), one from a saved tiny base (`init`), one from the
tiny default's random init (rebuilt by export from the run's corpus and seed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pallm.cli.main import app
from pallm.data.audio import load_audio
from pallm.data.manifest import read_manifest
from pallm.errors import PallmError
from pallm.model import ModelSpec, build_tiny, encode_batch, load_pretrained, read_pallm_meta, save_checkpoint
from pallm.prompts.format import PromptConfig, build_prompt
from pallm.train import SFTConfig, tokenizer_texts, train_sft
from pallm.train.common import list_checkpoints
from pallm.train.export import TINY_BASE, merge_lora, resolve_base

from helpers import synth_corpus_random_cues

SPEC = ModelSpec(max_audio_seconds=2)
LORA = {"enabled": True, "r": 4, "dropout": 0.1}
runner = CliRunner()


def small(**kw) -> SFTConfig:
    base = dict(steps=2, batch_size=2, lr=3e-2, warmup_ratio=0.0, log_every=1, save_every=1, eval_every=0, threads=1,
                lora=LORA)
    return SFTConfig(**{**base, **kw})


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth_corpus_random_cues(tmp_path_factory.mktemp("ps") / "ps40", n=40, workers=1)


@pytest.fixture(scope="module")
def base_dir(corpus, tmp_path_factory) -> Path:
    """A tiny full checkpoint on disk: the base the LoRA run starts from (`init`)."""
    rows = [r for r in read_manifest(corpus) if r.split == "train"]
    model, processor = build_tiny(tokenizer_texts(rows, PromptConfig()), SPEC)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("base") / "tiny", {"stage": "base"})


@pytest.fixture(scope="module")
def lora_run(corpus, base_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "sft"
    train_sft(small(), SPEC, PromptConfig(), corpus, out, init=base_dir)
    return out


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory) -> Path:
    """LoRA on the tiny default: its base (a random init) exists nowhere on disk."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    train_sft(small(save_every=2), SPEC, PromptConfig(), corpus, out)
    return out


@pytest.fixture(scope="module")
def batch(corpus, base_dir):
    """One batch of real clips with prompts and completions."""
    rows = [r for r in read_manifest(corpus) if r.split == "test"][:3]
    _, processor = load_pretrained(base_dir)
    return encode_batch(processor, [load_audio(r.audio) for r in rows], [build_prompt("classify", r, PromptConfig()) for r in rows],
                        ["<think>the voice sounds calm.</think><answer>neutral</answer>"] * 3)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_merged_logits_equal_the_adapter_model(lora_run, base_dir, batch, tmp_path):
    from peft import PeftModel

    step1 = dict(list_checkpoints(lora_run))[1]  # adapter only: no weights in the folder
    assert read_pallm_meta(step1)["lora"] == "adapter" and not (step1 / "model.safetensors").exists()
    res = merge_lora(step1, tmp_path / "merged")
    assert res["base"] == str(base_dir.resolve())

    adapter_model = PeftModel.from_pretrained(load_pretrained(base_dir)[0], str(step1 / "adapter")).eval()
    merged, _ = load_pretrained(tmp_path / "merged")
    base, _ = load_pretrained(base_dir)
    want = logits(adapter_model, batch)
    assert torch.allclose(logits(merged, batch), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base, batch), want, atol=1e-3)  # the adapter really changed something

    meta = read_pallm_meta(tmp_path / "merged")
    assert meta["lora"] == "merged" and meta["stage"] == "sft" and meta["step"] == 1
    assert meta["merged_from"]["adapter"] == str((step1 / "adapter").resolve())
    assert meta["labels"] == read_pallm_meta(step1)["labels"] and meta["task_format"] == read_pallm_meta(step1)["task_format"]
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in f.keys())


def test_export_of_the_finished_run_equals_its_own_merge(lora_run, tmp_path):
    """The run folder is already merged (plus adapter/); re-merging base + adapter gives the same weights."""
    merge_lora(lora_run, tmp_path / "again")
    a, b = load_pretrained(lora_run)[0].state_dict(), load_pretrained(tmp_path / "again")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_default_base_is_rebuilt_exactly(tiny_run, tmp_path):
    """No base on disk (the tiny default's random init): export rebuilds it from corpus + seed + spec."""
    out = tiny_run
    step2 = dict(list_checkpoints(out))[2]
    meta = read_pallm_meta(step2)
    assert resolve_base(meta, {}) == TINY_BASE
    merge_lora(step2, tmp_path / "m")
    a, b = load_pretrained(out)[0].state_dict(), load_pretrained(tmp_path / "m")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # train_sft's own merge of the same (final) adapter

    moved = tmp_path / "moved"
    shutil.copytree(step2, moved)
    meta["corpus"] = str(tmp_path / "gone")
    (moved / "pallm.json").write_text(json.dumps(meta))
    with pytest.raises(PallmError, match="not there any more.*--base"):
        merge_lora(moved, tmp_path / "m2")


def test_cli_export_loads_in_eval(lora_run, corpus, tmp_path):
    step2 = dict(list_checkpoints(lora_run))[2]
    r = cli("export", "--merge", "--model", step2, "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "merged" in r.output and (tmp_path / "m" / "pallm.json").exists()
    r = cli("eval", "--model", tmp_path / "m", "--data", corpus, "--limit", "2", "--no-probes", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["subsets"]["all"]["n"] == 2

    r = cli("export", "--merge", "--model", step2, "--out", tmp_path / "m")  # exists
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    r = cli("export", "--merge", "--model", step2, "--out", tmp_path / "m", "--overwrite")
    assert r.exit_code == 0, r.output


def test_cli_errors_are_one_line(lora_run, base_dir, tmp_path):
    r = cli("export", "--help")
    assert r.exit_code == 0 and "Usage" in r.output and "--merge" in r.output
    step2 = dict(list_checkpoints(lora_run))[2]
    cases = [
        (["--model", step2, "--out", tmp_path / "a"], "pass --merge"),  # no --merge
        (["--merge", "--model", base_dir, "--out", tmp_path / "b"], "no LoRA adapter"),  # a full checkpoint
        (["--merge", "--model", tmp_path / "nowhere", "--out", tmp_path / "c"], "no such checkpoint folder"),
        (["--merge", "--model", step2, "--out", step2 / "inside"], "outside --model"),
    ]
    for args, message in cases:
        r = cli("export", *args)
        assert r.exit_code == 2, r.output
        assert message in r.output and "Traceback" not in r.output
    r = cli("eval", "--model", step2, "--data", tmp_path)  # an adapter-only checkpoint points to export
    assert r.exit_code == 2 and "pallm export --merge" in r.output and "Traceback" not in r.output


def test_bare_adapter_folders(lora_run, tiny_run, base_dir, corpus, tmp_path):
    """A PEFT folder on its own: the base named in adapter_config.json, else --base, which must fit."""
    bare = tmp_path / "bare"
    shutil.copytree(lora_run / "adapter", bare)  # PEFT recorded the base folder it was loaded from
    r = cli("export", "--merge", "--model", bare, "--out", tmp_path / "ok")
    assert r.exit_code == 0, r.output
    a, b = load_pretrained(lora_run)[0].state_dict(), load_pretrained(tmp_path / "ok")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    nameless = tmp_path / "nameless"
    shutil.copytree(tiny_run / "adapter", nameless)  # the tiny default's base has no name
    r = cli("export", "--merge", "--model", nameless, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "pass --base" in r.output and "Traceback" not in r.output

    rows = [r for r in read_manifest(corpus) if r.split == "train"]
    other = save_checkpoint(*build_tiny(tokenizer_texts(rows, PromptConfig()), ModelSpec(max_audio_seconds=2,
                                                                                             tiny={"text_hidden": 64})),
                            tmp_path / "other", {})
    r = cli("export", "--merge", "--model", nameless, "--base", other, "--out", tmp_path / "y")
    assert r.exit_code == 2 and "does not fit" in r.output and "Traceback" not in r.output
