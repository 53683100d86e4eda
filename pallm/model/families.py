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
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from pallm.data.audio import SAMPLE_RATE
from pallm.errors import ConfigError, PallmError
from pallm.model.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, ENDOFTEXT, IM_END, train_tokenizer

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


def qwen_messages(prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn: the clip first, then the instruction (the layout Qwen2-Audio was tuned on)."""
    msgs: list[dict[str, Any]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]})
    return msgs


@dataclass(frozen=True)
class Family:
    name: str  # PALLM's name, used in configs (`model.family`)
    model_types: tuple[str, ...]  # `model_type` values in config.json of this family's checkpoints
    model_cls: type
    processor_cls: type
    chat_template: str
    messages: Callable[[str, str | None], list[dict[str, Any]]]  # (prompt, system) -> chat messages
    audio_tokens: tuple[str, ...] = (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)  # only the processor may place these
    extra_banned_tokens: tuple[str, ...] = ()  # other placeholders a completion must not contain (e.g. image)
    end_of_turn: str = IM_END  # appended to training completions; a stop token for generate
    build_tiny: Callable[[list[str], ModelSpec], tuple[Any, Any]] | None = None

    @property
    def banned_tokens(self) -> tuple[str, ...]:
        return self.audio_tokens + self.extra_banned_tokens


def _tiny_qwen2_audio(texts: list[str], spec: ModelSpec) -> tuple[Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor]:
    t = spec.tiny
    seconds = spec.max_audio_seconds
    if seconds <= 0 or seconds != int(seconds):
        # WhisperFeatureExtractor pads to chunk_length * 16000 samples; a fractional chunk_length
        # makes that a float and breaks padding, so the tiny window is whole seconds.
        raise ConfigError(f"model.max_audio_seconds={seconds}: the tiny model needs a whole number of seconds (e.g. 4).")
    seconds = int(seconds)
    tokenizer = train_tokenizer(texts, vocab_size=t.vocab_size, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    # Pads every clip to exactly 2 * max_source_positions mel frames, which the encoder demands.
    feature_extractor = WhisperFeatureExtractor(
        feature_size=t.num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, chunk_length=seconds, n_fft=400
    )
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
            vocab_size=len(tokenizer),  # exactly the tokenizer: no untrained ids that could be sampled
            hidden_size=t.text_hidden,
            intermediate_size=t.text_ffn,
            num_hidden_layers=t.text_layers,
            num_attention_heads=t.text_heads,
            num_key_value_heads=t.text_kv_heads,
            max_position_embeddings=t.max_positions,
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

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2_AUDIO,)}


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
