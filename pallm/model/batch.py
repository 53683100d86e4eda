"""Turn (audio, prompt[, completion]) into model inputs, and sample completions.

The processor does the model-specific part: it renders the chat template's single `<|AUDIO|>`
into one placeholder per encoder output (25 per second of audio) and pads mel features to the
encoder's fixed window. We add what training and RL need on top: truncation of long clips,
completion tokens with a loss mask, the padding side, and generation that can never emit audio
tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import BatchFeature, GenerationConfig

from pallm.errors import PallmError
from pallm.model.families import family_of
from pallm.model.tokenizer import ENDOFTEXT

IGNORE_INDEX = -100  # label value that CrossEntropyLoss (and HF's loss) skips
# Clips are padded to >= 0.1 s: with fewer than 2 audio placeholders in the whole batch the
# Qwen2-Audio forward silently switches to its legacy (unexpanded) merge path.
MIN_AUDIO_SECONDS = 0.1

_truncation_warned: set[int] = set()  # window lengths (samples) already warned about, once each


def prepare_audio(processor, audios: Sequence[np.ndarray], max_audio_seconds: float | None = None) -> list[np.ndarray]:
    """Validate mono float32 clips at the processor's rate; cut clips longer than the encoder window
    (or `max_audio_seconds`, if smaller), warning once per process; pad very short clips."""
    fe = processor.feature_extractor
    sr = int(fe.sampling_rate)
    limit = int(fe.n_samples)  # the encoder sees at most this many samples
    if max_audio_seconds is not None:
        limit = min(limit, int(max_audio_seconds * sr))
    min_len = int(MIN_AUDIO_SECONDS * sr)
    out, n_cut = [], 0
    for i, a in enumerate(audios):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 1:
            raise PallmError(f"audio {i}: expected mono samples (1-D array), got shape {a.shape}.")
        if a.size == 0:
            raise PallmError(f"audio {i}: empty clip.")
        if not np.isfinite(a).all():
            raise PallmError(f"audio {i}: contains NaN/inf samples.")
        if a.size > limit:
            a, n_cut = a[:limit], n_cut + 1
        if a.size < min_len:
            a = np.pad(a, (0, min_len - a.size))
        out.append(a)
    if n_cut and limit not in _truncation_warned:
        _truncation_warned.add(limit)
        warnings.warn(
            f"{n_cut} of {len(out)} clip(s) are longer than the model's audio window of {limit / sr:g} s and were "
            f"truncated to it (only the start is heard). Further truncations are not reported.",
            UserWarning,
            stacklevel=3,
        )
    return out


@dataclass(frozen=True, eq=False)
class SpeakerNormalized:
    """A clip heard relative to its speaker (`prompt.speaker_norm`): the mean log-mel spectrum of
    `reference`, the same speaker in their usual voice, is subtracted from the clip's, band by band
    (speaker-level mean normalisation, as in Kaldi's per-speaker CMVN). One clip alone cannot show
    whether a voice is raised or just high; the difference from the speaker's own voice does."""

    clip: np.ndarray
    reference: np.ndarray


def clips_of(entry: np.ndarray | Sequence[np.ndarray] | SpeakerNormalized) -> tuple[np.ndarray, ...]:
    """The clips one entry of `audios` plays: a clip, a tuple/list of clips heard in order (speaker
    reference, clip), or a `SpeakerNormalized` clip (its reference is not heard)."""
    if isinstance(entry, SpeakerNormalized):
        return (entry.clip,)
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def normalize_by_speaker(processor, features: np.ndarray, frames: np.ndarray, references: dict[int, np.ndarray],
                         max_audio_seconds: float | None = None) -> np.ndarray:
    """Subtract from clip `i`'s valid frames of `features` ([clips, mels, frames]) the mean log-mel
    spectrum of `references[i]` (its overall level kept, so the values stay in the range the
    encoder was built for). `frames[i]` is the clip's number of valid frames."""
    if not references:
        return features
    fe = processor.feature_extractor
    index = list(references)
    wavs = prepare_audio(processor, [references[i] for i in index], max_audio_seconds)
    ref = fe(wavs, sampling_rate=fe.sampling_rate, return_attention_mask=True, return_tensors="np")
    out = features.copy()
    for j, i in enumerate(index):
        n_ref = int(ref["attention_mask"][j].sum())
        spectrum = ref["input_features"][j][:, :n_ref].mean(1)
        out[i, :, : int(frames[i])] -= (spectrum - spectrum.mean())[:, None]
    return out


def pad_token_id(tok) -> int:
    # Qwen2 tokenizers pad with <|endoftext|>; fall back to it if a checkpoint left pad unset.
    return tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(ENDOFTEXT)


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if side == "left" else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def encode_batch(
    processor,
    audios: Sequence[np.ndarray | tuple[np.ndarray, ...] | SpeakerNormalized],
    prompts: Sequence[str],
    completions: Sequence[str | Sequence[int]] | None = None,
    *,
    system: str | None = None,
    max_audio_seconds: float | None = None,
    padding_side: str | None = None,
) -> BatchFeature:
    """Chat-template prompts with their clips -> `input_ids`, `attention_mask`, `input_features`,
    `feature_attention_mask`, and with `completions` also `labels` (-100 except on completion tokens).

    An entry of `audios` is one clip (1-D samples) or a tuple of clips heard in that order in the
    same user turn, e.g. (speaker reference, clip); features come out row by row, clip by clip. A
    `SpeakerNormalized` entry plays its clip with the speaker's mean spectrum taken out.

    A completion is a string (tokenised and closed with the end-of-turn token, which the model must
    learn to emit) or token ids as sampled by `generate(return_ids=True)` (used as is, so RL scores
    exactly the sampled tokens). Prompt and completion are tokenised separately, as at generation
    time. Padding is left without completions (for `generate`), right with them (for training).
    """
    family = family_of(processor)
    tok = processor.tokenizer
    n = len(prompts)
    if n == 0:
        raise PallmError("encode_batch: empty batch.")
    if len(audios) != n or (completions is not None and len(completions) != n):
        raise PallmError(
            f"encode_batch: {len(audios)} audios, {n} prompts"
            + (f", {len(completions)} completions" if completions is not None else "")
            + "; they must match one to one."
        )
    for p in prompts:
        if any(t in p for t in family.audio_tokens):
            raise PallmError(f"prompt contains an audio special token ({', '.join(family.audio_tokens)}): {p[:80]!r}")

    clips = [clips_of(a) for a in audios]
    texts = [processor.apply_chat_template(family.messages(p, system, len(c)), tokenize=False, add_generation_prompt=True)
             for p, c in zip(prompts, clips)]
    wavs = prepare_audio(processor, [w for c in clips for w in c], max_audio_seconds)
    enc = processor(text=texts, audio=wavs, sampling_rate=processor.feature_extractor.sampling_rate, padding=False)

    features = np.asarray(enc["input_features"], dtype=np.float32)
    frames = np.asarray(enc["feature_attention_mask"]).sum(-1)
    first = np.cumsum([0] + [len(c) for c in clips])  # index of each entry's first clip in `wavs`
    references = {int(first[i]): a.reference for i, a in enumerate(audios) if isinstance(a, SpeakerNormalized)}
    features = normalize_by_speaker(processor, features, frames, references, max_audio_seconds)

    ids = [list(r) for r in enc["input_ids"]]
    labels = [[IGNORE_INDEX] * len(r) for r in ids]
    if completions is not None:
        banned = set(tok.convert_tokens_to_ids(list(family.banned_tokens)))
        for i, c in enumerate(completions):
            if isinstance(c, str):
                c_ids = tok(c + family.end_of_turn, add_special_tokens=False)["input_ids"]
            else:
                c_ids = [int(t) for t in c]
            if banned.intersection(c_ids):
                raise PallmError(f"completion {i} contains audio special tokens; they may only come from the processor.")
            ids[i] += c_ids
            labels[i] += c_ids

    side = padding_side or ("right" if completions is not None else "left")
    if side not in ("left", "right"):
        raise PallmError(f"padding_side must be 'left' or 'right', got {side!r}.")
    out = {
        "input_ids": _pad(ids, pad_token_id(tok), side),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0, side),
        "input_features": torch.from_numpy(features),
        "feature_attention_mask": torch.from_numpy(np.asarray(enc["feature_attention_mask"])).long(),
    }
    if completions is not None:
        out["labels"] = _pad(labels, IGNORE_INDEX, side)
    return BatchFeature(out)


