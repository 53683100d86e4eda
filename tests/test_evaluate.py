"""pallm.evaluate: metrics checked against hand-computed values, predict/probes on a tiny model and
on scripted fake models (a pure listener and a pure reader), and the two no-LLM baselines."""

from __future__ import annotations

import hashlib
import importlib
import json
import re

import numpy as np
import pandas as pd
import pytest

from pallm.data.audio import load_audio
from pallm.data.manifest import Row, read_manifest
from pallm.data.parasynth import SynthConfig, synthesize
from pallm.data.parasynth.generate import plan_corpus
from pallm.errors import PallmError
from pallm.evaluate import (
    UNPARSED,
    Prediction,
    acknowledges_affect,
    acoustic_baseline,
    classification_metrics,
    distinct_n,
    fold_metrics,
    follows_words_rate,
    predict,
    response_metrics,
    same_words_partners,
    shortcut_probes,
    speaker_normalise,
    text_baseline,
    write_eval,
)
from pallm.evaluate.predict import model_audio
from pallm.model import SpeakerNormalized, build_tiny
from pallm.prompts.format import PromptConfig, build_prompt, build_target

LABELS = ["negative", "neutral", "positive"]
CFG = PromptConfig()
# The module, not the `predict` function the package re-exports under the same name.
predict_mod = importlib.import_module("pallm.evaluate.predict")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 ParaSynth utterances: 140 train (6 speakers), 40 test (2 unseen speakers, half conflict)."""
    out = tmp_path_factory.mktemp("ps")
    synthesize(SynthConfig(n=200, seed=2, speakers=8, test_speakers=2, dev_speakers=2, workers=2), out)
    return out, read_manifest(out)


def row(i, gold, lex, congruent, emotion=None, corpus="parasynth", fold=None, speaker="s1"):
    return Row(id=f"r{i}", audio=f"/nowhere/r{i}.wav", corpus=corpus, speaker=speaker, split="test",
               sentiment=gold, emotion=emotion, lexical_sentiment=lex, congruent=congruent,
               transcript=f"sentence {i}", fold=fold)


def pred(r, label, task="classify", output=None, response=None, format_ok=True):
    gold = r.sentiment if task == "classify" else None
    return Prediction(id=r.id, task=task, output=output if output is not None else f"<answer>{label}</answer>",
                      label=label, gold=gold, correct=(label == gold) if gold else None,
                      format_ok=format_ok, cue_claims={}, response=response)


# --- metrics on hand-made predictions ----------------------------------------------------------

# (gold, lexical, congruent, emotion, corpus, predicted)
TABLE = [
    ("positive", "positive", True, "happy", "parasynth", "positive"),   # r1 right
    ("positive", "negative", False, "happy", "parasynth", "negative"),  # r2 wrong, follows words
    ("negative", "negative", True, "sad", "parasynth", "negative"),     # r3 right
    ("negative", "positive", False, "sad", "parasynth", None),          # r4 unparsable
    ("neutral", "neutral", True, "neutral", "parasynth", "neutral"),    # r5 right
    ("neutral", "positive", False, "neutral", "parasynth", "positive"), # r6 wrong, follows words
    ("positive", "neutral", False, "happy", "parasynth", "positive"),   # r7 right
    ("negative", "negative", True, "angry", "other", "negative"),       # r8 right, another corpus
]


@pytest.fixture
def hand():
    rows = [row(i + 1, g, lex, c, emotion=e, corpus=co) for i, (g, lex, c, e, co, _) in enumerate(TABLE)]
    return rows, [pred(r, t[-1]) for r, t in zip(rows, TABLE)]


def test_classification_metrics_match_hand_computation(hand):
    rows, preds = hand
    m = classification_metrics(preds, rows, LABELS)
    s = m["subsets"]
    # all: 5 of 8 right. Recall pos 2/3, neg 2/3, neu 1/2 -> UA 11/18. F1 per class: pos P2/3 R2/3,
    # neg P2/3 R2/3, neu P1 R1/2 -> all 2/3. One unparsable output -> parse rate 7/8.
    assert s["all"] == pytest.approx({"n": 8, "ua": 11 / 18, "wa": 5 / 8, "macro_f1": 2 / 3, "parse_rate": 7 / 8})
    assert s["congruent"] == pytest.approx({"n": 4, "ua": 1.0, "wa": 1.0, "macro_f1": 1.0, "parse_rate": 1.0})
    # conflict r2 r4 r6 r7: recall pos 1/2, neg 0, neu 0 -> UA 1/6; F1 pos 1/2, others 0 -> 1/6.
    assert s["conflict"] == pytest.approx({"n": 4, "ua": 1 / 6, "wa": 1 / 4, "macro_f1": 1 / 6, "parse_rate": 3 / 4})
    assert s["corpus:other"]["n"] == 1 and s["corpus:parasynth"]["n"] == 7
    assert s["emotion:sad"] == pytest.approx({"n": 2, "accuracy": 0.5, "parse_rate": 0.5})
    assert s["emotion:happy"]["accuracy"] == pytest.approx(2 / 3)
    assert m["confusion"] == {"labels": LABELS, "matrix": [[2, 0, 0], [0, 1, 1], [1, 0, 2]], "unparsed": [1, 0, 0]}
    # Conflict rows: r2 and r6 answer the words' sentiment, r4 (unparsable) and r7 do not.
    assert m["follows_words_rate"] == {"n": 4, "rate": 0.5}


def test_unparsable_counts_as_wrong_and_single_corpus_has_no_corpus_subsets(hand):
    rows, preds = hand
    rows = rows[:7]  # one corpus only
    garbage = [pred(r, None, output="@@ nonsense") for r in rows]
    s = classification_metrics(garbage, rows, LABELS)["subsets"]
    assert s["all"]["ua"] == s["all"]["wa"] == s["all"]["macro_f1"] == s["all"]["parse_rate"] == 0.0
    assert not any(k.startswith("corpus:") for k in s)
    # Dropping the unparsable row would lift UA; counting it as wrong must not.
    fixed = [pred(r, r.sentiment if p.label is None else p.label) for r, p in zip(rows, preds[:7])]
    assert classification_metrics(fixed, rows, LABELS)["subsets"]["all"]["ua"] > \
        classification_metrics(preds[:7], rows, LABELS)["subsets"]["all"]["ua"]
    assert UNPARSED not in LABELS


def test_follows_words_rate_maps_emotions_to_sentiment():
    rows = [row(1, "negative", "positive", False, emotion="sad"),
            row(2, "positive", "negative", False, emotion="happy"),
            row(3, "negative", "neutral", False, emotion="angry"),
            row(4, "positive", "positive", True, emotion="happy")]
    # Emotion-target predictions: "happy" on r1 is the words' sentiment (positive); "sad" on r2 too.
    preds = [Prediction(r.id, "classify", "", lab, r.emotion, lab == r.emotion, True, {}, None)
             for r, lab in zip(rows, ["happy", "sad", "angry", "happy"])]
    assert follows_words_rate(preds, rows) == {"n": 3, "rate": pytest.approx(2 / 3)}
    assert follows_words_rate(preds[3:], rows) is None  # no conflict rows


def test_fold_metrics_per_fold_and_mean():
    rows = [row(1, "positive", "positive", True, fold=1), row(2, "negative", "negative", True, fold=1),
            row(3, "negative", "negative", True, fold=1), row(4, "positive", "positive", True, fold=2),
            row(5, "neutral", "neutral", True, fold=2)]
    preds = [pred(rows[0], "positive"), pred(rows[1], "negative"), pred(rows[2], "positive"),
             pred(rows[3], "positive"), pred(rows[4], None)]
    f = fold_metrics(preds, rows)
    # fold 1: recall pos 1, neg 1/2 -> UA 3/4, WA 2/3. fold 2: UA 1/2, WA 1/2.
    assert f["folds"]["1"] == pytest.approx({"n": 3, "ua": 0.75, "wa": 2 / 3})
    assert f["folds"]["2"] == pytest.approx({"n": 2, "ua": 0.5, "wa": 0.5})
    assert f["mean"] == pytest.approx({"ua": 0.625, "wa": 7 / 12})
    assert fold_metrics(preds, [r.model_copy(update={"fold": None}) for r in rows]) is None


def test_response_metrics_and_judge():
    rows = [row(1, "negative", "negative", True, emotion="sad"), row(2, "positive", "negative", False, emotion="happy"),
            row(3, "neutral", "neutral", True, emotion="neutral")]
    replies = ["I'm so sorry, you sound down.", "Oh no, that is bad news.", "Noted, you sound calm about it."]
    preds = [pred(r, None, task="respond", output=f"<response>{t}</response>", response=t, format_ok=ok)
             for r, t, ok in zip(rows, replies, [True, True, False])]
    seen = {}

    def judge(prompts, completions, **fields):
        seen.update(prompts=prompts, completions=completions, fields=fields)
        return [1.0, 0.0, 0.5]

    m = response_metrics(preds, rows, judge=judge)
    s = m["subsets"]
    assert s["all"]["format_rate"] == pytest.approx(2 / 3)
    # r2's voice is happy but the reply only follows the (negative) words: not acknowledged.
    assert s["all"]["affect_ack_rate"] == pytest.approx(2 / 3)
    assert s["conflict"]["affect_ack_rate"] == 0.0 and s["congruent"]["affect_ack_rate"] == 1.0
    assert s["all"]["judge"] == pytest.approx(0.5) and s["congruent"]["judge"] == pytest.approx(0.75)
    assert m["judge"] == s["all"]["judge"] and m["format_rate"] == s["all"]["format_rate"]  # flat copy of all
    assert seen["fields"]["emotion"] == ["sad", "happy", "neutral"] and seen["completions"][0] == preds[0].output
    assert "Listen to how the speaker sounds" in seen["prompts"][0]
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert acknowledges_affect("You sound fed up.", "angry") and not acknowledges_affect("fed", "angry")
    assert acknowledges_affect("anything", "unknown-label") is None


def test_response_metrics_extra_judges_may_fail_without_failing_the_evaluation():
    rows = [row(1, "negative", "negative", True, emotion="sad"), row(2, "positive", "negative", False, emotion="happy"),
            row(3, "neutral", "neutral", True, emotion="neutral")]
    preds = [pred(r, None, task="respond", output="<response>ok</response>", response="ok") for r in rows]

    def flaky(prompts, completions, **fields):  # an LLM judge: None where a request failed
        return [0.8, None, 0.4]

    def broken(prompts, completions, **fields):
        raise RuntimeError("endpoint down")

    m = response_metrics(preds, rows, judge=lambda p, c, **f: [1.0] * len(c),
                         extra_judges={"llm_judge": flaky, "other": broken})
    assert m["judge"] == 1.0 and m["llm_judge"] == pytest.approx(0.6) and m["llm_judge_failures"] == 1
    assert m["other"] is None and m["other_failures"] == 3
    assert m["subsets"]["conflict"]["llm_judge"] is None and m["subsets"]["conflict"]["llm_judge_failures"] == 1
    assert m["subsets"]["congruent"]["llm_judge"] == pytest.approx(0.6)
    assert "llm_judge" not in response_metrics(preds, rows)  # nothing extra unless asked


def test_write_eval_follows_the_contract(hand, tmp_path):
    rows, preds = hand
    m = classification_metrics(preds, rows, LABELS)
    m["extra"] = {"np_float": np.float64(0.5), "np_array": np.arange(2)}  # extra keys allowed, numpy too
    path = write_eval(tmp_path / "ev", "runs/sft", "data/ps", m, preds)
    doc = json.loads(path.read_text())
    assert list(doc)[:4] == ["model", "data", "subsets", "confusion"]
    assert doc["model"] == "runs/sft" and doc["data"] == "data/ps"
    assert doc["extra"] == {"np_float": 0.5, "np_array": [0, 1]}
    for name in ("all", "congruent", "conflict"):
        assert set(doc["subsets"][name]) == {"n", "ua", "wa", "macro_f1", "parse_rate"}
    assert doc["confusion"]["labels"] == LABELS
    assert np.array(doc["confusion"]["matrix"]).shape == (3, 3)
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 8 and {"id", "output", "label", "gold", "correct"} <= set(first) and first["id"] == "r1"
    assert not [p for p in (tmp_path / "ev").iterdir() if p.name.startswith(".")]  # no temp files left


# --- predict ----------------------------------------------------------------------------------


def test_predict_on_tiny_model_keeps_order_and_survives_garbage(corpus):
    _, rows = corpus
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"][:10]
    texts = [build_target("classify", r, CFG) for r in train[:40]]
    texts += [build_prompt("classify", r, CFG) for r in train[:10]]
    model, processor = build_tiny(texts)
    calls = []
    preds = predict(model, processor, test, "classify", CFG, batch_size=4, max_new_tokens=6,
                    progress=lambda d, t: calls.append((d, t)))
    assert [p.id for p in preds] == [r.id for r in test]
    assert calls[0] == (0, 10) and calls[-1] == (10, 10)
    for p, r in zip(preds, test):
        assert isinstance(p, Prediction) and p.gold == r.sentiment and p.task == "classify"
        assert p.label in LABELS or (p.label is None and p.correct is False)
    # Respond task runs through the same path.
    resp = predict(model, processor, test[:3], "respond", CFG, max_new_tokens=4)
    assert [p.gold for p in resp] == [None] * 3 and all(p.correct is None for p in resp)


def test_predict_parses_each_output_to_its_own_row(corpus, monkeypatch):
    _, rows = corpus
    test = [r for r in rows if r.split == "test"][:12]
    outputs = ["", "<answer>", "positive negative", "<think>pitch level: high</think><answer>positive</answer>",
               "\x00\ufffd<|im_end|>", "<answer>NEGATIVE!</answer>"]

    def fake_generate(model, processor, audios, prompts, **kw):
        assert kw["do_sample"] is False and len(audios) == len(prompts) <= 5
        # The audio_fn below encodes the row index in the clip's first sample.
        return [f"{int(round(a[0] * 1000))}|" + outputs[int(round(a[0] * 1000)) % len(outputs)]
                for a in audios]

    monkeypatch.setattr(predict_mod, "generate", fake_generate)
    index = {r.id: i for i, r in enumerate(test)}
    preds = predict(None, None, test, "classify", CFG, batch_size=5,
                    audio_fn=lambda r: np.full(1600, index[r.id] / 1000, np.float32))
    for i, (p, r) in enumerate(zip(preds, test)):
        assert p.id == r.id and p.output.startswith(f"{i}|")
    labels = [p.label for p in preds[:6]]
    assert labels == [None, None, None, "positive", None, "negative"]
    assert preds[3].cue_claims == {"pitch_level": "high"}
    assert all(p.correct is False for p in preds if p.label is None)


def test_predict_emotion_target_takes_labels_from_the_rows(corpus, monkeypatch):
    _, rows = corpus
    test = [r for r in rows if r.split == "test"][:8]
    cfg = PromptConfig(target="emotion")
    seen = []

    def fake_generate(model, processor, audios, prompts, **kw):
        seen.extend(prompts)
        return ["<answer>happy</answer>"] * len(prompts)

    monkeypatch.setattr(predict_mod, "generate", fake_generate)
    preds = predict(None, None, test, "classify", cfg)
    assert "emotion inside <answer></answer>: " + ", ".join(sorted({r.emotion for r in test})) in seen[0]
    assert [p.gold for p in preds] == [r.emotion for r in test]
    assert [p.correct for p in preds] == [r.emotion == "happy" for r in test]


# --- probes: scripted listener and reader -------------------------------------------------------


def _key(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def probe_rows(corpus):
    _, rows = corpus
    return [r for r in rows if r.split == "test"]


def _fake(kind, rows):
    """A listener answers the voice label of the clip it hears (nothing for silence); a reader
    answers the words' sentiment of the transcript in its prompt and ignores the audio."""
    voice = {_key(load_audio(r.audio)): r.sentiment for r in rows}
    words = {r.transcript: r.lexical_sentiment for r in rows}

    def generate(model, processor, audios, prompts, **kw):
        if kind == "listener":
            return [f"<answer>{voice[_key(a)]}</answer>" if _key(a) in voice else "..." for a in audios]
        said = [re.search(r'says: "(.*)"', p).group(1) for p in prompts]
        return [f"<answer>{words[t]}</answer>" for t in said]

    return generate


