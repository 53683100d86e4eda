"""Rollout backends: who samples the G completions per prompt that GRPO learns from.

The trainer only needs token ids, grouped per prompt, sampled from the current policy at
`temperature`/`top_p`. `HFBackend` does that with the training model itself (any machine, CPU
included); `pallm.train.rollout_vllm.VLLMBackend` (`grpo.use_vllm: true`) with a colocated vLLM
engine on GPU machines (docs/grpo.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from pallm.errors import PallmError
from pallm.model import banned_token_ids, encode_batch
from pallm.model.batch import prompt_position_ids
from pallm.model.families import family_of
from pallm.train.common import base_model


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(
        self,
        audios: Sequence[np.ndarray],
        prompts: Sequence[str],
        num_generations: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[list[int]]:
        """`len(prompts) * num_generations` rows of sampled completion ids, grouped by prompt
        ([p0s0 .. p0s(G-1), p1s0 ..]); a row ends with the stop token when one was sampled."""
        ...

    def sync_weights(self, model) -> None:
        """Make the backend sample from `model`'s current weights (called after every optimizer step)."""
        ...


def stop_token_ids(processor) -> list[int]:
    """End of turn first, then the tokenizer's eos (the same stop set as `pallm.model.generate`)."""
    tok = processor.tokenizer
    stop = [tok.convert_tokens_to_ids(family_of(processor).end_of_turn)]
    if tok.eos_token_id is not None and tok.eos_token_id not in stop:
        stop.append(tok.eos_token_id)
    return stop


def cut_at_stop(rows: list[list[int]], stop: Sequence[int]) -> list[list[int]]:
    """Keep each row up to and including its first stop token: nothing after EOS is ever scored
    (a backend may pad finished rows with anything)."""
    out = []
    for r in rows:
        end = next((j for j, t in enumerate(r) if t in stop), None)
        out.append(list(r[: end + 1]) if end is not None else list(r))
    return out


