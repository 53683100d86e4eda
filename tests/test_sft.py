"""Stage 1 (pallm.train): examples, task mixing, SFT runs, checkpoints, resume, refusals.

One tiny ParaSynth (80 utterances, rendered once per module) with cue bins set directly on the
rows (seeded, per id: measuring them is pallm.acoustics' job and has its own tests). The tiny
model hears 2 s windows so steps are fast and long clips exercise truncation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pallm.data.manifest import Row, read_manifest, write_manifest
from pallm.errors import PallmError
from pallm.model import ModelSpec, read_pallm_meta
from pallm.prompts.format import PromptConfig, build_prompt, build_target
from pallm.train import SFTConfig, build_examples, tokenizer_texts, train_sft
from pallm.train.common import AudioCache, list_checkpoints
from pallm.train.sft import select_train_rows

from helpers import synth_corpus_random_cues

SPEC = ModelSpec(max_audio_seconds=2)


def small(**kw) -> SFTConfig:
    base = dict(steps=8, batch_size=4, lr=3e-3, warmup_ratio=0.0, log_every=1, save_every=0, eval_every=0, threads=1)
    return SFTConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth_corpus_random_cues(tmp_path_factory.mktemp("ps") / "ps80", n=80, workers=2)


@pytest.fixture(scope="module")
def no_cues(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nocues")
    rows = [r.model_copy(update={"cues": None}) for r in read_manifest(corpus)]  # absolute audio paths
    write_manifest(rows, out)
    return out


@pytest.fixture(scope="module")
def train_rows(corpus) -> list[Row]:
    return [r for r in read_manifest(corpus) if r.split == "train"]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """One 30-step run, both tasks, checkpoints every 10 steps, a dev evaluation at the end."""
    out = tmp_path_factory.mktemp("run") / "sft"
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train_sft(small(steps=30, save_every=10, keep_checkpoints=2, eval_every=30, eval_rows=8,
                                  eval_max_new_tokens=8),
                            SPEC, PromptConfig(), corpus, out, progress=lambda s, n, m: seen.append((s, n, m)))
    return out, summary, seen, caught


def log_lines(out: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x["kind"] == kind]


# --- examples ------------------------------------------------------------------------------------


def test_task_weights_are_respected(train_rows):
    cfg = PromptConfig()
    n = len(train_rows)
    only = build_examples(train_rows, {"classify": 1.0}, cfg, seed=0)
    assert len(only) == n and {e.task for e in only} == {"classify"}
    assert sorted(e.row.id for e in only) == sorted(r.id for r in train_rows)  # each row exactly once

    for w, seed in (({"classify": 0.5, "respond": 0.5}, 0), ({"classify": 3, "respond": 1}, 7), ({"classify": 0, "respond": 2}, 1)):
        ex = build_examples(train_rows, w, cfg, seed=seed)
        counts = Counter(e.task for e in ex)
        total = sum(w.values())
        for task, weight in w.items():
            assert abs(counts[task] - n * weight / total) <= 1, (w, counts)
        assert sorted(e.row.id for e in ex) == sorted(r.id for r in train_rows)
        for e in ex:
            assert e.target == build_target(e.task, e.row, cfg)
            assert ("<answer>" in e.target) == (e.task == "classify") and ("<response>" in e.target) == (e.task == "respond")

    a = build_examples(train_rows, {"classify": 1, "respond": 1}, cfg, seed=0)
    b = build_examples(train_rows, {"classify": 1, "respond": 1}, cfg, seed=0)
    c = build_examples(train_rows, {"classify": 1, "respond": 1}, cfg, seed=1)
    assert a == b and [(e.row.id, e.task) for e in a] != [(e.row.id, e.task) for e in c]


def test_rows_without_reply_only_classify(train_rows):
    rows = [r.model_copy(update={"response": None}) if i % 2 else r for i, r in enumerate(train_rows)]
    ex = build_examples(rows, {"classify": 1, "respond": 1}, PromptConfig(), seed=3)
    assert len(ex) == len(rows)
    assert all(e.task == "classify" for e in ex if not e.row.response)


def test_cot_and_transcript_switches_shape_targets(train_rows):
    r = train_rows[0]
    cot = build_examples([r], {"classify": 1}, PromptConfig(), seed=0)[0]
    assert cot.target.startswith("<think>") and f"pitch level: {r.cues['pitch_level']}" in cot.target
    assert r.transcript in cot.prompt and "the words sound" in cot.target
    direct = build_examples([r], {"classify": 1}, PromptConfig(cot=False), seed=0)[0]
    assert direct.target == f"<answer>{r.sentiment}</answer>"
    blind = build_examples([r], {"classify": 1}, PromptConfig(transcript=False), seed=0)[0]
    assert r.transcript not in blind.prompt and "the words sound" not in blind.target


def test_transcript_dropout_drops_words_from_prompt_and_target(train_rows):
    cfg = PromptConfig()
    w = {"classify": 1, "respond": 1}
    plain = build_examples(train_rows, w, cfg, seed=2)
    half = build_examples(train_rows, w, cfg, seed=2, transcript_dropout=0.5)
    assert [(e.row.id, e.task) for e in half] == [(e.row.id, e.task) for e in plain]  # same epoch, only prompts differ
    blind = [e for e in half if not e.transcript]
    assert 0.25 * len(half) < len(blind) < 0.75 * len(half)
    no_words = PromptConfig(transcript=False)
    for e in half:
        shown = cfg if e.transcript else no_words
        assert e.prompt == build_prompt(e.task, e.row, shown) and e.target == build_target(e.task, e.row, shown)
    assert all(e.row.transcript not in e.prompt and "the words sound" not in e.target for e in blind)
    assert half == build_examples(train_rows, w, cfg, seed=2, transcript_dropout=0.5)
    # a prompt without transcript has nothing to drop
    assert all(e.transcript is False for e in build_examples(train_rows, w, no_words, seed=2, transcript_dropout=0.5))


def test_tokenizer_texts_cover_everything(train_rows):
    texts = set(tokenizer_texts(train_rows, PromptConfig()))
    for e in build_examples(train_rows, {"classify": 1, "respond": 1}, PromptConfig(), seed=0):
        assert e.prompt in texts and e.target in texts
    r = train_rows[0]
    assert r.transcript in texts and r.response in texts
    assert build_target("respond", r, PromptConfig()) in texts and build_target("classify", r, PromptConfig()) in texts


def test_audio_cache_decodes_once(train_rows):
    for dtype in ("int16", "float32"):
        cache = AudioCache(dtype)
        a = cache.get(train_rows[0])
        b = cache.get(train_rows[0])
        assert cache.decoded == 1 and a.dtype == b.dtype == "float32"
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b))
        assert cache._clips[train_rows[0].audio].dtype == dtype
    ref = AudioCache("float32").get(train_rows[1])
    assert abs(AudioCache("int16").get(train_rows[1]) - ref).max() <= 1 / 32768 + 1e-7  # 16-bit source: lossless


def test_label_budget_selects_nested_subsets(train_rows):
    cfg = PromptConfig()
    b10 = select_train_rows(train_rows, cfg, 10, seed=0)
    b20 = select_train_rows(train_rows, cfg, 20, seed=0)
    assert len(b10) == 10 and len(b20) == 20 and {r.id for r in b10} <= {r.id for r in b20}
    assert {r.id for r in select_train_rows(train_rows, cfg, 10, seed=1)} != {r.id for r in b10}
    assert len(select_train_rows(train_rows, cfg, None, seed=0)) == len(train_rows)
    with pytest.raises(PallmError, match="label_budget=999"):
        select_train_rows(train_rows, cfg, 999, seed=0)


# --- config and bad input ------------------------------------------------------------------------


def test_config_rejects_unknown_fields_and_tasks():
    with pytest.raises(ValidationError, match="stepz"):
        SFTConfig(stepz=3)
    with pytest.raises(ValidationError, match="translate"):
        SFTConfig(task_weights={"translate": 1.0})
    with pytest.raises(ValidationError):
        SFTConfig(task_weights={"classify": 0.0})
    with pytest.raises(ValidationError):
        SFTConfig(lora={"rank": 4})


def test_missing_cues_is_a_clear_error(no_cues, tmp_path):
    with pytest.raises(PallmError, match=r"pallm data cues") as e:
        train_sft(small(steps=1), SPEC, PromptConfig(), no_cues, tmp_path / "out")
    assert "cues" in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("switch", ["speaker_reference", "speaker_norm"])
def test_speaker_reference_switches_need_reference_clips_then_train_with_them(corpus, tmp_path, switch):
    cfg = PromptConfig(**{switch: True})
    with pytest.raises(PallmError, match=rf"reference_audio.*prompt\.{switch}.*pallm data cues"):
        train_sft(small(steps=1), SPEC, cfg, corpus, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    rows = read_manifest(corpus)
    first = {}
    for r in rows:
        first.setdefault(r.speaker, r.audio)
    write_manifest([r.model_copy(update={"reference_audio": first[r.speaker]}) for r in rows], tmp_path / "ref")
    summary = train_sft(small(steps=4, eval_every=4, eval_rows=4, eval_max_new_tokens=4), SPEC, cfg,
                        tmp_path / "ref", tmp_path / "out")
    assert summary["steps"] == 4 and read_pallm_meta(tmp_path / "out")["task_format"][switch] is True


def test_empty_train_split_is_an_error(corpus, tmp_path):
    rows = [r for r in read_manifest(corpus) if r.split != "train"]
    write_manifest(rows, tmp_path / "c")
    with pytest.raises(PallmError, match="train split"):
        train_sft(small(steps=1), SPEC, PromptConfig(), tmp_path / "c", tmp_path / "out")


def test_respond_without_replies_is_an_error(corpus, tmp_path):
    rows = [r.model_copy(update={"response": None}) for r in read_manifest(corpus)]
    write_manifest(rows, tmp_path / "c")
    with pytest.raises(PallmError, match="response"):
        train_sft(small(steps=1), SPEC, PromptConfig(), tmp_path / "c", tmp_path / "out")


# --- a full run ----------------------------------------------------------------------------------


def test_sft_reduces_loss(finished):
    out, summary, seen, _ = finished
    losses = [x["loss"] for x in log_lines(out)]
    assert [x["step"] for x in log_lines(out)] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert summary["steps"] == 30 and summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["examples"] == 30 * 4 and summary["examples_per_s"] > 0 and summary["peak_rss_mb"] > 0
    lines = log_lines(out)  # both tasks trained, each with its own loss (a batch of 4 may lack one)
    assert sum("loss_classify" in x for x in lines) > 10 and sum("loss_respond" in x for x in lines) > 10
    assert all(x.get("loss_classify", 1) > 0 and x.get("loss_respond", 1) > 0 for x in lines)
    assert lines[0]["lr"] == pytest.approx(3e-3) and lines[-1]["lr"] < 1e-4  # cosine decay toward 0
    assert [s for s, _, _ in seen] == list(range(1, 31)) and all(n == 30 and "loss" in m for _, n, m in seen)
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_dev_curve_logged(finished):
    out, summary, _, _ = finished
    dev = log_lines(out, "dev")
    assert [d["step"] for d in dev] == [30] and summary["dev_curve"][0]["step"] == 30
    for key in ("ua", "ua_congruent", "ua_conflict", "parse_rate"):
        assert 0.0 <= dev[0][key] <= 1.0 and summary["dev_curve"][0][key] == dev[0][key]


def test_truncation_reported_once(finished):
    *_, caught = finished
    msgs = [str(w.message) for w in caught if "longer than the model" in str(w.message)]
    assert len(msgs) == 1 and "2 s audio window" in msgs[0], msgs


def test_checkpoint_reloads_with_from_pretrained(finished, corpus):
    out, summary, _, _ = finished
    meta = read_pallm_meta(out)
    assert meta["stage"] == "sft" and meta["labels"] == ["negative", "neutral", "positive"]
    assert meta["task_format"] == PromptConfig().model_dump(mode="json")
    assert meta["train_config"]["steps"] == 30 and meta["model_spec"]["max_audio_seconds"] == 2
    assert Path(meta["corpus"]) == corpus.resolve()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<answer>") != processor.tokenizer.unk_token_id
    # the final weights are the last step checkpoint's weights (the model that finished training)
    last = load_file(str(out / "checkpoints" / "step-30" / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k in last:
            assert torch.equal(v, last[k]), k
    # keep_checkpoints=2 of saves at 10, 20, 30; nothing half-written is left behind
    assert [s for s, _ in list_checkpoints(out)] == [20, 30]
    assert not [p for p in out.rglob(".*tmp*")]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 30


def test_refuses_to_overwrite_finished_run(finished, corpus):
    out, *_ = finished
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(PallmError, match=str(out)):
        train_sft(small(steps=2), SPEC, PromptConfig(), corpus, out)
    assert (out / "model.safetensors").read_bytes() == before


def test_overwrite_replaces_run(corpus, tmp_path):
    out = tmp_path / "sft"
    train_sft(small(steps=2, save_every=1), SPEC, PromptConfig(), corpus, out)
    s = train_sft(small(steps=1, task_weights={"classify": 1}, label_budget=10), SPEC, PromptConfig(cot=False),
                  corpus, out, overwrite=True)
    assert s["resumed_from"] is None and s["train_rows"] == 10
    meta = read_pallm_meta(out)
    assert meta["train_config"]["steps"] == 1 and meta["train_rows"] == 10 and meta["task_format"]["cot"] is False
    assert [x["step"] for x in log_lines(out)] == [1] and "loss_respond" not in log_lines(out)[0]
    assert list_checkpoints(out) == []  # the old run's checkpoints are gone


def test_label_budget_and_classify_only(corpus, tmp_path):
    s = train_sft(small(steps=3, task_weights={"classify": 1}, label_budget=6), SPEC, PromptConfig(), corpus, tmp_path / "o")
    assert s["train_rows"] == 6 and s["epochs"] == pytest.approx(3 * 4 / 6)
    lines = log_lines(tmp_path / "o")
    assert all("loss_classify" in x and "loss_respond" not in x for x in lines)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_resume_gives_identical_weights(corpus, tmp_path, lora):
    """Interrupted after step 4's checkpoint, resumed: the same weights as an uninterrupted run.
    With LoRA dropout the result also depends on the restored RNG state."""
    cfg = small(steps=8, save_every=2, keep_checkpoints=3, task_weights={"classify": 1, "respond": 1}, lr_scheduler="cosine",
                warmup_ratio=0.25, lora={"enabled": lora, "r": 4, "dropout": 0.3})
    ref = train_sft(cfg, SPEC, PromptConfig(), corpus, tmp_path / "a", seed=5)

    class Crash(Exception):
        pass

    def crash_at_5(step, total, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_sft(cfg, SPEC, PromptConfig(), corpus, tmp_path / "b", seed=5, progress=crash_at_5)
    assert not (tmp_path / "b" / "pallm.json").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2, 4]
    resumed = train_sft(cfg, SPEC, PromptConfig(), corpus, tmp_path / "b", seed=5)
    assert resumed["resumed_from"] == 4 and resumed["examples"] == 4 * 4

    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log holds each step once (the crashed run's step 5 line is dropped), same losses
    la, lb = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert [x["step"] for x in lb] == list(range(1, 9))
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], rel=1e-6)
    assert ref["final_loss"] == pytest.approx(resumed["final_loss"], rel=1e-6)


def test_resume_refuses_changed_settings(corpus, tmp_path):
    cfg = small(steps=4, save_every=2)

    def crash(step, total, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg, SPEC, PromptConfig(), corpus, tmp_path / "o", progress=crash)
    with pytest.raises(PallmError, match="batch_size"):
        train_sft(small(steps=4, save_every=2, batch_size=2), SPEC, PromptConfig(), corpus, tmp_path / "o")
    with pytest.raises(PallmError, match="transcript_dropout"):  # it changes the example stream
        train_sft(small(steps=4, save_every=2, transcript_dropout=0.5), SPEC, PromptConfig(), corpus, tmp_path / "o")


def test_lora_trains_adapters_only_and_saves_merged(corpus, tmp_path):
    cfg = small(steps=2, lora={"enabled": True, "r": 4, "dropout": 0.1}, freeze_audio_encoder=True, save_every=1)
    s = train_sft(cfg, SPEC, PromptConfig(), corpus, tmp_path / "l")
    assert s["trainable_parameters"] < 300_000  # adapters + projector, not the ~1.2M model
    out = tmp_path / "l"
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out)  # merged full checkpoint
    assert not any("lora" in k for k in model.state_dict())
    assert (out / "adapter" / "adapter_config.json").exists()
    assert read_pallm_meta(out)["lora"] == "merged"
    step = list_checkpoints(out)[-1][1]
    assert (step / "adapter" / "adapter_config.json").exists()


DDP_SCRIPT = """
import hashlib, json, os, sys
import pallm.train.sft as sft
from pallm.model import ModelSpec
from pallm.prompts.format import PromptConfig
from pallm.train import SFTConfig, train_sft

