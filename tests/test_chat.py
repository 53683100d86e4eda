"""`pallm chat` on a tiny saved checkpoint: any rate/channels, windowing of long clips, folders, errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import pallm.cli.chat as chat_mod  # registers `chat` on the app
import pallm.model
from pallm.cli.main import app
from pallm.data.manifest import Row
from pallm.model import batch as batch_mod
from pallm.model import build_tiny, save_checkpoint
from pallm.prompts.format import PromptConfig, build_prompt, build_target

runner = CliRunner()
CFG = PromptConfig()
LABELS = ["negative", "neutral", "positive"]
NEG = "<think>loudness: low. the voice sounds sad.</think><answer>negative</answer>"
POS = "<think>loudness: high. the voice sounds happy.</think><answer>positive</answer>"
REPLY = "<think>they sound low</think><response>That sounds hard.</response>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    rows = [Row(id=f"r{i}", audio="x.wav", corpus="c", speaker="s", split="train", sentiment=s, emotion=e,
                transcript=t, response="That sounds hard.", cues={"loudness": "low", "rate": "mid"})
            for i, (s, e, t) in enumerate([("negative", "sad", "I lost it"), ("positive", "happy", "we won"),
                                           ("neutral", "neutral", "it is Tuesday")])]
    texts = [build_target(t, r, CFG) for r in rows for t in ("classify", "respond")]
    texts += [build_prompt(t, r, CFG, LABELS) for r in rows for t in ("classify", "respond")]
    model, processor = build_tiny(texts * 5)  # tiny: a 4 s audio window
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("m") / "ckpt",
                           {"task_format": CFG.model_dump(), "labels": LABELS})


def tone(path, seconds, sr=16_000, channels=1, amp=None):
    t = np.arange(int(seconds * sr)) / sr
    a = np.full_like(t, 0.3) if amp is None else amp(t)
    wav = (a * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(path, np.stack([wav] * channels, axis=1) if channels > 1 else wav, sr)
    return path


@pytest.fixture
def spy(monkeypatch):
    """Run the real `generate` (so audio handling and truncation warnings are real), record what it
    got, and optionally replace its outputs with `spy.answer(audio, prompt)`."""
    real = pallm.model.generate
    calls = {"audios": [], "prompts": [], "answer": None}

    def fake(model, processor, audios, prompts, **kw):
        calls["audios"] += [np.asarray(a) for a in audios]
        calls["prompts"] += list(prompts)
        texts = real(model, processor, audios, prompts, **{**kw, "max_new_tokens": 4})
        return [calls["answer"](a, p) for a, p in zip(audios, prompts)] if calls["answer"] else texts

    monkeypatch.setattr(pallm.model, "generate", fake)
    return calls


def run(*args):
    return runner.invoke(app, ["chat", *map(str, args)], catch_exceptions=False)


def json_lines(result):
    return [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]


def test_stereo_44k_clip_is_mixed_resampled_and_answered(ckpt, tmp_path, spy):
    clip = tone(tmp_path / "hello.wav", 1.5, sr=44_100, channels=2)
    r = run("--model", ckpt, clip, "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    for part in ("hello.wav", "1.5 s", "44100 Hz", "2 ch", "reasoning", "sentiment", "reply", "audio window 4 s"):
        assert part in r.output, part
    # both tasks, one window each, 16 kHz mono
    assert [a.shape for a in spy["audios"]] == [(24_000,), (24_000,)]
    assert "sentiment inside <answer></answer>" in spy["prompts"][0] and "<response>" in spy["prompts"][1]
    # and the same run as JSON
    (res,) = json_lines(run("--model", ckpt, clip, "--json", "--max-new-tokens", "8"))
    assert (res["sample_rate"], res["channels"], res["seconds"], len(res["windows"])) == (44_100, 2, 1.5, 1)
    w = res["windows"][0]
    assert set(w) == {"start", "end", "reasoning", "label", "reply", "outputs"} and set(w["outputs"]) == {"classify", "respond"}
    assert w["label"] in LABELS + [None]


def test_long_clip_is_windowed_not_truncated_with_majority(ckpt, tmp_path, spy, monkeypatch):
    # 9 s: quiet, loud, quiet thirds -> 3 windows of 3 s (the tiny model's window is 4 s)
    clip = tone(tmp_path / "long.wav", 9.0, amp=lambda t: np.where((t >= 3) & (t < 6), 0.8, 0.05))
    spy["answer"] = lambda a, p: REPLY if "<response>" in p else (POS if np.abs(a).max() > 0.5 else NEG)
    monkeypatch.setattr(batch_mod, "_truncation_warned", set())  # it warns once per process
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = run("--model", ckpt, clip, "--json")
    assert r.exit_code == 0, r.output
    assert not [w for w in record if "truncated" in str(w.message)]
    assert [len(a) for a in spy["audios"]] == [48_000] * 6  # 3 windows x 2 tasks, each <= 64000 samples
    (res,) = json_lines(r)
    assert [(w["start"], w["end"]) for w in res["windows"]] == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0)]
    assert [w["label"] for w in res["windows"]] == ["negative", "positive", "negative"]
    assert res["label"] == "negative" and res["votes"] == {"negative": 2, "positive": 1}
    assert res["windows"][1]["reasoning"] == "loudness: high. the voice sounds happy."
    assert res["windows"][0]["reply"] == "That sounds hard." and res["window_seconds"] == 4.0
    # the rich view: per-window rows and the majority line
    spy["audios"].clear()
    r = run("--model", ckpt, clip)
    assert r.exit_code == 0
    assert "3 windows of 3.0 s" in r.output and "majority: negative (2 of 3 windows)" in r.output
    assert r.output.count("0.0-3.0 s") == 1 and "3.0-6.0 s" in r.output and "6.0-9.0 s" in r.output


def test_transcript_options(ckpt, tmp_path, spy):
    clip = tone(tmp_path / "a.wav", 1.0)
    (tmp_path / "a.txt").write_text("I got the job\n")
    spy["answer"] = lambda a, p: NEG
    assert run("--model", ckpt, clip, "--task", "classify").exit_code == 0
    assert spy["prompts"] == [build_prompt("classify", Row(id="a", audio="a", corpus="c", speaker="s", split="test",
                                                           transcript="I got the job"), CFG, LABELS)]
    run("--model", ckpt, clip, "--task", "classify", "--no-transcript")
    assert "The speaker says" not in spy["prompts"][-1]
    run("--model", ckpt, clip, "--task", "classify", "--transcript", "we won the cup")
    assert 'The speaker says: "we won the cup"' in spy["prompts"][-1]
    tone(tmp_path / "b.wav", 1.0)
    r = run("--model", ckpt, tmp_path, "--transcript", "x")  # two clips: which one has these words?
    assert r.exit_code == 2 and "--transcript gives the words of one clip" in r.output


def test_folder_lists_every_clip(ckpt, tmp_path, spy):
    folder = tmp_path / "clips"
    folder.mkdir()
    tone(folder / "b.wav", 1.0)
    tone(folder / "a.flac", 0.5, sr=22_050)
    (folder / "notes.txt").write_text("not audio, ignored")
    spy["answer"] = lambda a, p: REPLY if "<response>" in p else NEG
    r = run("--model", ckpt, folder, "--json")
    assert r.exit_code == 0, r.output
    res = json_lines(r)
    assert [x["clip"].rsplit("/", 1)[-1] for x in res] == ["a.flac", "b.wav"]
    assert [x["label"] for x in res] == ["negative", "negative"] and res[0]["sample_rate"] == 22_050
    r = run("--model", ckpt, folder, "--task", "respond")
    assert r.exit_code == 0 and "a.flac" in r.output and "b.wav" in r.output and "That sounds hard." in r.output
    assert "sentiment" not in r.output  # respond only: no label row


@pytest.mark.parametrize("case, message", [
    ("missing_model", "checkpoint folder not found"),
    ("missing_clip", "no such file or folder"),
    ("empty_folder", "no audio files"),
    ("not_audio", "unreadable audio"),
    ("bad_task", "--task must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, case, message):
    good = tone(tmp_path / "ok.wav", 0.5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.wav").write_text("this is text, not audio")
    args = {"missing_model": ["--model", tmp_path / "no_such_ckpt", good],
            "missing_clip": ["--model", ckpt, tmp_path / "nowhere.wav"],
            "empty_folder": ["--model", ckpt, tmp_path / "empty"],
            "not_audio": ["--model", ckpt, tmp_path / "fake.wav"],
            "bad_task": ["--model", ckpt, good, "--task", "dance"]}[case]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]  # one line, holding the reason
    assert message in line, r.output
    if case != "missing_model":  # bad input is found before the model is loaded
        assert "audio window" not in r.output and "Loading weights" not in r.output


def test_folder_with_a_bad_file_answers_the_rest_then_fails(ckpt, tmp_path, spy):
    tone(tmp_path / "good.wav", 0.5)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....garbage")
    spy["answer"] = lambda a, p: REPLY if "<response>" in p else NEG
    r = run("--model", ckpt, tmp_path, "--json")
    assert r.exit_code == 2
    assert [x["clip"].rsplit("/", 1)[-1] for x in json_lines(r)] == ["good.wav"]
    assert "1 of 2 clips could not be read" in r.output and "broken.wav" in r.output


def trained_with(ckpt, prompt_cfg, where):
    """A copy of the test checkpoint whose pallm.json says it was trained with `prompt_cfg`."""
    import shutil

    meta = json.loads((ckpt / "pallm.json").read_text())
    meta["task_format"] = prompt_cfg.model_dump()
    shutil.copytree(ckpt, where)
    (where / "pallm.json").write_text(json.dumps(meta))
    return where


@pytest.mark.parametrize("switch", ["speaker_reference", "speaker_norm"])
def test_a_reference_model_needs_reference_and_hears_every_window_against_it(ckpt, tmp_path, monkeypatch, switch):
    """speaker_reference: each window is played after the reference, under the reference prompt;
    speaker_norm: each window is normalised by the reference, under the plain prompt."""
    from pallm.model import SpeakerNormalized

    model_dir = trained_with(ckpt, PromptConfig(**{switch: True}), tmp_path / "ref_ckpt")
    clip, ref = tone(tmp_path / "long.wav", 9.0), tone(tmp_path / "me.wav", 1.0, amp=lambda t: 0.1 + 0 * t)
    r = run("--model", model_dir, clip, "--task", "classify")
    assert r.exit_code == 2 and "--reference" in r.output and f"prompt.{switch}" in r.output
    assert "Traceback" not in r.output
    seen = []

    def fake(model, processor, audios, prompts, **kw):
        seen.extend(zip(audios, prompts))
        return [NEG] * len(prompts)

    monkeypatch.setattr(pallm.model, "generate", fake)
    r = run("--model", model_dir, clip, "--task", "classify", "--reference", ref, "--json")
    assert r.exit_code == 0, r.output
    assert len(seen) == 3  # a 9 s clip in the 4 s window: three windows
    for audio, prompt in seen:
        if switch == "speaker_norm":
            assert isinstance(audio, SpeakerNormalized)
            reference, window = audio.reference, audio.clip
        else:
            reference, window = audio
        assert len(reference) == 16_000 and np.allclose(np.abs(reference).max(), 0.1, atol=1e-3)
        assert np.allclose(np.abs(window).max(), 0.3, atol=1e-3)
        assert prompt.startswith("The first recording is the same speaker") == (switch == "speaker_reference")


def test_help():
    r = runner.invoke(app, ["chat", "--help"])
    assert r.exit_code == 0 and "--transcript" in r.output and "--task" in r.output


def test_split_windows_and_majority():
    wav = np.arange(16_000 * 9, dtype=np.float32)
    wins = chat_mod.split_windows(wav, 4.0)
    assert [(a, b, len(w)) for a, b, w in wins] == [(0.0, 3.0, 48_000), (3.0, 6.0, 48_000), (6.0, 9.0, 48_000)]
    assert np.array_equal(np.concatenate([w for _, _, w in wins]), wav)  # nothing dropped, nothing twice
    assert len(chat_mod.split_windows(wav[:64_000], 4.0)) == 1 and len(chat_mod.split_windows(wav[:64_001], 4.0)) == 2
    assert chat_mod.majority(["a", "b", "a", None]) == ("a", {"a": 2, "b": 1})
    assert chat_mod.majority(["a", "b"]) == (None, {"a": 1, "b": 1})
    assert chat_mod.majority([None]) == (None, {})
