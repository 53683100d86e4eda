"""The command line: one-line errors with exit code 2, presets, and the pipeline end to end."""

import json
import os

import pytest
from typer.testing import CliRunner

from pallm.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("args, message", [
    (["run", "sft.stepz=3"], "sft.stepz"),
    (["run", "seed"], "key=value"),
    (["run", "--preset", "huge"], "unknown preset"),
    (["run", "baselines=[acoustic,gpt4]"], "unknown baseline(s) ['gpt4']"),
    (["run", "ablations=[no_rl]"], "unknown ablation(s) ['no_rl']"),
    (["run", "--config", "nowhere.yaml"], "nowhere.yaml: config file not found"),
    (["eval", "--model", "no/such/ckpt", "--data", "x"], "no/such/ckpt"),
    (["data", "prepare", "ravdess", "--root", "no/such/root", "--out", "o"], "no/such/root"),
    (["data", "cues", "no/such/corpus"], "no/such/corpus"),
    (["data", "cues", "no/such/corpus", "--baseline", "age"], "--baseline age: choose one of speaker, gender"),
    (["run", "data.cue_baseline=age"], "data.cue_baseline"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_every_command_has_help():
    for cmd in (["run"], ["eval"], ["train", "sft"], ["train", "grpo"], ["data", "synth"], ["data", "prepare"],
                ["data", "cues"]):
        r = _run(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_synth_cli_writes_corpus_and_refuses_overwrite(tmp_path):
    out = tmp_path / "ps"
    r = _run("data", "synth", "--out", str(out), "--n", "24", "--workers", "1", "speakers=8", "test_speakers=2",
             "dev_speakers=2")
    assert r.exit_code == 0, r.output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 24
    r = _run("data", "synth", "--out", str(out), "--n", "24")
    assert r.exit_code == 2 and "--overwrite" in r.output


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path, monkeypatch):
    """`pallm run --preset smoke` leaves the run folder the contract describes, and resumes."""
    monkeypatch.chdir(tmp_path)
    r = _run("run", "--preset", "smoke", "--out", "run")
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    for f in ("report.md", "metrics.json", "config.yaml", "sft/pallm.json", "grpo/pallm.json",
              "sft/model.safetensors", "grpo/model.safetensors", "eval/sft/metrics.json", "eval/pallm/predictions.jsonl"):
        assert (run / f).exists(), f
    metrics = json.loads((run / "metrics.json").read_text())
    new_rows = {"text-only LLM (SFT on transcripts)": "baseline", "SFT, no CoT": "ablation",
                "GRPO, single task": "ablation"}
    assert {"eGeMAPS + LR", "text TF-IDF + LR", "SFT (stage 1)", "PALLM (SFT + GRPO)", *new_rows} <= set(metrics["models"])
    for m in metrics["models"].values():
        assert {"all", "congruent", "conflict"} <= set(m["metrics"]["subsets"])
        assert all(isinstance(v["ua"], float) for k, v in m["metrics"]["subsets"].items() if "ua" in v)
    for name, kind in new_rows.items():
        m = metrics["models"][name]
        assert m["kind"] == kind and m["description"] and "voice_dependence" in m["probes"] and m["response"]["n"] == 8
    # The text-only LLM never hears a voice: silence or another clip changes nothing.
    assert metrics["models"]["text-only LLM (SFT on transcripts)"]["probes"]["voice_dependence"] == 0.0
    assert "GRPO, single task" in metrics["models"] and "2 steps" in metrics["models"]["GRPO, single task"]["description"]
    for f in ("text_llm/pallm.json", "ablations/no_cot/pallm.json", "ablations/single_task_rl/pallm.json",
              "eval/text_llm/metrics.json", "eval/no_cot/metrics.json", "eval/single_task_rl/metrics.json"):
        assert (run / f).exists(), f
    assert json.loads((run / "ablations/no_cot/pallm.json").read_text())["task_format"]["cot"] is False
    ev = json.loads((run / "eval/sft/metrics.json").read_text())
    assert set(ev["subsets"]["all"]) >= {"n", "ua", "wa", "macro_f1", "parse_rate"}
    assert ev["confusion"]["labels"] == ["negative", "neutral", "positive"]
    report = (run / "report.md").read_text()
    assert "conflict" in report and ".png" in report
    assert "| text-only LLM (SFT on transcripts) |" in report and "| GRPO, single task |" in report
    assert "What each row is" in report
    # The rows beside the main line trained in a second process (2+ cores here); trained all in
    # one process instead, every checkpoint is bit-identical and so is every number.
    # Two trainers at once share the cores: each gets half (the same thread count is given to the
    # sequential run below, so that its numbers can be compared bit for bit).
    half = max(1, os.cpu_count() // 2)
    if os.cpu_count() >= 2:
        assert "training in a second process" in r.output
        for f in ("sft", "grpo", "text_llm", "ablations/single_task_rl"):
            assert json.loads((run / f / "train_summary.json").read_text())["threads"] == half, f
    r = _run("run", "--preset", "smoke", "--out", "seq", "parallel_rows=false", f"sft.threads={half}", f"grpo.threads={half}")
    assert r.exit_code == 0 and "second process" not in r.output, r.output
    for f in ("sft", "grpo", "text_llm", "ablations/no_cot", "ablations/single_task_rl"):
        assert (run / f / "model.safetensors").read_bytes() == (tmp_path / "seq" / f / "model.safetensors").read_bytes(), f
    seq = json.loads((tmp_path / "seq" / "metrics.json").read_text())
    assert {k: m["metrics"] for k, m in seq["models"].items()} == {k: m["metrics"] for k, m in metrics["models"].items()}
    # A second run with the same config reuses the trained stages; another config is refused.
    r = _run("run", "--preset", "smoke", "--out", "run")
    assert r.exit_code == 0 and "reusing" in r.output
    r = _run("run", "--preset", "smoke", "--out", "run", "seed=5")
    assert r.exit_code == 2 and "another config" in r.output