def test_same_words_partners_prefer_a_different_voice(probe_rows):
    partners = same_words_partners(probe_rows, CFG)
    assert partners and len(partners) < len(probe_rows) + 1
    for rid, o in partners.items():
        r = next(x for x in probe_rows if x.id == rid)
        assert o.id != r.id and o.transcript == r.transcript
        alternatives = {x.sentiment for x in probe_rows if x.transcript == r.transcript and x.id != r.id}
        if alternatives - {r.sentiment}:
            assert o.sentiment != r.sentiment


def test_same_words_partner_choice_on_hand_made_rows():
    rows = [row(1, "positive", "positive", True, speaker="a"), row(2, "positive", "positive", True, speaker="b"),
            row(3, "negative", "positive", False, speaker="a"), row(4, "neutral", "neutral", True, speaker="b")]
    for r in rows[:3]:
        r.transcript = "The  same words."
    rows[2].transcript = "the same words."  # case and spacing do not make other words
    partners = {k: v.id for k, v in same_words_partners(rows, CFG).items()}
    # r1, r2 -> r3 (the other voice label); r3 -> r2 (both differ in label; r2 is another speaker).
    assert partners == {"r1": "r3", "r2": "r3", "r3": "r2"}


def test_probes_tell_a_listener_from_a_reader(probe_rows, monkeypatch):
    monkeypatch.setattr(predict_mod, "generate", _fake("listener", probe_rows))
    lis = shortcut_probes(None, None, probe_rows, CFG, batch_size=8)
    assert lis["real"]["ua"] == 1.0 and lis["conflict_vs_congruent"]["gap"] == 0.0
    assert lis["silence"]["voice_dependence"] == lis["voice_dependence"] == 1.0 and lis["silence"]["ua"] == 0.0
    sw = lis["same_words"]
    assert sw["n"] + sw["skipped"] == len(probe_rows) and sw["n"] > 0 and sw["n_different_voice"] > 0
    assert sw["follows_partner_voice"] == 1.0 and sw["unchanged"] < 1.0
    assert lis["follows_words"]["rate"] == 0.0

    monkeypatch.setattr(predict_mod, "generate", _fake("reader", probe_rows))
    rea = shortcut_probes(None, None, probe_rows, CFG, batch_size=8)
    assert rea["conflict_vs_congruent"]["congruent_ua"] == 1.0 and rea["conflict_vs_congruent"]["conflict_ua"] == 0.0
    assert rea["silence"]["voice_dependence"] == 0.0
    # The other clip moves nothing: any match with its voice is the words' sentiment by chance.
    partners = same_words_partners(probe_rows, CFG)
    chance = np.mean([r.lexical_sentiment == partners[r.id].sentiment for r in probe_rows
                      if r.id in partners and partners[r.id].sentiment != r.sentiment])
    assert rea["same_words"]["unchanged"] == 1.0 and rea["same_words"]["follows_partner_voice"] == pytest.approx(chance)
    assert chance < 1.0
    assert rea["follows_words"]["rate"] == 1.0


