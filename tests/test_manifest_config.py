import json

import numpy as np
import pytest
import soundfile as sf

from pallm.config import build_config, parse_overrides
from pallm.pipeline import RunConfig
from pallm.data.audio import load_audio
from pallm.data.manifest import Row, read_manifest, write_manifest
from pallm.errors import AudioError, ConfigError, ManifestError


def _row(i, **kw):
    base = dict(id=f"u{i}", audio=f"a{i}.wav", corpus="mine", speaker="s1", split="train",
                emotion="Happy", sentiment="positive", transcript="hi")
    base.update(kw)
    return base


def test_manifest_roundtrip_resolves_audio_and_lowercases(tmp_path):
    write_manifest([Row(**_row(0)), _row(1, split="test", custom="kept")], tmp_path)
    rows = read_manifest(tmp_path)
    assert [r.id for r in rows] == ["u0", "u1"]
    assert rows[0].audio == str(tmp_path / "a0.wav")
    assert rows[0].emotion == "happy"
    assert rows[1].model_extra["custom"] == "kept"
    assert [r.id for r in read_manifest(tmp_path / "manifest.jsonl", split="test")] == ["u1"]


def test_manifest_refuses_overwrite(tmp_path):
    write_manifest([_row(0)], tmp_path)
    with pytest.raises(ManifestError, match="--overwrite"):
        write_manifest([_row(1)], tmp_path)
    write_manifest([_row(1)], tmp_path, overwrite=True)
    assert [r.id for r in read_manifest(tmp_path)] == ["u1"]


@pytest.mark.parametrize("line, msg", [
    ("{not json", "not valid JSON"),
    (json.dumps(_row(0, split="training")), "field 'split'"),
    (json.dumps(_row(0, sentiment="happy")), "field 'sentiment'"),
    (json.dumps({k: v for k, v in _row(0).items() if k != "speaker"}), "field 'speaker'"),
])
def test_manifest_errors_name_file_and_line(tmp_path, line, msg):
    (tmp_path / "manifest.jsonl").write_text(json.dumps(_row(9)) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=msg) as e:
        read_manifest(tmp_path)
    assert "manifest.jsonl:2" in str(e.value)


def test_manifest_duplicate_ids_and_missing_split(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps(_row(0)) + "\n" + json.dumps(_row(0)) + "\n")
    with pytest.raises(ManifestError, match="duplicate id 'u0'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(_row(0)) + "\n")
    with pytest.raises(ManifestError, match="no rows with split 'test'"):
        read_manifest(tmp_path, split="test")
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")


def test_overrides_parse_and_validate():
    assert parse_overrides(["data.synth.n=50", "seed=1", "data.corpus=x/y"]) == {
        "data": {"synth": {"n": 50}, "corpus": "x/y"}, "seed": 1}
    cfg = build_config(RunConfig, overrides=["seed=3", "data.synth.n=100"])
    assert cfg.seed == 3 and cfg.data.synth.n == 100
    with pytest.raises(ConfigError, match="data.synth.nn"):
        build_config(RunConfig, overrides=["data.synth.nn=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["seed"])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(RunConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        build_config(RunConfig, tmp_path / "missing.yaml")


def test_load_audio_resamples_downmixes_and_rejects_broken(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), np.zeros_like(t)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 44100)
    mono = load_audio(tmp_path / "s.wav")
    assert mono.dtype == np.float32 and abs(len(mono) - 16000) <= 1
    assert np.abs(mono).max() == pytest.approx(0.5, abs=0.02)  # averaged with the silent channel
    left = load_audio(tmp_path / "s.wav", channel=0)
    assert np.abs(left).max() == pytest.approx(1.0, abs=0.02)
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(AudioError, match="broken.wav: unreadable"):
        load_audio(tmp_path / "broken.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_merge_manifests_makes_paths_absolute_and_rejects_id_clash(tmp_path):
    from pallm.data.manifest import merge_manifests

    write_manifest([_row(0, corpus="a")], tmp_path / "a")
    write_manifest([_row(1, corpus="b")], tmp_path / "b")
    merge_manifests([tmp_path / "a", tmp_path / "b" / "manifest.jsonl"], tmp_path / "ab")
    rows = read_manifest(tmp_path / "ab")
    assert [r.corpus for r in rows] == ["a", "b"]
    assert rows[0].audio == str(tmp_path / "a" / "a0.wav")
    write_manifest([_row(0, corpus="c")], tmp_path / "c")
    with pytest.raises(ManifestError, match="id 'u0' also in"):
        merge_manifests([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