def sample_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [rows, vocab] by inverse-CDF sampling: a single uniform draw
    per row. Same distribution as `torch.multinomial(probs, 1)`, which on CPU costs ~20x more
    (it draws noise for every vocabulary entry) and was a tenth of a small model's decode step.
    Zero-probability tokens (suppressed, or cut by top-p) are never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u < total always; the fallback only guards the rounding of that product
    return torch.where(idx < probs.shape[1], idx, probs.argmax(-1))


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` that writes each step's keys and values into room reserved up front and
    hands out views of the filled part, instead of concatenating: `torch.cat` copies the whole
    cache of every layer at every decode step (a fifth of a tiny model's decode step on CPU).
    Attention still sees exactly the tokens so far, so masks and results are unchanged."""

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        self.device, self.is_initialized = layer.device, True
        self._used = layer.keys.shape[-2]
        self._k = self._alloc(layer.keys, self._used + room)
        self._v = self._alloc(layer.values, self._used + room)
        self._expose()

    @staticmethod
    def _alloc(x: torch.Tensor, capacity: int) -> torch.Tensor:
        buf = x.new_empty(*x.shape[:-2], capacity, x.shape[-1])
        buf[..., : x.shape[-2], :] = x
        return buf

    def _expose(self) -> None:
        self.keys, self.values = self._k[..., : self._used, :], self._v[..., : self._used, :]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._used + key_states.shape[-2]
        if end > self._k.shape[-2]:  # more than reserved: grow (never on the decoding loop's path)
            self._k, self._v = self._alloc(self.keys, 2 * end), self._alloc(self.values, 2 * end)
        self._k[..., self._used:end, :] = key_states
        self._v[..., self._used:end, :] = value_states
        self._used = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a decoding cache is never cropped")


def reserve_cache_room(cache, room: int) -> None:
    """Give every plain `DynamicLayer` of `cache` room for `room` more tokens (see `_ReservedLayer`)."""
    cache.layers = [_ReservedLayer(layer, room) if type(layer) is DynamicLayer and layer.is_initialized else layer
                    for layer in cache.layers]


def _unwrap(model):
    # DDP / accelerate wrappers keep the real model in `.module`; PEFT models generate fine as they are.
    return getattr(model, "module", model)


class HFBackend:
    """Sampling from the training model itself (any transformers model, KV cache on).

    `pallm.model.generate(num_return_sequences=G)` lets transformers repeat every input G times,
    audio features included, so the audio encoder and the whole prompt prefill run G times per
    prompt. Here the prompt (audio + text, all but its last token) is prefilled ONCE per prompt;
    its KV cache is then repeated G times and decoding continues from it (`_decode`). Same
    distributions as `generate` at every step (tests/helpers.py::check_hf_backend_decoding),
    about G times less prefill work and less per-step overhead.
    """

    def __init__(self, model, processor, *, system: str | None = None, max_audio_seconds: float | None = None):
        self.model = _unwrap(model)
        self.processor = processor
        self.system = system
        self.max_audio_seconds = max_audio_seconds
        self._stop = stop_token_ids(processor)
        self._banned = banned_token_ids(self.model, processor)

    def sync_weights(self, model) -> None:
        # Same module as the one being trained: nothing to copy.
        self.model = _unwrap(model)

    def _decode(self, model, last, mask, pos, cache, temperature, top_p, max_new_tokens) -> list[list[int]]:
        """Sampling with transformers' logits processors, minus `generate`'s per-step bookkeeping
        (which costs more than the forward pass of a small model). Rows that have sampled a stop
        token leave the batch, cache included: late steps run on the few long completions only."""
        processors = [SuppressTokensLogitsProcessor(self._banned, device=last.device), TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        # Steps carry no audio: run the language model and the LM head directly (the multimodal
        # wrapper only passes them through, and its per-call overhead is felt on a small model).
        base = base_model(model)
        lm, head = base.model.language_model, base.get_output_embeddings()
        # SDPA takes a boolean [rows, 1, 1, keys] padding mask as it is; one query per row needs no
        # causal part, so giving it that form once skips transformers' general mask builder at every
        # step. The mask grows by one key per step in whichever form it has.
        if lm.config._attn_implementation == "sdpa":
            mask = mask[:, None, None, :].bool()
        stop = torch.tensor(self._stop, device=last.device)
        rows: list[list[int]] = [[] for _ in range(last.shape[0])]
        live = torch.arange(last.shape[0], device=last.device)  # original row of each batch row
        step = last
        for _ in range(max_new_tokens):
            hidden = lm(input_ids=step, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
            scores = head(hidden[:, -1]).float()
            for process in processors:  # LogitsProcessorList's call inspects signatures every step
                scores = process(step, scores)
            nxt = sample_tokens(scores.softmax(-1))
            for r, t in zip(live.tolist(), nxt.tolist()):
                rows[r].append(t)
            going = ~torch.isin(nxt, stop)
            if not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(1)
                live, nxt, mask, pos = live[keep], nxt[keep], mask[keep], pos.index_select(pos.dim() - 2, keep)
                cache.batch_select_indices(keep)
            step, mask, pos = nxt[:, None], torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], -1), pos + 1
        return rows

    # Inference mode, not just no_grad: no version counters or view tracking on the many small
    # tensors a decoding step makes (a tiny model's rollout on one CPU thread: 7 % faster; on two,
    # the same). Nothing made here reaches autograd: rows leave as Python lists, the cache is dropped.
    @torch.inference_mode()
    def generate(self, audios, prompts, num_generations, temperature, top_p, max_new_tokens, *,
                 prompt_inputs=None) -> list[list[int]]:
        """`prompt_inputs`: these prompts already encoded, left-padded, as this backend would
        (`encode_batch(processor, audios, prompts, system=..., max_audio_seconds=..., padding_side="left")`);
        the trainer passes the encoding its update uses, so features and chat template are made once."""
        if temperature <= 0:
            raise PallmError(f"temperature must be > 0 for GRPO sampling, got {temperature}.")
        if not prompts:
            return []
        model, G = self.model, num_generations
        if prompt_inputs is None:
            prompt_inputs = encode_batch(self.processor, audios, prompts, system=self.system,
                                         max_audio_seconds=self.max_audio_seconds, padding_side="left")
        batch = {k: v.to(model.device) for k, v in prompt_inputs.items()}  # a copy: the caller keeps its own
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # Left padding: positions count real tokens only, exactly as `generate` derives them. The
        # Qwen2.5-Omni thinker (3-D multimodal RoPE) gets generate's [4, B, L] layout; explicit ids
        # at every step keep decoding off the model's cached `rope_deltas` (set per batch size).
        pos = prompt_position_ids(model, ids, mask, batch["feature_attention_mask"])
        was_training = model.training
        model.eval()
        try:
            # Prefill all but the last prompt token, once per prompt; the decoding loop's first step
            # feeds that token to all G copies.
            cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[..., :-1],
                          input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"],
                          use_cache=True).cache
            cache.batch_repeat_interleave(G)
            reserve_cache_room(cache, max_new_tokens)  # the loop feeds the last prompt token + max_new_tokens - 1
            rows = self._decode(model, ids[:, -1:].repeat_interleave(G, 0), mask.repeat_interleave(G, 0),
                                pos[..., -1:].repeat_interleave(G, pos.dim() - 2), cache,
                                temperature, top_p, max_new_tokens)
        finally:
            model.train(was_training)
        return rows  # each row already ends at its first stop token (it left the batch there)