def test_a_reference_model_hears_its_speakers_reference_and_probes_replace_only_the_clip(probe_rows, monkeypatch):
    """With prompt.speaker_reference every request is (reference, clip): the reference is always the
    row's own speaker's, also when a probe swaps the clip for silence or another voice."""
    first = {}
    for r in probe_rows:
        first.setdefault(r.speaker, r.audio)
    rows = [r.model_copy(update={"reference_audio": first[r.speaker]}) for r in probe_rows]
    refs = {_key(load_audio(a)): spk for spk, a in first.items()}
    by_prompt = {}  # the same sentence may come from several speakers
    cfg = PromptConfig(speaker_reference=True)
    for r in rows:
        by_prompt.setdefault(build_prompt("classify", r, cfg, LABELS), set()).add(r.speaker)
    assert min(len(v) for v in by_prompt.values()) == 1
    listener = _fake("listener", rows)
    heard = []

    def generate(model, processor, audios, prompts, **kw):
        assert all(isinstance(a, tuple) and len(a) == 2 for a in audios)
        assert all(refs.get(_key(a[0])) in by_prompt[p] for a, p in zip(audios, prompts))
        heard.extend(prompts)
        return listener(model, processor, [a[1] for a in audios], prompts, **kw)

    monkeypatch.setattr(predict_mod, "generate", generate)
    lis = shortcut_probes(None, None, rows, cfg, batch_size=8)
    assert lis["real"]["ua"] == 1.0 and lis["silence"]["voice_dependence"] == 1.0
    assert lis["same_words"]["follows_partner_voice"] == 1.0
    assert heard[0].startswith("The first recording is the same speaker in their usual voice")
    with pytest.raises(PallmError, match="reference_audio.*pallm data cues"):
        predict(None, None, list(probe_rows[:2]), "classify", cfg)


