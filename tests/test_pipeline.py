"""The run config's extra rows (baselines, ablations, LLM judge) and the text-only LLM's corpus."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from pallm.config import build_config
from pallm.data.manifest import Row, read_manifest, write_manifest
from pallm.errors import ConfigError
from pallm.pipeline import TEXT_ONLY_SILENCE_S, RunConfig, classify_share, single_task_steps, text_only_corpus


def cfg(*overrides):
    return build_config(RunConfig, overrides=list(overrides))


def test_default_rows():
    c = cfg()
    assert c.baselines == ["acoustic", "text", "text_llm"] and c.ablations == ["no_cot", "single_task_rl"]
    assert c.eval.llm_judge is None
    assert single_task_steps(c) == 250  # 400 steps x classify share 1 - 0.75 x 0.5 (conflict_share 0.25)


@pytest.mark.parametrize("override, message", [
    ("baselines=[acoustic,textllm]", "unknown baseline(s) ['textllm']; known: acoustic, text, text_llm, "
                                     "api:gpt-4o-audio, api:gemini-2.5-pro"),
    ("baselines=[api:gpt-5]", "unknown baseline(s) ['api:gpt-5']"),
    ("ablations=[no_cot,nocot]", "unknown ablation(s) ['nocot']; known: no_cot, single_task_rl"),
    ("ablation_steps.grpo=0", "ablation_steps.grpo"),
    ("ablation_steps.grpo=most", "ablation_steps.grpo"),
    ("eval.llm_judge={model: x}", "eval.llm_judge.base_url"),
    ("eval.llm_judge={base_url: u, model: x, concurrency: 2}", "eval.llm_judge.concurrency"),
])
def test_unknown_rows_and_bad_blocks_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as e:
        cfg(override)
    assert message in str(e.value)


def test_single_task_rl_needs_a_stage_1_checkpoint():
    with pytest.raises(ConfigError, match="single_task_rl starts from the stage-1 checkpoint"):
        cfg("stages=[grpo]", "grpo_init=null")
    assert cfg("stages=[grpo]", "grpo_init=runs/x/sft").ablations == ["no_cot", "single_task_rl"]
    assert cfg("stages=[grpo]", "ablations=[]").ablations == []


def test_rows_are_deduplicated_and_api_names_accepted():
    c = cfg("baselines=[text,api:gpt-4o-audio,text,api:gemini-2.5-pro]", "ablations=[no_cot,no_cot]")
    assert c.baselines == ["text", "api:gpt-4o-audio", "api:gemini-2.5-pro"] and c.ablations == ["no_cot"]


def test_single_task_budget():
    assert single_task_steps(cfg("ablation_steps.grpo=same")) == 400
    assert single_task_steps(cfg("ablation_steps.grpo=37")) == 37
    # conflict prompts and hard-row oversampling are classify prompts too
    c = cfg("grpo.conflict_share=0.5", "grpo.steps=40")
    assert classify_share(c.grpo) == pytest.approx(0.75) and single_task_steps(c) == 30
    assert classify_share(cfg("grpo.task_weights={classify: 1, respond: 0}").grpo) == 1.0


def test_llm_judge_block():
    c = cfg("eval.llm_judge={base_url: 'http://localhost:8000/v1', model: Qwen/Qwen2.5-7B-Instruct, api_key_env: null}")
    j = c.eval.llm_judge
    assert (j.max_concurrency, j.timeout, j.retries, j.api_key_env) == (4, 30.0, 3, None)


def test_text_only_corpus_keeps_everything_but_the_voice(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i, ch in enumerate([None, 1]):
        sf.write(src / f"c{i}.wav", 0.3 * np.ones((16_000 * (i + 2), 2), dtype=np.float32), 16_000)
        r = Row(id=f"r{i}", audio=f"c{i}.wav", corpus="t", speaker="s", split="train" if i else "test",
                sentiment="negative", emotion="sad", transcript=f"words {i}", lexical_sentiment="positive",
                congruent=False, duration=float(i + 2), response="oh no", cues={"pitch_level": "low"},
                reference_audio="c0.wav")
        if ch is not None:
            r = r.model_copy(update={"channel": ch})
        rows.append(r)
    write_manifest(rows, src)
    out = text_only_corpus(src, tmp_path / "silent")
    silent = read_manifest(out)
    assert [r.id for r in silent] == ["r0", "r1"]
    for before, after in zip(rows, silent):
        assert after.audio == str((out / "silence.wav").resolve()) and after.duration == TEXT_ONLY_SILENCE_S
        assert after.reference_audio == after.audio  # the speaker reference is silent too
        assert getattr(after, "channel", None) is None
        same = before.to_json()
        for k in ("audio", "duration", "channel", "reference_audio"):
            same.pop(k, None)
        assert {k: v for k, v in after.to_json().items() if k not in ("audio", "duration", "reference_audio")} == same
    wav, sr = sf.read(out / "silence.wav")
    assert sr == 16_000 and len(wav) == int(TEXT_ONLY_SILENCE_S * 16_000) and not wav.any()
    text_only_corpus(src, tmp_path / "silent")  # idempotent: re-running a run rewrites the same thing
    assert read_manifest(out) == silent
