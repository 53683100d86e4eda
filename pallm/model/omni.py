"""Qwen2.5-Omni thinker pieces that transformers cannot give us without torchvision.

`Qwen2_5OmniProcessor` bundles a video processor, and transformers builds that only when
torchvision is installed (it is not a PALLM dependency). PALLM never feeds images or video, so
`OmniAudioProcessor` is the audio+text half of it: the same tokenizer, the same
`WhisperFeatureExtractor`, the same chat template, and the same `<|AUDIO|>` expansion, with
outputs identical to `Qwen2_5OmniProcessor` for audio-and-text inputs (tests/test_omni.py checks
this against the real class). Real checkpoints still load the real processor when it can be built
(`load_omni_processor`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from transformers import BatchFeature, ProcessorMixin

from pallm.model.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN

VISION_BOS, VISION_EOS, IMAGE_TOKEN, VIDEO_TOKEN = "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"
# Added after the audio tokens, in the real vocabulary's order (151652, 151653, 151655, 151656).
OMNI_EXTRA_SPECIAL_TOKENS = (VISION_BOS, VISION_EOS, IMAGE_TOKEN, VIDEO_TOKEN)
# The named tokens Qwen2_5OmniProcessor reads from its tokenizer (`tokenizer.audio_token`, ...).
OMNI_NAMED_TOKENS = {
    "audio_token": AUDIO_TOKEN,
    "audio_bos_token": AUDIO_BOS,
    "audio_eos_token": AUDIO_EOS,
    "image_token": IMAGE_TOKEN,
    "video_token": VIDEO_TOKEN,
    "vision_bos_token": VISION_BOS,
    "vision_eos_token": VISION_EOS,
}

# The chat template shipped with Qwen/Qwen2.5-Omni-7B (chat_template.json; transformers' own
# Qwen2.5-Omni processor tests use the same string). Differences from Qwen2-Audio's: no newline
# after `<|audio_bos|><|AUDIO|><|audio_eos|>`, and the "Audio N: " prefix only with
# `add_audio_id=True`. The default system turn is "You are a helpful assistant."; Qwen's examples
# pass the long "You are Qwen, a virtual human ..." system prompt explicitly, which only the talker
# (speech output) needs.
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def omni_audio_token_count(mel_frames):
    """Audio placeholders for a clip of `mel_frames` valid mel frames: the thinker's audio encoder
    halves the frames in its stride-2 conv, then average-pools pairs, so 25 tokens per second.
    Same arithmetic as transformers' `_get_feat_extract_output_lengths` in
    models/qwen2_5_omni/processing_qwen2_5_omni.py (and the encoder's method of that name)."""
    after_conv = (np.asarray(mel_frames) - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class OmniAudioProcessor(ProcessorMixin):
    """`Qwen2_5OmniProcessor` restricted to text + audio: a Qwen2 tokenizer and a
    `WhisperFeatureExtractor`. Each `<|AUDIO|>` in the text becomes one placeholder per audio
    encoder output; features are padded to the extractor's window (`padding="max_length"`, as the
    real processor forces) and returned with `feature_attention_mask`."""

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None):
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        self.audio_token = getattr(tokenizer, "audio_token", None) or AUDIO_TOKEN

    def __call__(self, text=None, audio=None, sampling_rate: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("OmniAudioProcessor needs `text`.")
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if audio is not None:
            audios = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
            n_placeholders = sum(t.count(self.audio_token) for t in texts)
            if n_placeholders != len(audios):
                raise ValueError(f"{n_placeholders} {self.audio_token} placeholder(s) in the text for {len(audios)} audio clip(s).")
            feats = self.feature_extractor(
                audios, sampling_rate=sampling_rate or self.feature_extractor.sampling_rate,
                padding="max_length", return_attention_mask=True,
            )
            mask = np.asarray(feats["attention_mask"])
            counts = iter(omni_audio_token_count(mask.sum(-1)).tolist())
            # Placeholders are filled in reading order across the batch, as the real processor does.
            texts = [
                "".join(part + (self.audio_token * next(counts) if i < t.count(self.audio_token) else "")
                        for i, part in enumerate(t.split(self.audio_token)))
                for t in texts
            ]
            data = {"input_features": feats["input_features"], "feature_attention_mask": mask}
        enc = self.tokenizer(texts, **kwargs)
        return BatchFeature({**enc, **data}, tensor_type=return_tensors)

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.feature_extractor.model_input_names
                                  + ["feature_attention_mask"]))


def _saved_processor_class(source: str) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = Path(source) / name
        if f.is_file():
            try:
                cls = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            except (OSError, json.JSONDecodeError):
                continue
            if cls:
                return cls
    return None


_fallback_warned = False


def load_omni_processor(source: str):
    """The processor of a Qwen2.5-Omni (thinker) checkpoint: a folder saved with
    `OmniAudioProcessor` loads as one; anything else (the released checkpoints) gets the real
    `Qwen2_5OmniProcessor`, or, when that cannot be built (no torchvision for its video processor),
    `OmniAudioProcessor` from the same tokenizer / feature extractor / chat template files."""
    from transformers import Qwen2_5OmniProcessor

    if _saved_processor_class(source) == OmniAudioProcessor.__name__:
        return OmniAudioProcessor.from_pretrained(source)
    try:
        return Qwen2_5OmniProcessor.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 -- a missing torchvision surfaces as ImportError or AttributeError
        try:
            processor = OmniAudioProcessor.from_pretrained(source)
        except Exception:  # noqa: BLE001
            raise e from None
        global _fallback_warned
        if not _fallback_warned:
            _fallback_warned = True
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
            warnings.warn(f"{source}: Qwen2_5OmniProcessor could not be built ({first}); using PALLM's audio-only "
                          "OmniAudioProcessor (identical inputs for audio + text). Install torchvision for the full one.",
                          UserWarning, stacklevel=3)
        return processor