def test_a_speaker_norm_model_hears_each_clip_against_its_speakers_reference(probe_rows):
    row = probe_rows[0].model_copy(update={"reference_audio": probe_rows[1].audio})
    cfg = PromptConfig(speaker_norm=True)
    heard = model_audio(row, cfg, audio_fn=lambda r: np.zeros(8, np.float32))
    assert isinstance(heard, SpeakerNormalized) and not heard.clip.any()
    assert np.array_equal(heard.reference, load_audio(probe_rows[1].audio))  # the probe replaced the clip only
    assert not build_prompt("classify", row, cfg, LABELS).startswith("The first recording")
    with pytest.raises(PallmError, match="prompt.speaker_norm"):
        model_audio(probe_rows[0].model_copy(update={"reference_audio": None}), cfg)
    with pytest.raises(ValueError, match="choose one"):
        PromptConfig(speaker_norm=True, speaker_reference=True)


def test_probes_run_on_tiny_model(corpus, probe_rows):
    _, rows = corpus
    model, processor = build_tiny([build_target("classify", r, CFG) for r in rows[:30]])
    partners = same_words_partners(probe_rows, CFG)
    few = [r for r in probe_rows if r.id in partners][:4] + [r for r in probe_rows if r.id not in partners][:2]
    out = shortcut_probes(model, processor, few, CFG, batch_size=8, max_new_tokens=3)
    assert set(out) >= {"real", "silence", "same_words", "follows_words"}
    assert 0.0 <= out["silence"]["voice_dependence"] <= 1.0


