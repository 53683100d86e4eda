"""The second family: a tiny random Qwen2.5-Omni thinker (`model.family: qwen2_5_omni_thinker`).

Its processor is PALLM's `OmniAudioProcessor` (transformers' `Qwen2_5OmniProcessor` needs
torchvision for its video half); the tests pin it to the real class's output, check the thinker's
3-D RoPE through the rollout backend's prefill path, checkpoints (PALLM's and the released
full-Omni layout) and one CLI run of SFT -> GRPO -> eval. One thread; well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration
from typer.testing import CliRunner

from pallm.cli.main import app
from pallm.data.manifest import Row, write_manifest
from pallm.errors import ConfigError, PallmError
from pallm.model import (
    IGNORE_INDEX,
    ModelSpec,
    banned_token_ids,
    build_tiny,
    count_parameters,
    encode_batch,
    generate,
    load_pretrained,
    read_pallm_meta,
    save_checkpoint,
)
from pallm.model import omni as omni_mod
from pallm.model.families import family_of, get_family
from pallm.model.omni import OmniAudioProcessor
from pallm.train.grpo import PolicyScorer, completion_tensors
from pallm.train.rollout import HFBackend

from helpers import check_hf_backend_decoding, fit_two_clips

FAMILY = "qwen2_5_omni_thinker"
SPEC = ModelSpec(family=FAMILY, max_audio_seconds=2)  # 2 s window: 200 mel frames, 50 audio tokens max
SR = 16_000
PROMPT = "What is the speaker's sentiment?"
TEXTS = [
    "<think>The voice is bright, fast and loud.</think><answer>positive</answer>",
    "<think>Low pitch, slow and quiet.</think><answer>negative</answer>",
    "<answer>neutral</answer>",
    "<response>I am glad to hear that!</response>",
    PROMPT,
] * 10
SENTS = ("positive", "negative", "neutral")


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(TEXTS, SPEC)


@pytest.fixture(scope="module")
def real_processor(tiny):
    """transformers' own Qwen2_5OmniProcessor on the same tokenizer / feature extractor / template.
    Without torchvision its constructor refuses the missing video processor; the class check is
    skipped so its audio path (what the comparison needs) can run."""
    processor = tiny[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Qwen2_5OmniProcessor, "check_argument_for_proper_class", lambda self, name, arg: None)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessorPil(), video_processor=None,
                                    feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer,
                                    chat_template=processor.chat_template)


def n_audio(processor, ids: torch.Tensor) -> torch.Tensor:
    return (ids == processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum(-1)


# --- build, tokenizer, template -----------------------------------------------------------------


def test_tiny_thinker_sizes_tokens_and_template(tiny):
    model, processor = tiny
    assert isinstance(model, Qwen2_5OmniThinkerForConditionalGeneration) and isinstance(processor, OmniAudioProcessor)
    assert family_of(model).name == family_of(processor).name == FAMILY
    assert 500_000 <= count_parameters(model) <= 3_000_000
    assert count_parameters(model.model.visual) < 20_000  # built by the class, never fed
    cfg = model.config
    assert cfg.audio_config.num_mel_bins == 80 and cfg.audio_config.max_source_positions == 100
    assert not cfg.text_config.tie_word_embeddings and cfg.text_config.vocab_size == len(processor.tokenizer)
    tok = processor.tokenizer
    # named tokens, as Qwen2_5OmniProcessor reads them; ids in the real vocabulary's order
    assert (tok.audio_token, tok.audio_bos_token, tok.image_token, tok.vision_bos_token) == (
        "<|AUDIO|>", "<|audio_bos|>", "<|IMAGE|>", "<|vision_bos|>")
    order = ["<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>",
             "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"]
    ids = tok.convert_tokens_to_ids(order)
    assert ids == list(range(ids[0], ids[0] + len(order)))
    assert (cfg.audio_token_id, cfg.image_token_id, cfg.audio_start_token_id) == (ids[2], ids[7], ids[3])
    # the real Qwen2.5-Omni layout: no "Audio 1:" prefix, no newline after the clip
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]}]
    assert processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ConfigError, match="whole number of seconds"):
        build_tiny(TEXTS, ModelSpec(family=FAMILY, max_audio_seconds=1.5))
    with pytest.raises(ConfigError, match="qwen2_5_omni_thinker"):
        get_family("qwen2_5_omni")


# --- processor & batches ------------------------------------------------------------------------


def test_processor_output_equals_transformers_qwen2_5_omni_processor(tiny, real_processor):
    _, processor = tiny
    texts = [processor.apply_chat_template(get_family(FAMILY).messages(p, None), tokenize=False, add_generation_prompt=True)
             for p in (PROMPT, "Say more.")]
    audios = [tone(0.37), noise(3.0)]  # one shorter than the window, one cut by it
    ours = processor(text=texts, audio=audios, sampling_rate=SR, padding=False)
    real = real_processor(text=texts, audio=audios, sampling_rate=SR, padding=False)
    assert sorted(ours) == sorted(real)
    for k in ("input_ids", "attention_mask"):  # ragged lists (padding=False)
        assert [list(r) for r in ours[k]] == [list(r) for r in real[k]], k
    for k in ("input_features", "feature_attention_mask"):
        assert np.array_equal(ours[k], real[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 3 s clip's truncation warning (once per process)
        a = encode_batch(processor, audios, [PROMPT, "Say more."], ["<answer>positive</answer>", "x"])
        b = encode_batch(real_processor, audios, [PROMPT, "Say more."], ["<answer>positive</answer>", "x"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=["no clip here"], audio=[tone(1.0)])


def test_audio_tokens_match_the_encoder_output(tiny):
    model, processor = tiny
    audios = [noise(0.05), tone(1.0), noise(2.0)]
    batch = encode_batch(processor, audios, [PROMPT] * 3)
    assert batch["input_features"].shape == (3, 80, 200)
    assert batch["feature_attention_mask"].sum(-1).tolist() == [10, 100, 200]  # 0.05 s padded to 0.1 s
    counts = n_audio(processor, batch["input_ids"])
    assert counts.tolist() == [2, 25, 50]  # 25 per second
    with torch.no_grad():
        feats = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"]).last_hidden_state
    assert feats.shape[0] == int(counts.sum())  # one encoder output per placeholder, nothing left over


def test_forward_loss_labels_and_gradients(tiny):
    model, processor = tiny
    comps = ["<answer>positive</answer>", "<think>slow</think><answer>negative</answer>"]
    batch = encode_batch(processor, [tone(1.0), noise(1.5)], [PROMPT] * 2, comps)
    for i, c in enumerate(comps):
        lab = batch["labels"][i]
        assert lab[lab != IGNORE_INDEX].tolist() == processor.tokenizer(c + "<|im_end|>", add_special_tokens=False)["input_ids"]
    model.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    m = model.model
    for name, p in [("audio conv1", m.audio_tower.conv1.weight), ("audio proj", m.audio_tower.proj.weight),
                    ("lm layer 0", m.language_model.layers[0].mlp.up_proj.weight), ("lm_head", model.lm_head.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()


def test_learns_answers_that_only_the_audio_tells_apart_and_decodes_them():
    model, processor = build_tiny(TEXTS, SPEC)
    audios, targets = [tone(1.0), noise(1.0)], ["<answer>positive</answer>", "<answer>negative</answer>"]
    losses = fit_two_clips(model, processor, audios, PROMPT, targets)
    assert losses[-1] < 0.1 * losses[0], losses
    # greedy decoding with the KV cache and the thinker's own 3-D positions, batched and alone
    assert generate(model, processor, audios, [PROMPT] * 2, max_new_tokens=12) == targets
    assert generate(model, processor, audios[1:], [PROMPT], max_new_tokens=12) == targets[1:]


def test_sampling_never_emits_audio_or_vision_placeholders(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    placeholders = tok.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>",
                                              "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"])
    assert set(banned_token_ids(model, processor)) >= set(placeholders)
    bias = torch.zeros(model.lm_head.out_features)
    bias[placeholders] = 8.0  # on the logits (a hook), not on an embedding row
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        torch.manual_seed(0)
        _, rows = generate(model, processor, [tone(1.0)], [PROMPT], max_new_tokens=6, do_sample=True,
                           num_return_sequences=3, return_ids=True)
    finally:
        handle.remove()
    assert len(rows) == 3 and all(rows) and not any(set(placeholders) & set(r) for r in rows)


# --- GRPO: rollouts and scoring -------------------------------------------------------------------


def test_hf_backend_decodes_like_generate_with_3d_positions(tiny, monkeypatch):
    """The same with the thinker's [4, B, L] positions (tests/helpers.py), also after a generate
    call with another batch size (the thinker caches per-batch rope deltas between calls)."""
    model, processor = tiny
    audios, prompts = [noise(0.6, 1), noise(1.3, 2)], ["What is the sentiment?", "Describe how they sound."]
    generate(model, processor, audios + audios[:1], prompts + prompts[:1], max_new_tokens=2)  # batch of 3
    check_hf_backend_decoding(model, processor, audios, prompts, monkeypatch)


def test_hf_backend_samples(tiny):
    model, processor = tiny
    torch.manual_seed(3)
    ids = HFBackend(model, processor).generate([noise(0.6, 1)], ["What is the sentiment?"], 4, 1.0, 1.0, 10)
    assert len(ids) == 4 and len({tuple(r) for r in ids}) > 1


def test_policy_scorer_logprobs_equal_a_plain_forward(tiny):
    model, processor = tiny
    audios, prompts = [noise(0.4, 3), noise(1.5, 4)], ["short", "a somewhat longer prompt about the voice"]
    comps = [[20, 21, 22, 23, 24], [30, 31], [40, 41, 42], [50]]  # G = 2 per prompt
    enc = encode_batch(processor, audios, prompts, padding_side="left")
    ids, mask = completion_tensors(comps, 0)
    with torch.no_grad():
        logp, _ = PolicyScorer(model, temperature=1.0)(enc["input_ids"], enc["attention_mask"], enc["input_features"],
                                                        enc["feature_attention_mask"], ids, mask)
        plain = encode_batch(processor, [a for a in audios for _ in range(2)], [p for p in prompts for _ in range(2)], comps)
        lp = model(**{k: v for k, v in plain.items() if k != "labels"}).logits.log_softmax(-1)
    for i, c in enumerate(comps):
        pos = (plain["labels"][i] != IGNORE_INDEX).nonzero().squeeze(-1)
        want = lp[i, pos - 1].gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logp[i, : len(c)], want, atol=1e-4)


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    out = save_checkpoint(model, processor, tmp_path / "sft", {"task": "sentiment"})
    assert read_pallm_meta(out)["family"] == FAMILY
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "OmniAudioProcessor"
    m2, p2 = load_pretrained(out)
    assert isinstance(m2, Qwen2_5OmniThinkerForConditionalGeneration) and isinstance(p2, OmniAudioProcessor)
    audios, comps = [tone(1.0), noise(1.7)], ["<answer>positive</answer>", "x"]
    a = encode_batch(processor, audios, [PROMPT] * 2, comps)
    b = encode_batch(p2, audios, [PROMPT] * 2, comps)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plain = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out).eval()  # plain transformers too
    with torch.no_grad():
        ref = model.eval()(**a).logits
        assert torch.equal(ref, m2(**b).logits) and torch.equal(ref, plain(**a).logits)
    with pytest.raises(PallmError, match="model.family"):
        load_pretrained(out, ModelSpec(family="qwen2_audio"))


def test_released_full_omni_layout_loads_the_thinker(tiny, tmp_path, monkeypatch):
    """A folder shaped like Qwen/Qwen2.5-Omni-7B: config `qwen2_5_omni` with a `thinker_config`,
    weights under `thinker.` in the original names next to talker weights, and a
    preprocessor_config.json naming Qwen2_5OmniProcessor."""
    model, processor = tiny
    d = tmp_path / "omni"
    d.mkdir()
    legacy = {"model.audio_tower.": "audio_tower.", "model.visual.": "visual.", "model.language_model.": "model."}

    def released_name(k: str) -> str:
        for new, old in legacy.items():
            if k.startswith(new):
                return "thinker." + old + k[len(new):]
        return "thinker." + k

    weights = {released_name(k): v.contiguous() for k, v in model.state_dict().items()}
    weights["talker.codec_head.weight"] = torch.zeros(4, 4)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniModel"],
                                               "thinker_config": model.config.to_dict()}))
    processor.tokenizer.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({**processor.feature_extractor.to_dict(),
                                                            "processor_class": "Qwen2_5OmniProcessor"}))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))

    monkeypatch.setattr(omni_mod, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m2, p2 = load_pretrained(d, ModelSpec(family=FAMILY, name_or_path=str(d)))
    if importlib.util.find_spec("torchvision") is None:  # the real processor cannot be built: audio-only fallback
        assert isinstance(p2, OmniAudioProcessor)
        assert any("OmniAudioProcessor" in str(w.message) for w in caught)
        a, b = (encode_batch(p, [tone(1.0)], [PROMPT]) for p in (processor, p2))
        assert all(torch.equal(a[k], b[k]) for k in a)
    batch = encode_batch(processor, [tone(1.0), noise(0.8)], [PROMPT] * 2)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, m2(**batch).logits)

    # where Qwen2_5OmniProcessor can be built, it is the one used
    sentinel = object.__new__(Qwen2_5OmniProcessor)
    monkeypatch.setattr(Qwen2_5OmniProcessor, "from_pretrained", classmethod(lambda cls, src, **kw: sentinel))
    assert omni_mod.load_omni_processor(str(d)) is sentinel


# --- the command line, end to end -------------------------------------------------------------------


def make_corpus(base: Path) -> Path:
    """20 short tones: 10 train, 2 dev, 8 test, with everything the prompts and rewards read."""
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(20):
        sf.write(base / f"a{i}.wav", tone(0.5 + 0.1 * (i % 3), 150 + 40 * i) * 0.4, SR, subtype="PCM_16")
        rows.append(Row(id=f"u{i}", audio=f"a{i}.wav", corpus="toy", speaker=f"s{i % 4}",
                        split="train" if i < 10 else "dev" if i < 12 else "test", sentiment=SENTS[i % 3],
                        emotion=("happy", "sad", "neutral")[i % 3], transcript="I am here today",
                        lexical_sentiment="neutral", congruent=i % 3 == 2, response="That sounds good to me.",
                        cues={"pitch_level": "high", "pitch_variability": "mid", "loudness": "low", "rate": "mid",
                              "voice_quality": "mid"}))
    write_manifest(rows, base)
    return base


@pytest.mark.slow
def test_cli_sft_then_grpo_then_eval(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    runner = CliRunner()
    data = [f"data.corpus={corpus}", "data.measure_cues=false"]
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"

    r = runner.invoke(app, ["train", "sft", "--out", str(sft), f"model.family={FAMILY}", "model.max_audio_seconds=2",
                            *data, "sft.steps=2", "sft.batch_size=4", "sft.eval_every=0", "sft.save_every=0"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert read_pallm_meta(sft)["family"] == FAMILY

    r = runner.invoke(app, ["train", "grpo", "--init", str(sft), "--out", str(grpo), *data, "grpo.steps=2",
                            "grpo.per_device_batch_size=2", "grpo.num_generations=4", "grpo.max_completion_length=8",
                            "grpo.eval_every=0", "grpo.save_every=0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((grpo / "train_summary.json").read_text())["steps"] == 2
    model, processor = load_pretrained(grpo)
    assert isinstance(model, Qwen2_5OmniThinkerForConditionalGeneration) and isinstance(processor, OmniAudioProcessor)

    r = runner.invoke(app, ["eval", "--model", str(grpo), "--data", str(corpus), "--limit", "8"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    metrics = json.loads((grpo / "eval-test" / "metrics.json").read_text())
    assert metrics["subsets"]["all"]["n"] == 8