finish = sft.finish_run
def hashed_finish(accelerator, model, *a, **kw):  # each rank's own final weights
    m = accelerator.unwrap_model(model)
    h = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()
    json.dump({"hash": h}, open(os.path.join(sys.argv[2] + "-rank" + os.environ["RANK"] + ".json"), "w"))
    return finish(accelerator, model, *a, **kw)
sft.finish_run = hashed_finish
train_sft(SFTConfig(steps=3, batch_size=2, save_every=2, log_every=1, eval_every=0, threads=1, average_last_checkpoints=2),
          ModelSpec(max_audio_seconds=2), PromptConfig(), sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(corpus, tmp_path):
    """torchrun with 2 CPU processes: one gloo DDP job (not two independent runs), each process
    on its own slice of the global batch, only rank 0 writing; the published model is the average
    of the step-2 and final step-3 checkpoints (average_last_checkpoints=2, a collective publish)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(corpus), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["examples"] == 3 * 2 * 2
    assert [x["step"] for x in log_lines(out)] == [1, 2, 3]  # written once, by rank 0
    state = out / "checkpoints" / "step-3" / "trainer"
    assert (state / "random_states_0.pkl").exists() and (state / "random_states_1.pkl").exists()
    Qwen2AudioForConditionalGeneration.from_pretrained(out)
    assert summary["averaged_steps"] == [2, 3]
    w2, w3, got = (load_file(p / "model.safetensors") for p in (out / "checkpoints" / "step-2", out / "checkpoints" / "step-3", out))
    assert all(torch.allclose(got[k], (w2[k] + w3[k]) / 2, rtol=0, atol=1e-6) for k in got)
    h0, h1 = (json.loads((tmp_path / f"ddp-rank{i}.json").read_text())["hash"] for i in (0, 1))
    assert h0 == h1  # DDP kept the two processes' weights identical