# --- baselines --------------------------------------------------------------------------------


def test_speaker_normalise_removes_who_is_speaking():
    feats = pd.DataFrame({"f0": [100.0, 110.0, 120.0, 200.0, 220.0, np.nan], "const": [1.0] * 6})
    z = speaker_normalise(feats, ["a", "a", "a", "b", "b", "b"])
    # Each speaker centred on their own habit and scaled by their own spread.
    assert z["f0"].tolist()[:5] == pytest.approx([-1.2247, 0.0, 1.2247, -1.0, 1.0], abs=1e-4)
    assert np.isnan(z["f0"].iloc[5]) and (z["const"] == 0.0).all()


def test_acoustic_baseline_hears_the_voice(corpus):
    out, rows = corpus
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    preds = acoustic_baseline(train, test, out / "egemaps.parquet")
    assert [p.id for p in preds] == [r.id for r in test]
    m = classification_metrics(preds, test, LABELS)["subsets"]
    # Chance is 1/3. Prosody carries the label and the classifier cannot read, so conflict rows
    # are no harder than congruent ones (measured: 0.83 all, 0.90 conflict).
    assert m["all"]["ua"] > 0.65
    assert m["conflict"]["ua"] > 0.6


def test_text_baseline_is_the_lexical_shortcut():
    # Only transcripts are needed: plan a 2000-row ParaSynth without rendering its audio.
    rows = [Row(**{k: v for k, v in p.items() if k not in ("voice", "prosody")})
            for p in plan_corpus(SynthConfig(n=2000, seed=0))]
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    m = classification_metrics(text_baseline(train, test), test, LABELS)
    s = m["subsets"]
    # Measured: 0.77 congruent, 0.13 conflict (below chance: it answers the words), follows 0.77.
    assert s["congruent"]["ua"] > 0.6
    assert s["conflict"]["ua"] < 1 / 3
    assert m["follows_words_rate"]["rate"] > 0.6
