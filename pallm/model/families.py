"""Model families: what differs between audio LLMs, in one small record each.

Everything else in `pallm.model` (batching, generation, checkpoints) only talks to a `Family`,
the transformers model/processor classes it names, and the processor's own `<|AUDIO|>` expansion.
Adding a family = one `Family(...)` entry (+ a tiny builder if laptop runs should use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from pallm.data.audio import SAMPLE_RATE
from pallm.errors import ConfigError, PallmError
from pallm.model.omni import (
    IMAGE_TOKEN,
    OMNI_EXTRA_SPECIAL_TOKENS,
    OMNI_NAMED_TOKENS,
    QWEN2_5_OMNI_CHAT_TEMPLATE,
    VIDEO_TOKEN,
    VISION_BOS,
    VISION_EOS,
    OmniAudioProcessor,
    load_omni_processor,
)
from pallm.model.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, ENDOFTEXT, IM_END, IM_START, train_tokenizer

if TYPE_CHECKING:
    from pallm.model.build import ModelSpec

# The real Qwen2-Audio-7B-Instruct template (identical to transformers' Qwen2AudioProcessor
# default): ChatML, a default system turn, and "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
# before the user's text. Kept here so the tiny model is trained on exactly the real layout.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
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

# Whisper-style front end: 10 ms hop, and the encoder's stride-2 conv turns 2 mel frames into one
# position, so max_source_positions = 50 per second of audio.
HOP_LENGTH = 160
POSITIONS_PER_SECOND = SAMPLE_RATE // HOP_LENGTH // 2


def qwen_messages(prompt: str, system: str | None = None, n_audio: int = 1) -> list[dict[str, Any]]:
    """One user turn: the clip(s) first, then the instruction (the layout Qwen2-Audio was tuned on;
    its template numbers them "Audio 1:", "Audio 2:", as in its multi-audio chats)."""
    msgs: list[dict[str, Any]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": [*([{"type": "audio"}] * n_audio), {"type": "text", "text": prompt}]})
    return msgs


@dataclass(frozen=True)
class Family:
    name: str  # PALLM's name, used in configs (`model.family`)
    model_types: tuple[str, ...]  # `model_type` values in config.json of this family's checkpoints
    model_cls: type
    processor_cls: type | tuple[type, ...]  # processors of this family (the first one is the family's own)
    chat_template: str
    messages: Callable[..., list[dict[str, Any]]]  # (prompt, system, n_audio=1) -> chat messages
    audio_tokens: tuple[str, ...] = (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)  # only the processor may place these
    extra_banned_tokens: tuple[str, ...] = ()  # other placeholders a completion must not contain (e.g. image)
    end_of_turn: str = IM_END  # appended to training completions; a stop token for generate
    build_tiny: Callable[[list[str], ModelSpec], tuple[Any, Any]] | None = None
    # checkpoint folder / hub id -> processor; None means `processor_cls.from_pretrained`
    load_processor: Callable[[str], Any] | None = None

    @property
    def banned_tokens(self) -> tuple[str, ...]:
        return self.audio_tokens + self.extra_banned_tokens

    def processor_from_pretrained(self, source: str):
        if self.load_processor is not None:
            return self.load_processor(source)
        cls = self.processor_cls[0] if isinstance(self.processor_cls, tuple) else self.processor_cls
        return cls.from_pretrained(source)


def _tiny_window_seconds(spec: ModelSpec) -> int:
    seconds = spec.max_audio_seconds
    if seconds <= 0 or seconds != int(seconds):
        # WhisperFeatureExtractor pads to chunk_length * 16000 samples; a fractional chunk_length
        # makes that a float and breaks padding, so the tiny window is whole seconds.
        raise ConfigError(f"model.max_audio_seconds={seconds}: the tiny model needs a whole number of seconds (e.g. 4).")
    return int(seconds)


def _tiny_feature_extractor(spec: ModelSpec, seconds: int) -> WhisperFeatureExtractor:
    # Pads every clip to the whole window (`seconds`), 10 ms hop, as the real front ends do for 30 s.
    return WhisperFeatureExtractor(
        feature_size=spec.tiny.num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, chunk_length=seconds, n_fft=400
    )


def _tiny_text_sizes(t, tokenizer) -> dict[str, Any]:
    """The tiny language model's sizes, shared by both families' tiny builders."""
    return dict(
        vocab_size=len(tokenizer),  # exactly the tokenizer: no untrained ids that could be sampled
        hidden_size=t.text_hidden,
        intermediate_size=t.text_ffn,
        num_hidden_layers=t.text_layers,
        num_attention_heads=t.text_heads,
        num_key_value_heads=t.text_kv_heads,
        max_position_embeddings=t.max_positions,
    )


def _tiny_qwen2_audio(texts: list[str], spec: ModelSpec) -> tuple[Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor]:
    t = spec.tiny
    seconds = _tiny_window_seconds(spec)
    tokenizer = train_tokenizer(texts, vocab_size=t.vocab_size, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    # Pads every clip to exactly 2 * max_source_positions mel frames, which the encoder demands.
    feature_extractor = _tiny_feature_extractor(spec, seconds)
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE
    )
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            num_mel_bins=t.num_mel_bins,
            d_model=t.audio_d_model,
            encoder_layers=t.audio_layers,
            encoder_attention_heads=t.audio_heads,
            encoder_ffn_dim=t.audio_ffn,
            max_source_positions=seconds * POSITIONS_PER_SECOND,
        ),
        text_config=dict(
            model_type="qwen2",
            **_tiny_text_sizes(t, tokenizer),
            tie_word_embeddings=False,  # like Qwen2-7B; lets tests bias lm_head without touching inputs
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
            bos_token_id=None,
        ),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    with torch.random.fork_rng():  # seeded init without disturbing the caller's RNG stream
        torch.manual_seed(t.seed)
        model = Qwen2AudioForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model.generation_config.bos_token_id = None
    return model, processor


QWEN2_AUDIO = Family(
    name="qwen2_audio",
    model_types=("qwen2_audio",),
    model_cls=Qwen2AudioForConditionalGeneration,
    processor_cls=Qwen2AudioProcessor,
    chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    messages=qwen_messages,
    build_tiny=_tiny_qwen2_audio,
)



def _tiny_qwen2_5_omni_thinker(texts: list[str], spec: ModelSpec):
    """A random Qwen2.5-Omni thinker with the tiny Qwen2-Audio's audio-encoder and LM sizes, a
    one-block vision tower (part of the class, never fed), and `OmniAudioProcessor`."""
    t = spec.tiny
    seconds = _tiny_window_seconds(spec)
    tokenizer = train_tokenizer(texts, vocab_size=t.vocab_size, chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
                                extra_special_tokens=OMNI_EXTRA_SPECIAL_TOKENS, named_tokens=OMNI_NAMED_TOKENS)
    processor = OmniAudioProcessor(feature_extractor=_tiny_feature_extractor(spec, seconds), tokenizer=tokenizer,
                                   chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = t.text_hidden // t.text_heads
    if head_dim % 8:
        raise ConfigError(f"model.tiny: text_hidden/text_heads={head_dim}; the Omni thinker's 3-D RoPE needs a multiple of 8.")
    max_source_positions = seconds * POSITIONS_PER_SECOND
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=t.num_mel_bins,
            d_model=t.audio_d_model,
            encoder_layers=t.audio_layers,
            encoder_attention_heads=t.audio_heads,
            encoder_ffn_dim=t.audio_ffn,
            max_source_positions=max_source_positions,
            # The encoder attends within windows of 2 * n_window mel frames (real: 100 -> 2 s).
            n_window=min(100, max_source_positions),
            output_dim=t.text_hidden,  # the encoder's own projection into the LM
            # The encoder adds fixed unit-amplitude sinusoidal positions (Qwen2-Audio: a table initialised
            # at std 0.02); with convs at std 0.02 they swamp the sound and all clips look alike at init.
            # 0.1 lets the tiny model tell clips apart as fast as the tiny Qwen2-Audio (tests/test_omni.py).
            initializer_range=0.1,
        ),
        vision_config=dict(  # smallest the class allows; PALLM never feeds images or video
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=2, temporal_patch_size=1,
            spatial_merge_size=2, out_hidden_size=t.text_hidden, fullatt_block_indexes=[0],
        ),
        text_config=dict(
            **_tiny_text_sizes(t, tokenizer),
            # temporal/height/width split of the rotary frequencies, scaled from the real [16, 24, 24] (head_dim 128)
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]},
            tie_word_embeddings=False,  # like Qwen2.5-Omni-7B; lets tests bias lm_head without touching inputs
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=ids(IM_END),
            bos_token_id=None,
        ),
        audio_token_index=ids(AUDIO_TOKEN),
        image_token_index=ids(IMAGE_TOKEN),
        video_token_index=ids(VIDEO_TOKEN),
        audio_start_token_id=ids(AUDIO_BOS),
        audio_end_token_id=ids(AUDIO_EOS),
        user_token_id=ids(IM_START),  # only the talker reads it
        # not declared by the config class, but get_rope_index reads it (the released config has both)
        vision_start_token_id=ids(VISION_BOS),
        vision_end_token_id=ids(VISION_EOS),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():  # seeded init without disturbing the caller's RNG stream
        torch.manual_seed(t.seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids(IM_END), tokenizer.pad_token_id]
    model.generation_config.pad_token_id = ids(ENDOFTEXT)
    model.generation_config.bos_token_id = None
    return model, processor


QWEN2_5_OMNI_THINKER = Family(
    name="qwen2_5_omni_thinker",
    # Released checkpoints (Qwen/Qwen2.5-Omni-7B, -3B) are the whole Omni model (`qwen2_5_omni`);
    # the thinker class loads its part of them. PALLM checkpoints are the thinker alone.
    model_types=("qwen2_5_omni_thinker", "qwen2_5_omni"),
    model_cls=Qwen2_5OmniThinkerForConditionalGeneration,
    processor_cls=(OmniAudioProcessor, Qwen2_5OmniProcessor),
    chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
    messages=qwen_messages,  # same content list: the clip, then the instruction
    extra_banned_tokens=(VISION_BOS, VISION_EOS, IMAGE_TOKEN, VIDEO_TOKEN),
    build_tiny=_tiny_qwen2_5_omni_thinker,
    load_processor=load_omni_processor,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2_AUDIO, QWEN2_5_OMNI_THINKER)}


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.model_cls.__name__})" for f in FAMILIES.values())


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"model.family='{name}' is not supported; choose one of: {_supported()}.")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None, where: str) -> Family:
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    raise PallmError(f"{where}: model_type '{model_type}' is not a supported audio LLM; supported: {_supported()}.")


def family_of(obj: Any) -> Family:
    """The family of a model or processor instance (so batch/generate need no family argument)."""
    for f in FAMILIES.values():
        if isinstance(obj, (f.model_cls, f.processor_cls)):
            return f
    raise PallmError(f"{type(obj).__name__} is not a model/processor of a supported family ({_supported()}).")
