"""`pallm data prepare` backends on fixture trees with the real release layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures_corpora import (
    IEMOCAP_CORRUPT,
    IEMOCAP_NO_TRANSCRIPT,
    make_expresso,
    make_iemocap,
    make_ravdess,
    text,
)

from pallm.data.corpora import CORPORA, PrepareReport, prepare_corpus
from pallm.data.manifest import read_manifest
from pallm.data.taxonomy import load_taxonomy, map_label
from pallm.errors import ConfigError, CorpusLayoutError, ManifestError

BUILDERS = {"iemocap": make_iemocap, "ravdess": make_ravdess, "expresso": make_expresso}


def by_id(out: Path) -> dict:
    return {r.id: r for r in read_manifest(out)}


# ------------------------------------------------------------------ IEMOCAP
def test_iemocap_standard_4class(tmp_path):
    root = make_iemocap(tmp_path)
    out = tmp_path / "out"
    report = prepare_corpus("iemocap", root, out, test_session=2, dev_session=None)

    rows = by_id(out)
    assert sorted(rows) == sorted(
        f"iemocap_{u}"
        for u in ["Ses01F_impro01_F000", "Ses01F_impro01_M000", "Ses01F_impro01_F001",
                  "Ses01M_script01_1_M012", "Ses02F_impro02_F000"]
    )
    assert report.kept == 5
    # hap and exc merge into happy; emotion/sentiment come through the protocol + taxonomy
    r = rows["iemocap_Ses01F_impro01_F001"]
    assert (r.emotion, r.sentiment, r.label) == ("happy", "positive", "exc")
    assert (rows["iemocap_Ses01M_script01_1_M012"].emotion, rows["iemocap_Ses01M_script01_1_M012"].sentiment) == (
        "angry", "negative")
    assert rows["iemocap_Ses02F_impro02_F000"].sentiment == "negative"
    # speaker from the LAST id field, not from the session's F/M
    m000 = rows["iemocap_Ses01F_impro01_M000"]
    assert (m000.speaker, m000.gender) == ("iemocap_S1M", "male")
    assert (rows["iemocap_Ses01F_impro01_F000"].speaker, rows["iemocap_Ses01F_impro01_F000"].gender) == (
        "iemocap_S1F", "female")
    assert {r.fold for r in rows.values()} == {1, 2}
    assert {r.id: r.split for r in rows.values() if r.split == "test"} == {"iemocap_Ses02F_impro02_F000": "test"}
    assert rows["iemocap_Ses01F_impro01_F000"].transcript == "Excuse me."
    assert rows["iemocap_Ses01F_impro01_F001"].transcript == "Yeah. [LAUGHTER]"
    assert rows[f"iemocap_{IEMOCAP_NO_TRANSCRIPT}"].transcript is None
    assert report.notes == {"missing_transcript": 1}
    # audio referenced in place, absolute, with a duration from the header
    r = rows["iemocap_Ses01F_impro01_F000"]
    assert os.path.isabs(r.audio) and Path(r.audio) == root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert r.duration == pytest.approx(0.25, abs=1e-3)
    assert not any(p.suffix == ".wav" for p in out.iterdir())
    # what was left out, and why
    assert report.skipped == {"not_in_protocol": 4, "junk_label_line": 1, "unreadable_audio": 1}
    assert report.dropped_labels == {"fru": 1, "xxx": 1, "sur": 1, "dis": 1}
    assert any(IEMOCAP_CORRUPT in e for e in report.examples["unreadable_audio"])
    assert report.examples["junk_label_line"][0].endswith("Ses01F_impro01.txt:" + str(
        (root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt").read_text().splitlines().index(
            "[12.0 - oops this line is broken") + 1))
    assert report.emotions == {"angry": 1, "happy": 2, "neutral": 1, "sad": 1}
    assert report.splits == {"train": 4, "test": 1} and report.speakers == 3
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["kept"] == 5 and saved["skipped"]["not_in_protocol"] == 4
    assert "kept 5 rows" in report.summary() and "not_in_protocol: 4" in report.summary()


def test_iemocap_default_splits_and_protocol_all(tmp_path):
    root = make_iemocap(tmp_path)
    report = prepare_corpus("iemocap", root, tmp_path / "out", protocol="all")
    rows = by_id(tmp_path / "out")
    assert report.kept == 7  # + fru, dis; xxx and sur have no sentiment in the taxonomy
    assert report.skipped["unmapped_label"] == 2 and report.dropped_labels == {"xxx": 1, "sur": 1}
    assert (rows["iemocap_Ses01F_impro01_F001"].emotion, rows["iemocap_Ses01F_impro01_M001"].emotion) == (
        "excited", "frustrated")
    assert rows["iemocap_Ses01F_impro01_M001"].sentiment == "negative"
    # default: session 5 test, 4 dev, 1-3 train -> sessions 1 and 2 are all train
    assert report.splits == {"train": 7}


def test_taxonomy_override_merges_over_default(tmp_path):
    root = make_iemocap(tmp_path)
    override = text(tmp_path / "tax.yaml", "iemocap:\n  sur: {emotion: surprised, sentiment: positive}\n")
    report = prepare_corpus("iemocap", root, tmp_path / "out", taxonomy_path=override, protocol="all")
    assert report.kept == 8
    assert by_id(tmp_path / "out")["iemocap_Ses01M_script01_1_F003"].sentiment == "positive"
    assert report.dropped_labels == {"xxx": 1}  # other labels still come from the default


def test_iemocap_duplicate_label_line_is_counted(tmp_path):
    root = make_iemocap(tmp_path)
    extra = root / "Session1/dialog/EmoEvaluation/Ses01F_impro01_copy.txt"
    text(extra, "[6.2901 - 8.2357]\tSes01F_impro01_F000\tang\t[2.5000, 2.5000, 2.5000]\n")
    report = prepare_corpus("iemocap", root, tmp_path / "out")
    assert report.skipped["duplicate_id"] == 1 and report.kept == 5
    assert by_id(tmp_path / "out")["iemocap_Ses01F_impro01_F000"].emotion == "neutral"  # first kept


def test_iemocap_bad_options(tmp_path):
    root = make_iemocap(tmp_path)
    with pytest.raises(ConfigError, match="protocol"):
        prepare_corpus("iemocap", root, tmp_path / "o", protocol="7class")
    with pytest.raises(ConfigError, match="different sessions"):
        prepare_corpus("iemocap", root, tmp_path / "o", test_session=3, dev_session=3)
    with pytest.raises(ConfigError, match="unknown option.*include_song"):
        prepare_corpus("iemocap", root, tmp_path / "o", include_song=True)
    with pytest.raises(ConfigError, match="unknown corpus"):
        prepare_corpus("crema", root, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ RAVDESS
def test_ravdess(tmp_path):
    root = make_ravdess(tmp_path)
    out = tmp_path / "out"
    report = prepare_corpus("ravdess", root, out)
    rows = by_id(out)
    assert sorted(rows) == sorted(
        f"ravdess_{s}" for s in ["03-01-01-01-01-01-01", "03-01-02-02-02-01-01", "03-01-03-01-02-02-02",
                                 "03-01-04-02-01-01-02", "03-01-05-01-01-01-17", "03-01-07-01-01-01-21"]
    )
    calm = rows["ravdess_03-01-02-02-02-01-01"]
    assert (calm.emotion, calm.sentiment, calm.intensity) == ("calm", "neutral", "strong")
    assert calm.transcript == "Dogs are sitting by the door"
    assert rows["ravdess_03-01-01-01-01-01-01"].transcript == "Kids are talking by the door"
    assert (rows["ravdess_03-01-07-01-01-01-21"].emotion, rows["ravdess_03-01-07-01-01-01-21"].sentiment) == (
        "disgusted", "negative")
    assert rows["ravdess_03-01-03-01-02-02-02"].sentiment == "positive"
    # speakers, genders (odd = male), folds of 4 actors, speaker-independent splits
    a01, a02 = rows["ravdess_03-01-01-01-01-01-01"], rows["ravdess_03-01-04-02-01-01-02"]
    assert (a01.speaker, a01.gender, a02.speaker, a02.gender) == ("ravdess_A01", "male", "ravdess_A02", "female")
    folds = {r.speaker: (r.fold, r.split) for r in rows.values()}
    assert folds == {"ravdess_A01": (1, "train"), "ravdess_A02": (1, "train"),
                     "ravdess_A17": (5, "dev"), "ravdess_A21": (6, "test")}
    assert report.skipped == {"unmapped_label": 1, "song_excluded": 1, "malformed_name": 3,
                              "empty_audio": 1, "not_audio_only": 1}
    assert report.dropped_labels == {"surprised": 1}
    assert any("03-01-03-01-01-01.wav" in e for e in report.examples["malformed_name"])
    assert any("03-01-05-01-01-01-03.wav" in e for e in report.examples["malformed_name"])  # wrong folder


def test_ravdess_include_song_and_folds(tmp_path):
    root = make_ravdess(tmp_path)
    report = prepare_corpus("ravdess", root, tmp_path / "out", include_song=True, dev_fold=None, test_fold=5)
    rows = by_id(tmp_path / "out")
    song = rows["ravdess_03-02-03-01-01-01-01"]
    assert (song.vocal_channel, song.emotion) == ("song", "happy")
    assert "song_excluded" not in report.skipped and report.kept == 7
    assert report.splits == {"train": 6, "test": 1}


# ------------------------------------------------------------------ Expresso
def test_expresso(tmp_path):
    root = make_expresso(tmp_path)
    out = tmp_path / "out"
    report = prepare_corpus("expresso", root, out)
    rows = by_id(out)
    assert sorted(rows) == sorted([
        "expresso_ex01_happy_00001", "expresso_ex01_happy_00002", "expresso_ex01_default_emphasis_00003",
        "expresso_ex01_default_longform_00001", "expresso_ex02_whisper_00001",
        "expresso_ex01-ex02_laughing_001_ch0", "expresso_ex01-ex02_laughing_001_ch1",
        "expresso_ex03-ex02_sad-sympathetic_003_ch0",
    ])
    assert {k: r.split for k, r in rows.items()} == {
        "expresso_ex01_happy_00001": "train", "expresso_ex01_happy_00002": "dev",
        "expresso_ex01_default_emphasis_00003": "train",
        "expresso_ex01_default_longform_00001": "dev",  # listed in train and dev by segment
        "expresso_ex02_whisper_00001": "test",
        "expresso_ex01-ex02_laughing_001_ch0": "test", "expresso_ex01-ex02_laughing_001_ch1": "test",
        "expresso_ex03-ex02_sad-sympathetic_003_ch0": "train",
    }
    assert report.notes["split_by_segment"] == 2
    # styles are the labels
    w = rows["expresso_ex02_whisper_00001"]
    assert (w.emotion, w.sentiment, w.speaker, w.transcript) == ("whisper", "neutral", "expresso_ex02", "Quiet, please.")
    assert rows["expresso_ex01_happy_00001"].transcript == "I love this!"  # emphasis marks removed
    assert rows["expresso_ex01_default_emphasis_00003"].emotion == "default"
    # conversational: one row per channel, speaker and style of that channel
    ch0, ch1 = rows["expresso_ex01-ex02_laughing_001_ch0"], rows["expresso_ex01-ex02_laughing_001_ch1"]
    assert (ch0.channel, ch0.speaker, ch1.channel, ch1.speaker) == (0, "expresso_ex01", 1, "expresso_ex02")
    assert ch0.audio == ch1.audio and (ch0.emotion, ch0.sentiment) == ("laughing", "positive")
    sad = rows["expresso_ex03-ex02_sad-sympathetic_003_ch0"]
    assert (sad.speaker, sad.emotion, sad.sentiment) == ("expresso_ex03", "sad", "negative")
    assert report.skipped == {"unmapped_label": 4, "not_in_splits": 1, "malformed_name": 1, "not_stereo": 2}
    # abbreviations in conversational names are expanded before the taxonomy lookup
    assert report.dropped_labels == {"confused": 1, "sympathetic": 1, "animal": 1, "animal_directed": 1}
    assert report.speakers == 3  # ex01, ex02, ex03
    # channel survives the manifest round trip and load_audio can use it
    line = next(json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if "_ch1" in x)
    assert line["channel"] == 1


def test_expresso_without_conversational_and_missing_splits(tmp_path):
    root = make_expresso(tmp_path)
    report = prepare_corpus("expresso", root, tmp_path / "out", include_conversational=False)
    assert report.kept == 5 and "not_stereo" not in report.skipped
    (root / "splits" / "dev.txt").unlink()
    with pytest.raises(CorpusLayoutError, match=r"splits/dev.txt: Expresso split file missing"):
        prepare_corpus("expresso", root, tmp_path / "out2")


# ------------------------------------------------------------------ shared behaviour
@pytest.mark.parametrize(
    "corpus, wrong, right",
    [
        ("iemocap", ".", "IEMOCAP_full_release"),  # one level too high
        ("iemocap", "IEMOCAP_full_release/Session1", "IEMOCAP_full_release"),  # too low
        ("ravdess", "Audio_Speech_Actors_01-24/Actor_01", "Audio_Speech_Actors_01-24"),
        ("expresso", "expresso/audio_48khz", "expresso"),
        ("expresso", ".", "expresso"),
    ],
)
def test_wrong_root_level_suggests_the_right_folder(tmp_path, corpus, wrong, right):
    BUILDERS[corpus](tmp_path)
    with pytest.raises(CorpusLayoutError) as e:
        prepare_corpus(corpus, tmp_path / wrong, tmp_path / "out")
    msg = str(e.value)
    assert f"Did you mean --root {(tmp_path / right).resolve()}?" in msg
    assert not (tmp_path / "out").exists()


def test_missing_empty_and_foreign_root(tmp_path):
    with pytest.raises(CorpusLayoutError, match="does not exist"):
        prepare_corpus("ravdess", tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusLayoutError, match="is empty"):
        prepare_corpus("ravdess", tmp_path / "empty", tmp_path / "out")
    make_expresso(tmp_path / "other")  # a real corpus, but not the one asked for
    with pytest.raises(CorpusLayoutError, match="not a RAVDESS audio release.*Actor_01"):
        prepare_corpus("ravdess", tmp_path / "other", tmp_path / "out")


def test_no_usable_rows_writes_nothing(tmp_path):
    root = tmp_path / "Audio_Speech_Actors_01-24"
    text(root / "Actor_01" / "03-01-08-01-01-01-01.wav", "")  # surprised (dropped) and empty
    with pytest.raises(CorpusLayoutError, match="no usable ravdess utterances.*unmapped_label 1"):
        prepare_corpus("ravdess", root, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_existing_manifest_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    prepare_corpus("ravdess", make_ravdess(tmp_path), out)
    before = (out / "manifest.jsonl").read_bytes()
    iemocap = make_iemocap(tmp_path)
    with pytest.raises(ManifestError, match="exists. Pass --overwrite"):
        prepare_corpus("iemocap", iemocap, out)
    assert (out / "manifest.jsonl").read_bytes() == before
    assert json.loads((out / "prepare_report.json").read_text())["corpus"] == "ravdess"
    report = prepare_corpus("iemocap", iemocap, out, overwrite=True)
    assert {r.corpus for r in read_manifest(out)} == {"iemocap"} and report.kept == 5


def test_existing_manifest_fails_before_scanning(tmp_path, monkeypatch):
    out = tmp_path / "out"
    text(out / "manifest.jsonl", "{}\n")

    def scan_must_not_run(*a, **k):
        raise AssertionError("scanned a release although the output would be refused")

    monkeypatch.setattr(CORPORA["ravdess"], "scan", scan_must_not_run)
    with pytest.raises(ManifestError, match="exists"):
        prepare_corpus("ravdess", make_ravdess(tmp_path), out)


def test_check_audio_off_skips_header_reads(tmp_path):
    root = make_iemocap(tmp_path)
    report = prepare_corpus("iemocap", root, tmp_path / "out", check_audio=False)
    rows = by_id(tmp_path / "out")
    assert report.kept == 6 and f"iemocap_{IEMOCAP_CORRUPT}" in rows  # not opened, so not caught
    assert all(r.duration is None for r in rows.values())
    os.unlink(rows["iemocap_Ses01F_impro01_F000"].audio)  # existence is still checked
    report = prepare_corpus("iemocap", root, tmp_path / "out", check_audio=False, overwrite=True)
    assert report.skipped["missing_audio"] == 1 and report.kept == 5


def test_taxonomy_choices_and_validation(tmp_path):
    assert map_label("iemocap", "exc") == ("excited", "positive")
    assert map_label("iemocap", "fru") == ("frustrated", "negative")
    assert map_label("iemocap", "xxx") is None
    assert map_label("ravdess", "calm") == ("calm", "neutral")
    assert map_label("ravdess", "surprised") is None
    assert map_label("expresso", "whisper") == ("whisper", "neutral")
    assert map_label("expresso", "laughing") == ("laughing", "positive")
    assert map_label("expresso", "confused") is None
    assert map_label("expresso", "no_such_style") is None  # unknown labels are never guessed
    tax = load_taxonomy()
    assert set(CORPORA) <= set(tax)
    bad = text(tmp_path / "bad.yaml", "ravdess:\n  calm: {emotion: calm, sentiment: relaxed}\n")
    with pytest.raises(ConfigError, match="bad.yaml: ravdess.calm: sentiment 'relaxed'"):
        load_taxonomy(bad)
    mine = text(tmp_path / "mine.yaml", "mycorpus:\n  Joy: {emotion: Happy, sentiment: positive}\n")
    assert map_label("mycorpus", "joy", load_taxonomy(mine)) == ("happy", "positive")
    load_taxonomy(text(tmp_path / "drop.yaml", "ravdess:\n  calm: null\n"))
    assert map_label("ravdess", "calm") == ("calm", "neutral")  # an override never leaks into the default


def test_report_summary_lists_reasons():
    r = PrepareReport(corpus="x", root="/r", out="/o")
    for i in range(8):
        r.skip("unmapped_label", f"f{i}", "sur")
    r.count_rows([{"emotion": "sad", "sentiment": "negative", "split": "test", "speaker": "a"}])
    assert r.skipped == {"unmapped_label": 8} and len(r.examples["unmapped_label"]) == 5
    s = r.summary()
    assert "kept 1 rows from 1 speakers" in s and "unmapped_label: 8 (e.g. f0, f1)" in s and "sur 8" in s
