"""pallm.model on the tiny Qwen2-Audio: no hub access, no downloads, well under a minute on 2 cores."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

from pallm.errors import ConfigError, PallmError
from pallm.model import (
    AUDIO_SPECIAL_TOKENS,
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    TASK_TOKENS,
    ModelSpec,
    SpeakerNormalized,
    banned_token_ids,
    build_tiny,
    count_parameters,
    encode_batch,
    generate,
    load_pretrained,
    read_pallm_meta,
    save_checkpoint,
    train_tokenizer,
)
from pallm.model import batch as batch_mod

from helpers import fit_two_clips

SR = 16_000
PROMPT = "What is the speaker's sentiment?"
TEXTS = [
    "<think>The voice is bright, fast and loud.</think><answer>positive</answer>",
    "<think>Low pitch, slow and quiet.</think><answer>negative</answer>",
    "<think>Flat and even.</think><answer>neutral</answer>",
    "<response>I am glad to hear that!</response>",
    PROMPT,
] * 10


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small run faster on one thread; with two, OpenMP spin-waits make each step
    5-10x slower whenever another process shares the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(TEXTS)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, processor = tiny
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("ckpt") / "sft", {"task": "sentiment", "labels": ["negative", "neutral", "positive"]})


def n_audio(processor, input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum(-1)


# --- build & tokenizer --------------------------------------------------------------------------


def test_tiny_size_and_window(tiny):
    model, _ = tiny
    assert 500_000 <= count_parameters(model) <= 3_000_000
    assert model.config.audio_config.num_mel_bins == 80
    assert model.config.audio_config.max_source_positions == 200  # 4 s at 50 positions/s
    assert not model.config.text_config.tie_word_embeddings


def test_tiny_window_must_be_whole_seconds():
    with pytest.raises(ConfigError, match="whole number of seconds"):
        build_tiny(TEXTS, ModelSpec(max_audio_seconds=2.5))


def test_tokenizer_roundtrip_special_and_task_tokens(tiny):
    tok = tiny[1].tokenizer
    text = "<|im_start|>assistant\n<think>Rising pitch, fast.</think> <answer>positive</answer><|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for t in SPECIAL_TOKENS + TASK_TOKENS:  # each is exactly one id, never split into BPE pieces
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    # the real vocabulary's order (151643..151648), and task tokens survive skip_special_tokens
    ids_special = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS[1:]))
    assert ids_special == sorted(ids_special) and ids_special[-1] - ids_special[0] == 4
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>Rising pitch, fast.</think> <answer>positive</answer>"
    assert tok.pad_token == "<|endoftext|>"
    # byte-level: text never seen in training still round-trips
    odd = "Ünïcödé — 12345 ✓"
    assert tok.decode(tok(odd)["input_ids"]) == odd
    # deterministic: the same texts give the same tokenizer
    assert train_tokenizer(TEXTS).get_vocab() == train_tokenizer(TEXTS).get_vocab()


def test_chat_template_matches_real_qwen2_audio(tiny):
    processor = tiny[1]
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.tokenizer.chat_template == processor.chat_template


# --- processor & batches ------------------------------------------------------------------------


def test_processor_pads_to_encoder_window_and_expands_audio_tokens(tiny):
    model, processor = tiny
    window = 2 * model.config.audio_config.max_source_positions
    batch = encode_batch(processor, [noise(0.05), tone(1.0), noise(4.0)], [PROMPT] * 3)
    assert batch["input_features"].shape == (3, 80, window)
    # one <|AUDIO|> per encoder output: 25 per second; the 0.05 s clip is padded to 0.1 s -> 2
    assert n_audio(processor, batch["input_ids"]).tolist() == [2, 25, 100]
    assert batch["feature_attention_mask"].sum(-1).tolist() == [10, 100, 400]
    # left padding for generation: every row ends with the same assistant header
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][0, 0] == 0
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_labels_cover_only_the_completion(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    comps = ["<answer>positive</answer>", "<think>slow</think><answer>negative</answer>"]
    batch = encode_batch(processor, [tone(1.0), noise(2.0)], [PROMPT] * 2, comps)
    for i, c in enumerate(comps):
        want = tok(c + "<|im_end|>", add_special_tokens=False)["input_ids"]
        lab = batch["labels"][i]
        assert lab[lab != IGNORE_INDEX].tolist() == want
        n = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :n].all()  # right padding for training
        assert batch["input_ids"][i, n - len(want) : n].tolist() == want
    # token-id completions (as sampled by generate) are used verbatim, without an extra end token
    ids_batch = encode_batch(processor, [tone(1.0)], [PROMPT], [[5, 6, 7]])
    lab = ids_batch["labels"][0]
    assert lab[lab != IGNORE_INDEX].tolist() == [5, 6, 7]
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    with pytest.raises(PallmError, match="audio special tokens"):
        encode_batch(processor, [tone(1.0)], [PROMPT], [[5, audio_id]])


def test_bad_inputs_are_pallm_errors(tiny):
    _, processor = tiny
    with pytest.raises(PallmError, match="match one to one"):
        encode_batch(processor, [tone(1.0)], [PROMPT, PROMPT])
    with pytest.raises(PallmError, match="mono"):
        encode_batch(processor, [np.zeros((2, SR), np.float32)], [PROMPT])
    with pytest.raises(PallmError, match="empty"):
        encode_batch(processor, [np.zeros(0, np.float32)], [PROMPT])
    with pytest.raises(PallmError, match="audio special token"):
        encode_batch(processor, [tone(1.0)], ["hear <|AUDIO|>"])


def test_long_clip_is_truncated_with_one_warning(tiny, monkeypatch):
    _, processor = tiny
    monkeypatch.setattr(batch_mod, "_truncation_warned", set())
    long = noise(6.0, seed=3)
    with pytest.warns(UserWarning, match="truncated"):
        b_long = encode_batch(processor, [long], [PROMPT])
    b_cut = encode_batch(processor, [long[: 4 * SR]], [PROMPT])
    assert n_audio(processor, b_long["input_ids"]).item() == 100
    assert torch.equal(b_long["input_features"], b_cut["input_features"])  # the first 4 s, exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process: a second long clip is silent
        encode_batch(processor, [long], [PROMPT])
    # a cap below the encoder window is PALLM's own cut (the feature extractor only knows the window)
    with pytest.warns(UserWarning, match="2 s"):
        b_cap = encode_batch(processor, [long], [PROMPT], max_audio_seconds=2.0)
    assert n_audio(processor, b_cap["input_ids"]).item() == 50
    assert b_cap["input_features"].shape[-1] == 400  # still padded to the full window


# --- training signal ----------------------------------------------------------------------------


def test_loss_is_finite_and_gradients_reach_encoder_and_lm(tiny):
    model, processor = tiny
    batch = encode_batch(processor, [tone(1.0), noise(2.0)], [PROMPT] * 2, ["<answer>positive</answer>", "<answer>negative</answer>"])
    model.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    m = model.model
    for name, p in [
        ("audio conv1", m.audio_tower.conv1.weight),
        ("audio layer 0", m.audio_tower.layers[0].self_attn.q_proj.weight),
        ("projector", m.multi_modal_projector.linear.weight),
        ("lm layer 0", m.language_model.layers[0].mlp.up_proj.weight),
        ("lm_head", model.lm_head.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()


def test_overfits_two_examples_that_differ_only_in_audio():
    """Same prompt, different clip, different answer: only learnable if the audio reaches the LM."""
    model, processor = build_tiny(TEXTS)
    audios, targets = [tone(1.0), noise(1.0)], ["<answer>positive</answer>", "<answer>negative</answer>"]
    losses = fit_two_clips(model, processor, audios, PROMPT, targets)
    assert losses[-1] < 0.1 * losses[0], losses
    # greedy decoding (left-padded batch, KV cache) reproduces each answer from its clip alone...
    assert generate(model, processor, audios, [PROMPT] * 2, max_new_tokens=12) == targets
    # ...and batching does not change the result
    assert generate(model, processor, audios[1:], [PROMPT], max_new_tokens=12) == targets[1:]


def test_rows_with_a_reference_clip_carry_both_clips_in_order(tiny):
    """(reference, clip) rows: two audio turns in the chat template, features row by row, clip by clip."""
    model, processor = tiny
    batch = encode_batch(processor, [(tone(1.0), noise(0.4)), noise(2.0)], [PROMPT] * 2)
    assert batch["input_features"].shape[0] == 3
    assert batch["feature_attention_mask"].sum(-1).tolist() == [100, 40, 200]
    assert n_audio(processor, batch["input_ids"]).tolist() == [35, 50]
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.count("<|audio_bos|>") == 2 and "Audio 1:" in text and "Audio 2:" in text
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_the_reference_clip_reaches_the_model_and_survives_sampling_expansion():
    """Same clip, different references, different answers: learnable only if the first audio turn
    reaches the LM. Sampling G per row must keep each row's clips together (transformers' own
    expansion would repeat feature rows, pairing copies with the wrong clips)."""
    model, processor = build_tiny(TEXTS)
    clip = noise(1.0, seed=3)
    audios, targets = [(tone(1.0), clip), (noise(1.0), clip)], ["<answer>positive</answer>", "<answer>negative</answer>"]
    losses = fit_two_clips(model, processor, audios, PROMPT, targets, steps=40)
    assert losses[-1] < 0.1 * losses[0], losses
    assert generate(model, processor, audios, [PROMPT] * 2, max_new_tokens=12) == targets
    torch.manual_seed(0)
    sampled = generate(model, processor, audios, [PROMPT] * 2, max_new_tokens=12, do_sample=True, temperature=0.05,
                       num_return_sequences=3)
    assert sampled == [targets[0]] * 3 + [targets[1]] * 3


def test_a_speaker_normalized_clip_has_its_speakers_mean_spectrum_taken_out(tiny):
    """prompt.speaker_norm: the clip alone is played (same tokens as without a reference), and on
    its valid frames each mel band moves by minus the reference's band mean (overall level kept);
    the window's padding and the other rows stay as they were."""
    model, processor = tiny
    clip, ref, other = noise(1.0, seed=1), tone(0.6, hz=330.0), noise(2.0)
    plain = encode_batch(processor, [clip, other], [PROMPT] * 2)
    normed = encode_batch(processor, [SpeakerNormalized(clip, ref), other], [PROMPT] * 2)
    assert torch.equal(plain["input_ids"], normed["input_ids"]) and normed["input_features"].shape[0] == 2
    fe = processor.feature_extractor
    r = fe([ref], sampling_rate=SR, return_attention_mask=True, return_tensors="np")
    band = r["input_features"][0][:, : int(r["attention_mask"][0].sum())].mean(1)
    shift = torch.from_numpy(band - band.mean())[:, None]
    n = int(plain["feature_attention_mask"][0].sum())
    assert n == 100 and shift.abs().max() > 0.1
    assert torch.allclose(normed["input_features"][0, :, :n], plain["input_features"][0, :, :n] - shift, atol=1e-5)
    assert torch.equal(normed["input_features"][0, :, n:], plain["input_features"][0, :, n:])
    assert torch.equal(normed["input_features"][1], plain["input_features"][1])
    # A clip normalised by itself has a flat mean spectrum: every band averages to the same value.
    own = encode_batch(processor, [SpeakerNormalized(clip, clip)], [PROMPT])["input_features"][0, :, :n].mean(1)
    assert float(own.max() - own.min()) < 1e-4 < float(plain["input_features"][0, :, :n].mean(1).std())
    with torch.no_grad():
        assert torch.isfinite(model(**normed).logits).all()