def prompt_position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        feature_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of a left-padded prompt batch exactly as `model.generate` builds them.

    [B, L] (real tokens counted, padding 0) for 1-D RoPE models (Qwen2-Audio). Models with
    multimodal RoPE (the Qwen2.5-Omni thinker: `get_rope_index`) get [4, B, L]: that text row, then
    the model's own temporal/height/width rows -- the layout its `_prepare_position_ids_for_generation`
    produces and `generate` extends by one per new token. (For audio-only prompts the three rows
    equal the text positions; TMRoPE only spreads image/video grids.)
    """
    text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if not hasattr(model, "get_rope_index"):
        return text
    seqlens = feature_attention_mask.sum(-1) if feature_attention_mask is not None else None
    rope, _ = model.get_rope_index(input_ids, attention_mask=attention_mask, audio_seqlens=seqlens)
    return torch.cat([text[None], rope.to(text.device)], 0)


def banned_token_ids(model, processor) -> list[int]:
    """Ids a completion must never contain: the family's placeholders (audio bos/token/eos), and
    output rows with no token (real checkpoints pad the embedding matrix beyond the tokenizer)."""
    family = family_of(processor)
    tok = processor.tokenizer
    n_out = model.get_output_embeddings().weight.shape[0]
    return sorted(set(tok.convert_tokens_to_ids(list(family.banned_tokens))) | set(range(len(tok), n_out)))


@torch.no_grad()
def generate(
    model,
    processor,
    audios: Sequence[np.ndarray | tuple[np.ndarray, ...] | SpeakerNormalized],
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    max_audio_seconds: float | None = None,
    return_ids: bool = False,
):
    """Batched decoding with the KV cache. Returns `len(prompts) * num_return_sequences` texts,
    grouped by prompt ([p0s0, p0s1, p1s0, ...]), special tokens removed; with `return_ids`, also the
    sampled ids per row (up to and including the end-of-turn token, no padding).

    The generation config is built here in full rather than inherited from the checkpoint
    (instruct checkpoints typically ship top_k/top_p/repetition_penalty defaults), so sampling is exactly
    the policy at `temperature` -- what GRPO's log-probabilities assume.
    """
    family = family_of(processor)
    tok = processor.tokenizer
    if do_sample and temperature <= 0:
        raise PallmError(f"temperature must be > 0 when sampling, got {temperature}.")
    if num_return_sequences > 1 and not do_sample:
        raise PallmError("num_return_sequences > 1 needs do_sample=True (greedy decoding gives identical copies).")
    if num_return_sequences > 1 and any(len(clips_of(a)) > 1 for a in audios):
        # transformers repeats every input tensor row-wise, which would pair a row's copies with the
        # wrong clips when rows hold several clips; repeat the rows themselves instead (same order).
        n = num_return_sequences
        audios = [a for a in audios for _ in range(n)]
        prompts = [p for p in prompts for _ in range(n)]
        num_return_sequences = 1
    batch = encode_batch(processor, audios, prompts, system=system, max_audio_seconds=max_audio_seconds, padding_side="left")
    batch = batch.to(model.device)

    stop = [tok.convert_tokens_to_ids(family.end_of_turn)]
    if tok.eos_token_id is not None and tok.eos_token_id not in stop:
        stop.append(tok.eos_token_id)
    cfg = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        num_return_sequences=num_return_sequences,
        use_cache=True,
        suppress_tokens=banned_token_ids(model, processor),  # logits -> -inf, before sampling
        eos_token_id=stop,
        pad_token_id=pad_token_id(tok),
        repetition_penalty=1.0,
    )
    if do_sample:
        cfg.update(temperature=temperature, top_p=top_p, top_k=top_k)

    was_training = model.training
    model.eval()
    try:
        out = model.generate(**batch, generation_config=GenerationConfig(**cfg))
    finally:
        model.train(was_training)

    new = out[:, batch["input_ids"].shape[1] :].tolist()
    rows = []
    for r in new:
        end = next((j for j, t in enumerate(r) if t in stop), None)
        rows.append(r[: end + 1] if end is not None else r)
    texts = tok.batch_decode(rows, skip_special_tokens=True)
    return (texts, rows) if return_ids else texts
