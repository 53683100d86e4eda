"""Which model a run publishes: the best on dev (`load_best_model_at_end`, transformers' names) or
the weight average of its last step checkpoints (`average_last_checkpoints`): each on its own
with a real tiny model, and short stage-1 runs that use them end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from pallm.errors import PallmError
from pallm.model import ModelSpec, read_pallm_meta
from pallm.model.build import average_checkpoints, build_tiny, load_pretrained, save_checkpoint
from pallm.prompts.format import PromptConfig
from pallm.train import SFTConfig, train_sft
from pallm.train.common import BEST_MODEL_DIR, BestModel, dev_record, list_checkpoints, make_accelerator
from pallm.train.grpo import GRPOConfig, train_grpo

from helpers import synth_corpus_random_cues

SPEC = ModelSpec(max_audio_seconds=2)
MARK = "audio_tower.conv1.bias"


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(["the voice sounds happy", "negative neutral positive"] * 5)
    return model, processor


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def mark(model, value: float) -> None:
    """Make the model identifiable: one bias set to `value`."""
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(MARK)).fill_(value)


def marked(folder: Path) -> float:
    w = weights(folder)
    return float(next(v for k, v in w.items() if k.endswith(MARK)).flatten()[0])


def test_publishes_the_best_step_not_the_last(tiny, tmp_path):
    model, processor = tiny
    acc = make_accelerator(1, "no")
    best = BestModel(tmp_path, "ua", greater_is_better=True, final_step=40)
    meta = {"stage": "sft"}
    for step, ua in ((10, 0.5), (20, 0.7), (30, 0.7), (40, 0.4)):  # 30 ties 20: the earlier stays
        mark(model, float(step))
        best.update(acc, model, processor, {**meta, "step": step}, {"step": step, "ua": ua})
    assert best.record() == {"step": 20, "metric": "ua", "value": 0.7}
    assert marked(tmp_path / BEST_MODEL_DIR) == 20.0
    best.publish(acc, model, processor, tmp_path, {**meta, "summary": {"steps": 40}})
    assert marked(tmp_path) == 20.0  # the live model (step 40) is not what was published
    pub = read_pallm_meta(tmp_path)
    assert pub["step"] == 20 and pub["best_model"]["value"] == 0.7 and pub["summary"] == {"steps": 40}
    assert not (tmp_path / BEST_MODEL_DIR).exists()


def test_last_step_best_publishes_the_live_model(tiny, tmp_path):
    model, processor = tiny
    acc = make_accelerator(1, "no")
    best = BestModel(tmp_path, "follows_words_rate", greater_is_better=False, final_step=20)
    mark(model, 1.0)
    best.update(acc, model, processor, {"step": 10}, {"step": 10, "follows_words_rate": 0.6})
    mark(model, 2.0)
    assert best.update(acc, model, processor, {"step": 20}, {"step": 20, "follows_words_rate": 0.3})  # lower is better
    best.publish(acc, model, processor, tmp_path, {"summary": {}})
    assert marked(tmp_path) == 2.0 and best.step == 20 and not (tmp_path / BEST_MODEL_DIR).exists()


def test_missing_metric_is_a_clear_error(tiny, tmp_path):
    model, processor = tiny
    best = BestModel(tmp_path, "ua_conflict", greater_is_better=True, final_step=10)
    with pytest.raises(PallmError, match="ua_conflict.*congruent"):
        best.update(make_accelerator(1, "no"), model, processor, {}, {"step": 5, "ua": 0.5, "ua_conflict": None})


def test_worst_emotion_accuracy_sees_one_collapsing_voice(tiny, tmp_path):
    """UA can rise while one voice emotion collapses; the worst-emotion metric prefers the step
    where no emotion is lost."""
    def metrics(ua, angry, happy):
        return {"subsets": {"all": {"ua": ua, "parse_rate": 1.0},
                            "emotion:angry": {"n": 50, "accuracy": angry, "parse_rate": 1.0},
                            "emotion:happy": {"n": 50, "accuracy": happy, "parse_rate": 1.0}}}

    early, late = dev_record(10, metrics(0.70, 0.60, 0.65)), dev_record(20, metrics(0.75, 0.30, 0.95))
    assert early["worst_emotion_accuracy"] == 0.60 and late["worst_emotion_accuracy"] == 0.30
    assert late["accuracy/angry"] == 0.30 and late["accuracy/happy"] == 0.95  # per-emotion dev curves
    model, processor = tiny
    acc = make_accelerator(1, "no")
    by_ua, by_worst = (BestModel(tmp_path / m, m, True, final_step=20) for m in ("ua", "worst_emotion_accuracy"))
    for rec in (early, late):
        by_ua.update(acc, model, processor, {}, rec)
        by_worst.update(acc, model, processor, {}, rec)
    assert by_ua.step == 20 and by_worst.step == 10
    no_emotion = dev_record(5, {"subsets": {"all": {"ua": 0.5, "parse_rate": 1.0}}})
    assert "worst_emotion_accuracy" not in no_emotion
    with pytest.raises(PallmError, match="worst_emotion_accuracy.*emotion"):
        BestModel(tmp_path / "x", "worst_emotion_accuracy", True, 10).update(acc, model, processor, {}, no_emotion)


def test_resume_keeps_an_earlier_best_only(tiny, tmp_path):
    model, processor = tiny
    acc = make_accelerator(1, "no")
    BestModel(tmp_path, "ua", True, final_step=100).update(acc, model, processor, {}, {"step": 50, "ua": 0.8})
    assert BestModel(tmp_path, "ua", True, 100, resume_step=60).record()["value"] == 0.8
    assert BestModel(tmp_path, "ua", True, 100, resume_step=40).step is None  # saved after the checkpoint: found again
    assert BestModel(tmp_path, "parse_rate", True, 100, resume_step=60).step is None  # another metric


def test_needs_a_dev_evaluation():
    with pytest.raises(ValidationError, match="eval_every"):
        SFTConfig(load_best_model_at_end=True, eval_every=0)
    with pytest.raises(ValidationError, match="eval_every"):
        GRPOConfig(load_best_model_at_end=True, eval_every=0)
    with pytest.raises(ValidationError):
        GRPOConfig(metric_for_best_model="loss")
    assert GRPOConfig(metric_for_best_model="follows_words_rate").best_is_greater is False
    assert SFTConfig(metric_for_best_model="ua_conflict").best_is_greater is True


def test_sft_run_publishes_its_best_dev_checkpoint(tmp_path):
    corpus = synth_corpus_random_cues(tmp_path / "ps", n=48, workers=2)
    cfg = SFTConfig(steps=12, batch_size=4, lr=3e-3, warmup_ratio=0.0, log_every=1, save_every=4, keep_checkpoints=3,
                    eval_every=4, eval_rows=8, eval_max_new_tokens=8, threads=1, load_best_model_at_end=True,
                    metric_for_best_model="parse_rate")
    out = tmp_path / "run"
    summary = train_sft(cfg, SPEC, PromptConfig(), corpus, out)
    curve = summary["dev_curve"]
    assert [d["step"] for d in curve] == [4, 8, 12]
    top = max(d["parse_rate"] for d in curve)
    want = next(d["step"] for d in curve if d["parse_rate"] == top)  # the earliest best
    assert summary["best_model"] == {"step": want, "metric": "parse_rate", "value": top}
    assert read_pallm_meta(out)["step"] == want
    ckpts = dict(list_checkpoints(out))  # step checkpoints hold the same weights the run had then
    ref = weights(ckpts[want])
    got = weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert json.loads((out / "train_summary.json").read_text())["best_model"]["step"] == want
    assert not (out / BEST_MODEL_DIR).exists()


def test_report_says_which_step_was_published(tmp_path):
    from pallm.pipeline import _published_step

    (tmp_path / "train_summary.json").write_text(json.dumps({"steps": 400, "best_model": None}))
    assert _published_step(tmp_path) == ""
    (tmp_path / "train_summary.json").write_text(
        json.dumps({"steps": 400, "best_model": {"step": 250, "metric": "ua", "value": 0.71}}))
    assert "step 250, not the last step; dev ua 0.710" in _published_step(tmp_path)


# --- average_last_checkpoints -------------------------------------------------------------------


def shifted(model, by: float):
    """A copy of `model` with every floating tensor moved by `by` (a distinguishable checkpoint)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.state_dict().values():
            if p.is_floating_point():
                p.add_(by)
    return other


