"""Audio LLMs for PALLM: thin wrappers around Hugging Face models (see docs/model.md).

    model, processor = build_tiny(texts)                       # random tiny Qwen2-Audio, local tokenizer
    model, processor = build_tiny(texts, ModelSpec(family="qwen2_5_omni_thinker"))   # tiny Qwen2.5-Omni thinker
    model, processor = load_pretrained("Qwen/Qwen2-Audio-7B-Instruct")
    batch = encode_batch(processor, audios, prompts, completions)   # labels on completions only
    texts = generate(model, processor, audios, prompts, do_sample=True, num_return_sequences=4)
    save_checkpoint(model, processor, "runs/sft", {"task": ...})
"""

from pallm.model.batch import IGNORE_INDEX, SpeakerNormalized, banned_token_ids, encode_batch, generate, prepare_audio
from pallm.model.build import (
    ModelSpec,
    TinySize,
    build_tiny,
    count_parameters,
    load_model,
    load_pretrained,
    read_pallm_meta,
    save_checkpoint,
)
from pallm.model.families import FAMILIES, Family, family_of, get_family
from pallm.model.omni import OmniAudioProcessor
from pallm.model.tokenizer import AUDIO_SPECIAL_TOKENS, SPECIAL_TOKENS, TASK_TOKENS, train_tokenizer

__all__ = [
    "AUDIO_SPECIAL_TOKENS",
    "FAMILIES",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SpeakerNormalized",
    "TASK_TOKENS",
    "Family",
    "ModelSpec",
    "OmniAudioProcessor",
    "TinySize",
    "banned_token_ids",
    "build_tiny",
    "count_parameters",
    "encode_batch",
    "family_of",
    "generate",
    "get_family",
    "load_model",
    "load_pretrained",
    "prepare_audio",
    "read_pallm_meta",
    "save_checkpoint",
    "train_tokenizer",
]
