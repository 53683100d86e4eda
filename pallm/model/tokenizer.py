"""A small tokenizer trained locally, shaped like the real Qwen2 one.

The tiny default model needs a tokenizer but the machine may have no hub access, so we train a
byte-level BPE on the caller's texts with the *same* normalizer and pre-tokenizer as Qwen2 and wrap
it in transformers' `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`). Special tokens are added in the
real model's order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|AUDIO|>`, `<|audio_bos|>`,
`<|audio_eos|>`), so code written against the tiny tokenizer behaves the same on the real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from pallm.errors import PallmError

ENDOFTEXT = "<|endoftext|>"  # pad (and unk) token of Qwen2 tokenizers
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turn markers; <|im_end|> ends a reply
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
# Same order as the real vocabulary (ids 151643..151648 in Qwen2-Audio).
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
AUDIO_SPECIAL_TOKENS = (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)

# Markup in PALLM's outputs. Added as *normal* (non-special) added tokens so each is one id and
# `decode(skip_special_tokens=True)` keeps them; the real model spells them with plain BPE text.
TASK_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<response>", "</response>")

# Chat scaffolding the template always emits, so common prompt pieces get merges of their own.
_SCAFFOLD = ["system\nYou are a helpful assistant.", "user\nAudio 1: \n", "assistant\n"]


def _strip_markup(texts: Iterable[str], specials: Sequence[str] = SPECIAL_TOKENS) -> Iterator[str]:
    """Remove special/task tokens before BPE training: they get ids of their own, and merges
    learned across them would waste the small vocabulary."""
    for t in texts:
        if not isinstance(t, str):
            raise PallmError(f"train_tokenizer: texts must be strings, got {type(t).__name__}.")
        for tok in tuple(specials) + TASK_TOKENS:
            t = t.replace(tok, " ")
        yield t


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
    named_tokens: Mapping[str, str] | None = None,
) -> Qwen2Tokenizer:
    """Train a byte-level BPE (<= `vocab_size` ids incl. the 256 byte symbols) on `texts`.

    Any text encodes (byte fallback is built in), so texts only steer which merges exist.
    Deterministic for the same texts and vocab_size. `extra_special_tokens` are added right after
    the standard ones (a family's other placeholders, e.g. Qwen2.5-Omni's image/video tokens);
    `named_tokens` ({"audio_token": "<|AUDIO|>", ...}) become tokenizer attributes
    (`tok.audio_token`, `tok.audio_token_id`) and are saved in tokenizer_config.json, as processors
    such as `Qwen2_5OmniProcessor` expect.
    """
    specials = tuple(SPECIAL_TOKENS) + tuple(t for t in extra_special_tokens if t not in SPECIAL_TOKENS)
    n_fixed = 256 + len(specials) + len(TASK_TOKENS)
    if vocab_size < n_fixed:
        raise PallmError(f"tokenizer vocab_size={vocab_size} is too small; use at least {n_fixed}.")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Room is left for the special and task tokens so len(tokenizer) stays <= vocab_size.
        vocab_size=vocab_size - len(specials) - len(TASK_TOKENS) + 1,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],  # id 0, like Qwen2Tokenizer's default vocab
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_strip_markup(texts, specials)) + _SCAFFOLD, trainer)

    state = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=[tuple(m) for m in state["merges"]])
    tok.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    if named_tokens:
        # Named only now: names given to the constructor would be added to the vocabulary first,
        # out of the real order. (transformers 5 keeps them in `SPECIAL_TOKENS_ATTRIBUTES`, saves
        # them in tokenizer_config.json and restores them on load, as for released checkpoints.)
        tok._set_model_specific_special_tokens(dict(named_tokens))
    tok.add_tokens(list(TASK_TOKENS), special_tokens=False)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
