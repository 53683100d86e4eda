"""ParaSynth: a synthetic corpus where the voice carries the label and the words may disagree."""

from pallm.data.parasynth.generate import SynthConfig, ensure_parasynth, synthesize

__all__ = ["SynthConfig", "ensure_parasynth", "synthesize"]