def mark_key(w: dict) -> str:
    return next(k for k in w if k.endswith(MARK))


def test_average_is_the_mean_of_every_tensor_sharded_or_not(tiny, tmp_path):
    model, processor = tiny
    srcs = []
    for i, by in enumerate((0.0, 0.5, 2.0)):
        srcs.append(save_checkpoint(shifted(model, by), processor, tmp_path / f"c{i}", {"step": 10 * (i + 1)}))
    got = average_checkpoints(srcs, tmp_path / "avg", {"note": "x"})
    ws = [weights(p) for p in srcs]
    avg = weights(got)
    assert avg.keys() == ws[0].keys()
    for k in avg:
        assert avg[k].dtype == ws[0][k].dtype
        torch.testing.assert_close(avg[k], (ws[0][k] + ws[1][k] + ws[2][k]) / 3, rtol=0, atol=1e-6)
    assert not torch.equal(avg[mark_key(avg)], ws[2][mark_key(avg)])  # not a copy of the last
    meta = read_pallm_meta(got)
    assert meta["step"] == 30 and meta["note"] == "x" and meta["averaged_from"] == [str(p) for p in srcs]
    load_pretrained(got)  # a checkpoint like any other

    # The same checkpoints in shards: the output keeps the shard layout and the same numbers.
    sharded = []
    for p in srcs:
        q = tmp_path / f"{p.name}-sharded"
        m, proc = load_pretrained(p)
        save_checkpoint(m, proc, q, read_pallm_meta(p))
        (q / "model.safetensors").unlink()
        m.save_pretrained(q, max_shard_size="300KB")
        sharded.append(q)
    assert len(list(sharded[0].glob("model-*.safetensors"))) > 1
    out = average_checkpoints(sharded, tmp_path / "avg-sharded", {})
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    back, _ = load_pretrained(out)
    ref, _ = load_pretrained(got)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))


