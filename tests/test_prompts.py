import pytest

from pallm.data.manifest import Row
from pallm.prompts import PromptConfig, build_prompt, build_target, parse_completion


def _row(**kw):
    base = dict(id="u", audio="a.wav", corpus="parasynth", speaker="s", split="train", emotion="sad",
                sentiment="negative", transcript="I finally got the job!", lexical_sentiment="positive",
                congruent=False, response="Good news, but you sound down.",
                cues={"pitch_level": "low", "pitch_variability": "low", "loudness": "mid", "rate": "low"})
    base.update(kw)
    return Row(**base)


def test_prompt_gives_transcript_only_when_configured():
    row = _row()
    assert '"I finally got the job!"' in build_prompt("classify", row, PromptConfig())
    assert "job" not in build_prompt("classify", row, PromptConfig(transcript=False))
    assert "<think>" not in build_prompt("classify", row, PromptConfig(cot=False))
    assert "<response>" in build_prompt("respond", row, PromptConfig())
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt("translate", row, PromptConfig())


def test_target_is_grounded_in_measured_cues_and_separates_words_from_voice():
    t = build_target("classify", _row(), PromptConfig())
    assert t == ("<think>pitch level: low, pitch variability: low, loudness: mid, speaking rate: low. "
                 "the voice sounds sad. the words sound positive.</think><answer>negative</answer>")
    assert build_target("classify", _row(), PromptConfig(cot=False)) == "<answer>negative</answer>"
    assert build_target("classify", _row(), PromptConfig(target="emotion")).endswith("<answer>sad</answer>")
    no_words = build_target("classify", _row(), PromptConfig(transcript=False))
    assert "words" not in no_words
    assert build_target("respond", _row(), PromptConfig()).endswith("<response>Good news, but you sound down.</response>")


def test_targets_parse_back_exactly():
    cfg = PromptConfig()
    p = parse_completion(build_target("classify", _row(), cfg), "classify")
    assert p.format_ok and p.label == "negative"
    assert p.cue_claims == {"pitch_level": "low", "pitch_variability": "low", "loudness": "mid", "rate": "low"}
    assert p.voice_claim == "sad"
    r = parse_completion(build_target("respond", _row(), cfg), "respond")
    assert r.format_ok and r.response == "Good news, but you sound down."
    d = parse_completion("<answer>negative</answer>", "classify", cot=False)
    assert d.format_ok and d.label == "negative"


@pytest.mark.parametrize("text, label, ok", [
    ("<think>x</think><answer> Positive. </answer>", "positive", False),  # label found, format not strict
    ("<think>x</think><answer>positive</answer> and more", "positive", False),
    ("<think>x</think>I think it is neutral", "neutral", False),  # tolerant: no tags
    ("<think>the words sound positive", None, False),  # unfinished reasoning: no label from inside it
    ("<think>x</think><answer>positive or negative</answer>", None, False),  # two labels: wrong
    ("", None, False),
    ("<answer>happy</answer>", None, False),  # not in the label set
])
def test_parser_is_tolerant_where_it_should_be(text, label, ok):
    p = parse_completion(text, "classify")
    assert p.label == label and p.format_ok is ok


def test_contradictory_cue_claims_are_marked():
    p = parse_completion("<think>pitch level: low, pitch level: high, loudness: high</think><answer>negative</answer>",
                         "classify")
    assert p.cue_claims == {"pitch_level": "conflict", "loudness": "high"} and p.voice_claim is None


def test_the_prompt_asks_for_the_configured_cues_and_rejects_unknown_ones():
    from pydantic import ValidationError

    from pallm.data.manifest import Row
    from pallm.prompts.format import PromptConfig, build_prompt

    r = Row(id="a", audio="a.wav", corpus="c", speaker="s", split="test", transcript="hi")
    assert "describe the pitch level, pitch variability, loudness and speaking rate inside" in build_prompt(
        "classify", r, PromptConfig())
    assert "describe the loudness and voice quality inside" in build_prompt(
        "classify", r, PromptConfig(cues=["loudness", "voice_quality"]))
    for bad in ([], ["pitch"]):
        with pytest.raises(ValidationError, match="cues must be"):
            PromptConfig(cues=bad)