def test_generate_feeds_the_model_the_normalized_features(tiny, monkeypatch):
    """generate() (greedy, and sampling G per row) hands the model the speaker-normalised features."""
    model, processor = tiny
    audios = [SpeakerNormalized(noise(1.0, seed=3), tone(1.0)), noise(1.5)]
    want = encode_batch(processor, audios, [PROMPT] * 2)["input_features"]
    assert not torch.equal(want, encode_batch(processor, [audios[0].clip, audios[1]], [PROMPT] * 2)["input_features"])
    seen = []
    real = model.generate

    def spy(**kw):
        seen.append(kw["input_features"])
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    generate(model, processor, audios, [PROMPT] * 2, max_new_tokens=2)
    generate(model, processor, audios, [PROMPT] * 2, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    assert all(torch.equal(f, want) for f in seen) and len(seen) == 2


# --- generation ---------------------------------------------------------------------------------


def test_sampling_never_emits_audio_tokens_even_when_favoured():
    model, processor = build_tiny(TEXTS)
    tok = processor.tokenizer
    audio_ids = tok.convert_tokens_to_ids(list(AUDIO_SPECIAL_TOKENS))
    bias = torch.zeros(model.lm_head.out_features)
    bias[audio_ids] = 8.0  # pushes the audio tokens far above everything else

    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        batch = encode_batch(processor, [tone(1.0), noise(1.5)], [PROMPT] * 2)
        torch.manual_seed(0)
        raw = model.generate(**batch, max_new_tokens=8, do_sample=True, pad_token_id=tok.pad_token_id)
        new = raw[:, batch["input_ids"].shape[1] :]
        assert torch.isin(new, torch.tensor(audio_ids)).any()  # control: the bias works unsuppressed

        torch.manual_seed(0)
        texts, rows = generate(
            model, processor, [tone(1.0), noise(1.5)], [PROMPT] * 2,
            max_new_tokens=8, do_sample=True, temperature=1.0, num_return_sequences=3, return_ids=True,
        )
    finally:
        handle.remove()
    assert len(texts) == len(rows) == 6
    assert all(len(r) > 0 for r in rows)
    assert not any(set(audio_ids) & set(r) for r in rows)
    assert set(banned_token_ids(model, processor)) >= set(audio_ids)


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_reloads_with_plain_transformers_to_identical_logits(tiny, checkpoint):
    model, processor = tiny
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pallm.json"} <= names
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    assert read_pallm_meta(checkpoint)["task"] == "sentiment"
    assert read_pallm_meta(checkpoint)["family"] == "qwen2_audio"

    re_model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval()
    re_proc = AutoProcessor.from_pretrained(checkpoint)
    assert isinstance(re_proc, Qwen2AudioProcessor)
    audios, comps = [tone(1.0), noise(3.0)], ["<answer>positive</answer>", "x"]
    a = encode_batch(processor, audios, [PROMPT] * 2, comps)
    b = encode_batch(re_proc, audios, [PROMPT] * 2, comps)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model.eval()(**a).logits, re_model(**b).logits)

    m2, p2 = load_pretrained(checkpoint)  # and through PALLM's loader
    with torch.no_grad():
        assert torch.equal(m2(**a).logits, re_model(**a).logits)


def test_save_over_existing_checkpoint_replaces_it(tiny, tmp_path):
    model, processor = tiny
    out = save_checkpoint(model, processor, tmp_path / "ck", {"step": 1})
    save_checkpoint(model, processor, out, {"step": 2})
    assert read_pallm_meta(out)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(PallmError, match="JSON"):
        save_checkpoint(model, processor, tmp_path / "bad", {"x": object()})
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "remove, match",
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no model weights"),
        ("tokenizer.json", "no tokenizer"),
        ("processor_config.json", "feature extractor"),
    ],
)
def test_incomplete_checkpoint_is_a_clear_error(checkpoint, tmp_path, remove, match):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    assert (broken / remove).exists()
    (broken / remove).unlink()
    with pytest.raises(PallmError, match=match):
        load_pretrained(broken)


def test_missing_or_foreign_checkpoint_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(PallmError, match="not found"):
        load_pretrained(tmp_path / "nope")
    other = tmp_path / "bert"
    shutil.copytree(checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(PallmError, match="not a supported audio LLM"):
        load_pretrained(other)
    with pytest.raises(PallmError, match="model.family"):
        load_pretrained(checkpoint, ModelSpec(family="qwen2_audio_typo"))