def test_averaging_refuses_what_is_not_one_models_checkpoints(tiny, tmp_path):
    model, processor = tiny
    a = save_checkpoint(model, processor, tmp_path / "a", {})
    other, other_proc = build_tiny(["the voice sounds happy"] * 5, ModelSpec(tiny={"text_layers": 1}))
    b = save_checkpoint(other, other_proc, tmp_path / "b", {})
    with pytest.raises(PallmError, match="different tensors"):
        average_checkpoints([a, b], tmp_path / "x", {})
    (tmp_path / "lora" / "adapter").mkdir(parents=True)
    (tmp_path / "lora" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(PallmError, match="LoRA adapter.*pallm export --merge"):
        average_checkpoints([a, tmp_path / "lora"], tmp_path / "x", {})
    with pytest.raises(PallmError, match="not found"):
        average_checkpoints([a, tmp_path / "nope"], tmp_path / "x", {})
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_average_last_checkpoints_settings_are_checked():
    for cfg in (SFTConfig, GRPOConfig):
        with pytest.raises(ValidationError, match="keep_checkpoints >= 3"):
            cfg(average_last_checkpoints=3, keep_checkpoints=2)
        with pytest.raises(ValidationError, match="save_every > 0"):
            cfg(average_last_checkpoints=2, save_every=0)
        with pytest.raises(ValidationError, match="set one"):
            cfg(average_last_checkpoints=2, load_best_model_at_end=True)
        with pytest.raises(ValidationError, match="LoRA"):
            cfg(average_last_checkpoints=2, lora={"enabled": True})
        with pytest.raises(ValidationError, match="writes 1 step checkpoint"):
            cfg(average_last_checkpoints=2, steps=5, save_every=10)
        # a derived config (model_copy skips validation) is refused by the trainer before any work
        short = cfg(average_last_checkpoints=2, save_every=10, steps=40).model_copy(update={"steps": 10})
        with pytest.raises(PallmError, match="lower save_every"):
            if cfg is SFTConfig:
                train_sft(short, SPEC, PromptConfig(), "/nonexistent", "/nonexistent/out")
            else:
                train_grpo(short, PromptConfig(), "/nonexistent", "/nonexistent/init", "/nonexistent/out")
        assert cfg(average_last_checkpoints=2).saves_step(cfg().steps)  # the final step is always saved
        assert not cfg().saves_step(cfg().steps + 1)


def test_sft_run_publishes_the_average_of_its_last_checkpoints(tmp_path):
    corpus = synth_corpus_random_cues(tmp_path / "ps", n=32, workers=2)
    # 5 steps, a checkpoint every 2: steps 2, 4 and (because it averages) the final step 5.
    cfg = SFTConfig(steps=5, batch_size=4, lr=3e-3, warmup_ratio=0.0, log_every=1, save_every=2, keep_checkpoints=2,
                    eval_every=0, threads=1, average_last_checkpoints=2)
    out = tmp_path / "run"
    summary = train_sft(cfg, SPEC, PromptConfig(), corpus, out)
    ckpts = dict(list_checkpoints(out))
    assert sorted(ckpts) == [4, 5] and summary["averaged_steps"] == [4, 5]
    w4, w5, got = weights(ckpts[4]), weights(ckpts[5]), weights(out)
    assert got.keys() == w5.keys()
    for k in got:
        torch.testing.assert_close(got[k], (w4[k] + w5[k]) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(w4[k], w5[k]) for k in got)  # the two steps differ: the test can fail
    meta = read_pallm_meta(out)
    assert meta["averaged_steps"] == [4, 5] and meta["step"] == 5 and meta["summary"]["averaged_steps"] == [4, 5]
    assert json.loads((out / "train_summary.json").read_text())["averaged_steps"] == [4, 5]
    load_pretrained(out)


def test_report_says_an_average_was_published(tmp_path):
    from pallm.pipeline import _published_step

    (tmp_path / "train_summary.json").write_text(json.dumps({"steps": 400, "averaged_steps": [350, 400]}))
    assert "weight average of the checkpoints of steps 350, 400" in _published_step(tmp_path)
