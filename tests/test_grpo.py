"""Stage 2 (GRPO): the algorithm on hand-made tensors, the rollout backend, and short runs of the
trainer on the tiny Qwen2-Audio (learning, zero-variance groups, exact resume, LoRA reference,
2-process DDP). One CPU thread; the whole file runs in well under two minutes."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from helpers import check_hf_backend_decoding
from pallm.data.manifest import Row, read_manifest, write_manifest
from pallm.errors import ConfigError, PallmError
from pallm.model import banned_token_ids, build_tiny, encode_batch, generate, load_pretrained, read_pallm_meta
from pallm.prompts.format import PromptConfig, build_prompt
from pallm.train.common import AudioCache
from pallm.train.examples import tokenizer_texts
from pallm.train.grpo import (
    GRPOConfig,
    PolicyScorer,
    aggregate_loss,
    clipped_objective,
    completion_tensors,
    compute_advantages,
    disable_dropout,
    k3_kl,
    train_grpo,
)
from pallm.train import rollout
from pallm.train.rollout import HFBackend, RolloutBackend, cut_at_stop

NAN = float("nan")
SENTS = ("positive", "negative", "neutral")


def make_corpus(base: Path) -> Path:
    """12 short tones (10 train, 2 dev) with everything both tasks and all rewards read."""
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(12):
        t = np.arange(int(16_000 * (0.5 + 0.1 * (i % 3)))) / 16_000
        sf.write(base / f"a{i}.wav", (0.2 * np.sin(2 * np.pi * (150 + 40 * i) * t)).astype(np.float32), 16_000, subtype="PCM_16")
        rows.append(Row(id=f"u{i}", audio=f"a{i}.wav", corpus="toy", speaker=f"s{i % 2}", split="train" if i < 10 else "dev",
                        sentiment=SENTS[i % 3], emotion=("happy", "sad", "neutral")[i % 3], transcript="I am here today",
                        lexical_sentiment="neutral", congruent=i % 3 == 2, response="That sounds good to me.",
                        cues={"pitch_level": "high", "pitch_variability": "mid", "loudness": "low", "rate": "mid"}))
    write_manifest(rows, base)
    return base


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny(corpus):
    return build_tiny(tokenizer_texts(read_manifest(corpus), PromptConfig()))


def small(**kw) -> GRPOConfig:
    base = dict(steps=2, per_device_batch_size=2, num_generations=4, max_completion_length=8, save_every=0, eval_every=0,
                learning_rate=1e-3)
    return GRPOConfig(**{**base, **kw})


def text_hash_reward(prompts, completions, **kw):
    """A reward that differs between (almost) any two different texts: every group has variance."""
    return [int(hashlib.sha1(c.encode()).hexdigest()[:6], 16) / 16**6 for c in completions]


def neutral_is_flat(prompts, completions, **kw):
    """`text_hash_reward`, except that groups of neutral rows all get 0.5: zero-variance groups."""
    return [0.5 if s == "neutral" else v for s, v in zip(kw["sentiment"], text_hash_reward(prompts, completions))]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


# --- advantages ---------------------------------------------------------------------------------


def test_advantages_group_batch_none_exact():
    r = torch.tensor([[1.0], [0.0], [0.0], [0.0], [2.0], [2.0], [2.0], [2.0]])
    w = torch.tensor([1.0])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    adv, total, zero = compute_advantages(r, w, 4, "group")
    # group 1: mean .25, sample std .5; group 2: constant -> 0 (TRL's 1e-4 keeps it finite)
    assert torch.allclose(adv, centred / torch.tensor([0.5 + 1e-4] * 4 + [1e-4] * 4), atol=1e-6)
    assert zero.tolist() == [False, True]
    assert torch.equal(total, r[:, 0])
    adv, _, _ = compute_advantages(r, w, 4, "batch")
    batch_std = math.sqrt(6.875 / 7)  # sample std of [1,0,0,0,2,2,2,2]
    assert torch.allclose(adv, centred / (batch_std + 1e-4), atol=1e-6)
    adv, _, zero = compute_advantages(r, w, 4, "none")
    assert torch.allclose(adv, centred, atol=1e-7)
    assert zero.tolist() == [False, True]  # accounting does not depend on the scaling
    with pytest.raises(ValueError):
        compute_advantages(r, w, 3)


def test_none_routes_tasks_and_unscorable_rows_get_zero():
    # 3 groups of 2, 2 functions (weights 1, 2). A: only f1 applies (classify); B: only f2
    # (respond); C: row 0 unscorable (every function None), row 1 scored by f1.
    r = torch.tensor([[1.0, NAN], [0.0, NAN], [NAN, 0.5], [NAN, 0.25], [NAN, NAN], [1.0, NAN]])
    w = torch.tensor([1.0, 2.0])
    adv, total, zero = compute_advantages(r, w, 2, "group", "sum_then_normalize")
    assert torch.allclose(total[:4], torch.tensor([1.0, 0.0, 1.0, 0.5]))  # None is absent, not 0
    assert math.isnan(total[4]) and total[5] == 1.0
    sa, sb = 0.5 / (math.sqrt(0.5) + 1e-4), 0.25 / (math.sqrt(0.125) + 1e-4)
    assert torch.allclose(adv, torch.tensor([sa, -sa, sb, -sb, 0.0, 0.0]), atol=1e-6)
    # Were None read as 0, group C would be [0, 1] and get advantages of +-0.707.
    assert zero.tolist() == [False, False, True]

    adv, _, _ = compute_advantages(r, w, 2, "group", "normalize_then_sum")
    # Each function normalised within its group (where it applies), weighted sum, then the batch.
    na, nb = 0.5 / (math.sqrt(0.5) + 1e-4), 2 * 0.125 / (math.sqrt(0.03125) + 1e-4)  # f2 normalised unweighted
    summed = np.array([na, -na, nb, -nb, 0.0])  # C1: f1 alone in its group -> no std -> 0; C0 left out
    expected = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-4)
    assert np.allclose(adv.numpy(), np.insert(expected, 4, 0.0), atol=1e-5)


# --- losses -------------------------------------------------------------------------------------


def test_loss_type_normalisations():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])  # 100s are padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_loss(per_token, mask, "grpo", 4).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_loss(per_token, mask, "dr_grpo", 4).item() == pytest.approx(10 / (2 * 4))
    assert aggregate_loss(per_token, mask, "dr_grpo", 10).item() == pytest.approx(10 / (2 * 10))
    assert aggregate_loss(per_token, mask, "dapo", 4).item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "dapo", 4, num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError):
        aggregate_loss(per_token, mask, "bnpo", 4)


def test_clipped_objective_inside_and_outside_the_range():
    old = torch.zeros(2, 3)
    ratios = torch.tensor([[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]])
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = clipped_objective(logp, old, adv, 0.2, 0.28)
    expected = torch.tensor([[-1.1, -1.28, -0.5],  # A>0: only ratio > 1.28 is clipped
                             [1.1, 1.5, 0.8]])  # A<0: only ratio < 0.8 is clipped
    assert torch.allclose(loss, expected, atol=1e-6)
    assert clipped.tolist() == [[False, True, False], [False, False, True]]
    loss.sum().backward()
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~clipped] != 0).all()  # clipped tokens get no gradient
    # ratio 1 (num_iterations == 1): the loss is -A per token and its gradient is -A
    lp = torch.zeros(1, 2, requires_grad=True)
    loss, clipped = clipped_objective(lp, lp.detach(), torch.tensor([0.7]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([[-0.7, -0.7]])) and not clipped.any()
    assert torch.allclose(lp.grad, torch.tensor([[-0.7, -0.7]]))


def test_k3_kl_zero_iff_policy_equals_reference():
    logp = torch.log(torch.tensor([0.5, 0.1, 0.9]))
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    ref = torch.log(torch.tensor([0.25, 0.2, 0.5]))
    kl = k3_kl(logp, ref)
    assert (kl > 0).all()
    assert kl[0].item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)


def test_completion_mask_stops_at_the_first_eos():
    rows = cut_at_stop([[5, 6, 2, 7, 7], [8], [9, 9, 9]], stop=[2])
    assert rows == [[5, 6, 2], [8], [9, 9, 9]]  # EOS kept (the model must learn to stop), nothing after
    ids, mask = completion_tensors(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 2], [8, 0, 0], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 1]]


def test_config_validation():
    with pytest.raises(ValidationError, match="reward_weights"):
        GRPOConfig(reward_funcs=["format", "length_penalty"], reward_weights=[1.0])
    with pytest.raises(ValidationError):
        GRPOConfig(num_generations=1)  # one completion per group has no group statistics
    with pytest.raises(ValidationError):
        GRPOConfig(loss_type="bnpo")
    with pytest.raises(ValidationError):
        GRPOConfig(task_weights={"classify": 0.0})
    with pytest.raises(ValidationError):
        GRPOConfig(stepz=3)
    assert GRPOConfig(epsilon=0.2).epsilon_hi == 0.2 and GRPOConfig(epsilon_high=0.28).epsilon_hi == 0.28


# --- rollout and scoring ------------------------------------------------------------------------


def test_hf_backend_decodes_like_generate(tiny, monkeypatch):
    """Prefill once per prompt, repeated KV cache, finished rows dropped from the batch: same tokens
    and same sampling distributions as the model itself (tests/helpers.py)."""
    model, processor = tiny
    rng = np.random.default_rng(0)
    audios = [(0.3 * rng.standard_normal(int(16_000 * s))).astype(np.float32) for s in (0.6, 1.3, 0.9)]
    prompts = ["What is the sentiment?", "Describe how they sound, then answer.", "Listen."]
    check_hf_backend_decoding(model, processor, audios, prompts, monkeypatch)


def test_hf_backend_samples(tiny):
    model, processor = tiny
    audios = [(0.3 * np.random.default_rng(0).standard_normal(16_000)).astype(np.float32)]
    torch.manual_seed(3)
    ids = HFBackend(model, processor).generate(audios, ["What is the sentiment?"], 6, 1.0, 1.0, 12)
    assert len(ids) == 6 and len({tuple(r) for r in ids}) > 1
    banned = set(banned_token_ids(model, processor))
    assert not banned & {t for r in ids for t in r}


def test_sample_tokens_draws_from_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.0, 0.8]])
    torch.manual_seed(0)
    n = 20_000
    draws = torch.stack([rollout.sample_tokens(probs) for _ in range(n)])  # [n, rows]
    freq = torch.stack([torch.bincount(draws[:, i], minlength=4) for i in range(3)]).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.015)
    assert (freq[probs == 0] == 0).all()  # zero-probability tokens are never drawn


def test_reserved_cache_layer_follows_a_dynamic_layer():
    """The decoding cache writes into reserved room instead of concatenating; through prefill,
    repeats, steps, rows leaving and growth past the room it holds what a DynamicLayer holds."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    plain = DynamicLayer()
    plain.update(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4))
    reserved = rollout._ReservedLayer(copy.deepcopy(plain), room=2)
    plain.batch_repeat_interleave(3)
    reserved.batch_repeat_interleave(3)
    steps = [None, torch.tensor([0, 2, 3, 5]), None, torch.tensor([1, 3])]  # 4 steps > room: it grows
    for keep in steps:
        if keep is not None:
            plain.batch_select_indices(keep)
            reserved.batch_select_indices(keep)
        k, v = torch.randn(plain.keys.shape[0], 2, 1, 4), torch.randn(plain.keys.shape[0], 2, 1, 4)
        want, got = plain.update(k, v), reserved.update(k, v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert reserved.get_seq_length() == plain.get_seq_length()
    assert reserved.keys.shape == (2, 2, 9, 4)


@pytest.mark.parametrize("chunks", [1, 2])
def test_scorer_logprobs_equal_a_plain_forward(tiny, chunks):
    """The scorer's layout (each prompt encoded once, left-padded, shared by its G completions,
    which are right-padded after it; groups scored in `chunks` passes, each padded to its own
    longest completion) gives the log-probs of an ordinary right-padded forward pass over every
    (clip, prompt, completion) row, for clips and completions of different lengths."""
    model, processor = tiny
    rng = np.random.default_rng(1)
    audios = [(0.3 * rng.standard_normal(int(16_000 * s))).astype(np.float32) for s in (0.4, 1.5, 0.8)]
    prompts = ["short", "a somewhat longer prompt about the voice", "a middle one"]
    comps = [[20, 21, 22, 23, 24], [30, 31], [40, 41, 42], [50], [60, 61, 62, 63], [70]]  # G = 2 per prompt
    enc = encode_batch(processor, audios, prompts, padding_side="left")
    ids, mask = completion_tensors(comps, 0)
    args = (enc["input_ids"], enc["attention_mask"], enc["input_features"], enc["feature_attention_mask"], ids, mask)
    logp, entropy = PolicyScorer(model, temperature=1.0, max_chunks=chunks)(*args)
    plain = encode_batch(processor, [a for a in audios for _ in range(2)], [p for p in prompts for _ in range(2)], comps)
    with torch.no_grad():
        lp = model(**{k: v for k, v in plain.items() if k != "labels"}).logits.log_softmax(-1)
    for i, c in enumerate(comps):
        pos = (plain["labels"][i] != -100).nonzero().squeeze(-1)
        want = lp[i, pos - 1].gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logp[i, : len(c)], want, atol=1e-4)
    assert (entropy[mask.bool()] > 0).all()
    # gradients reach the audio encoder through the shared prompt embeddings
    model.zero_grad()
    (logp * mask).sum().backward()
    assert model.model.audio_tower.conv1.weight.grad.abs().sum() > 0
    model.zero_grad()
    # temperature divides the logits: the scored distribution is the one sampled from
    hot, _ = PolicyScorer(model, temperature=2.0, max_chunks=chunks)(*args)
    assert not torch.allclose(hot, logp)


def test_scorer_chunks_give_the_same_gradients(tiny):
    model, processor = tiny
    rng = np.random.default_rng(2)
    audios = [(0.3 * rng.standard_normal(int(16_000 * s))).astype(np.float32) for s in (0.5, 1.2, 0.7, 0.9)]
    enc = encode_batch(processor, audios, ["a", "bb bb", "ccc ccc ccc", "d"], padding_side="left")
    ids, mask = completion_tensors([[5 + i] * n for i, n in enumerate([7, 1, 2, 2, 5, 3, 1, 1])], 0)  # G = 2
    args = (enc["input_ids"], enc["attention_mask"], enc["input_features"], enc["feature_attention_mask"], ids, mask)
    grads = []
    for chunks in (1, 2, 4):
        model.zero_grad()
        logp, entropy = PolicyScorer(model, temperature=1.0, max_chunks=chunks)(*args)
        ((logp + 0.1 * entropy) * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert all(torch.allclose(g, grads[0], atol=1e-5) for g in grads[1:])


def test_scorer_shared_prompt_pass_equals_full_rows(tiny):
    """Each prompt runs through the language model once and its keys/values serve its G
    completions. That must give the log-probs AND the gradients of running every full
    (prompt + completion) row, which is the path gradient checkpointing takes."""
    model = copy.deepcopy(tiny[0])
    processor = tiny[1]
    disable_dropout(model)
    rng = np.random.default_rng(2)
    audios = [(0.3 * rng.standard_normal(int(16_000 * s))).astype(np.float32) for s in (0.5, 1.2, 0.8)]
    prompts = ["one", "a somewhat longer prompt about the voice", "mid length prompt"]
    comps = [[20, 21, 22], [30], [40, 41, 42, 43], [50, 51], [60, 61, 62, 63, 64], [70]]  # G = 2
    enc = encode_batch(processor, audios, prompts, padding_side="left")
    ids, mask = completion_tensors(comps, 0)
    args = (enc["input_ids"], enc["attention_mask"], enc["input_features"], enc["feature_attention_mask"], ids, mask)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logp, entropy = PolicyScorer(model, temperature=0.7)(*args)
        ((logp * weights * mask).sum() + (entropy * mask).sum()).backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.eval()
    shared, g_shared = run()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    full, g_full = run()
    model.gradient_checkpointing_disable()
    assert torch.allclose(shared * mask, full * mask, atol=1e-5)
    assert g_shared.keys() == g_full.keys() and len(g_full) > 10
    for n in g_full:
        assert torch.allclose(g_shared[n], g_full[n], atol=1e-5, rtol=1e-4), n


# --- the trainer ----------------------------------------------------------------------------------

ANSWERS = ("<answer>positive</answer>", "<answer>negative</answer>", "<answer>neutral</answer>")


@pytest.fixture(scope="module")
def answering(corpus, tiny):
    """The tiny model after a few SFT steps: it answers one of the three labels, about evenly."""
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    rows = read_manifest(corpus, split="train")
    cache = AudioCache()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    torch.manual_seed(0)
    for s in range(30):
        batch_rows = [rows[(s * 3 + k) % len(rows)] for k in range(6)]
        b = encode_batch(processor, [cache.get(r) for r in batch_rows],
                         [build_prompt("classify", r, PromptConfig()) for r in batch_rows], [ANSWERS[k % 3] for k in range(6)])
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), processor


def p_positive(model, processor, corpus) -> float:
    """Exact mean probability of starting with `<answer>positive</answer>` on six train prompts."""
    rows = read_manifest(corpus, split="train")[:6]
    comp = [processor.tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"]] * 6
    enc = encode_batch(processor, [AudioCache().get(r) for r in rows], [build_prompt("classify", r, PromptConfig()) for r in rows],
                       padding_side="left")
    ids, mask = completion_tensors(comp, 0)
    with torch.no_grad():
        logp, _ = PolicyScorer(model, 1.0)(enc["input_ids"], enc["attention_mask"], enc["input_features"],
                                           enc["feature_attention_mask"], ids, mask, with_entropy=False)
    return float(logp.sum(-1).exp().mean())


def test_grpo_increases_a_learnable_reward(answering, corpus, tmp_path):
    model, processor = copy.deepcopy(answering[0]), answering[1]

    def says_positive(prompts, completions, **kw):
        # "starts with", not "contains": with "contains" the tiny model soon learns to emit
        # "</answer><answer>positive</answer>", which scores but is not what p_positive measures.
        return [float(c.startswith(ANSWERS[0])) for c in completions]

    before = p_positive(model, processor, corpus)
    # lr 5e-4: learns on every seed tried (0-5: p 0.29 -> 0.71-0.80); at 2e-3 Adam's momentum
    # overshoots on some seeds once a batch is all-correct (zero gradient) and the model collapses.
    cfg = small(steps=10, learning_rate=5e-4, num_generations=8, max_completion_length=6, task_weights={"classify": 1.0},
                reward_funcs=["says_positive"])
    summary = train_grpo(cfg, PromptConfig(), corpus, (model, processor), tmp_path / "run", reward_fns={"says_positive": says_positive})
    after = p_positive(model, processor, corpus)  # trained in place
    assert 0.1 < before < 0.5  # the SFT model answers one of three labels
    assert after > before + 0.3, (before, after)
    rewards = [r["reward"] for r in log_records(tmp_path / "run")]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:2])
    assert summary["steps"] == 10 and summary["completions"] == 10 * 2 * 8


def test_zero_variance_groups_counted_and_refilled(tiny, corpus, tmp_path):
    seen: list[list[str]] = []  # row ids per reward call, one per group

    def flat_seen(prompts, completions, **kw):
        seen.append(kw["id"][::4])
        return neutral_is_flat(prompts, completions, **kw)

    rows = {r.id: r for r in read_manifest(corpus)}
    cfg = small(steps=3, reward_funcs=["flat"], task_weights={"classify": 1.0})
    train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "a", reward_fns={"flat": flat_seen})
    logs = log_records(tmp_path / "a")
    for rec, ids in zip(logs, seen):  # one reward call per step without dynamic sampling
        flat = sum(rows[i].sentiment == "neutral" for i in ids) / len(ids)
        assert rec["zero_var_frac"] == pytest.approx(flat) and rec["zero_var_frac_sampled"] == pytest.approx(flat)
        assert rec["refilled_groups"] == 0
    assert any(r["zero_var_frac"] > 0 for r in logs), "the fixture stream must contain neutral rows"

    seen.clear()
    cfg = small(steps=3, reward_funcs=["flat"], task_weights={"classify": 1.0}, dynamic_sampling=True, dynamic_sampling_max_tries=3)
    train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "b", reward_fns={"flat": flat_seen})
    logs = log_records(tmp_path / "b")
    assert sum(r["refilled_groups"] for r in logs) > 0
    assert len(seen) > 3  # refills re-sampled
    for r in logs:
        assert r["zero_var_frac"] <= r["zero_var_frac_sampled"]
    assert sum(r["zero_var_frac"] for r in logs) < sum(r["zero_var_frac_sampled"] for r in logs)


def test_prompts_encoded_once_and_scored_as_sampled(tiny, corpus, tmp_path, monkeypatch):
    """The trainer encodes a prompt batch once: its backend decodes from that encoding (it never
    encodes again), and the update scores the prompts the completions were sampled for, also when
    dynamic sampling replaced some of them."""
    from pallm.evaluate.predict import row_audio
    from pallm.train import grpo as grpo_module
    from pallm.train import rollout as rollout_module

    encoded: dict[int, tuple] = {}  # id of an encoding's input_ids -> the (clips, prompts) encoded
    real_encode, real_micro = grpo_module.encode_batch, grpo_module.MicroBatch

    def recording_encode(processor, audios, prompts, *args, **kwargs):
        enc = real_encode(processor, audios, prompts, *args, **kwargs)
        encoded[id(enc["input_ids"])] = (list(audios), list(prompts))
        return enc

    built = []

    def recording_micro(*args, **kwargs):
        m = real_micro(*args, **kwargs)
        built.append((m, encoded.get(id(m.prompt["prompt_ids"]))))
        return m

    def encoded_again(*args, **kwargs):
        raise AssertionError("the backend encoded prompts the trainer had encoded")

    monkeypatch.setattr(grpo_module, "encode_batch", recording_encode)
    monkeypatch.setattr(grpo_module, "MicroBatch", recording_micro)
    monkeypatch.setattr(rollout_module, "encode_batch", encoded_again)

    cfg = small(steps=3, reward_funcs=["flat"], task_weights={"classify": 1.0}, dynamic_sampling=True,
                dynamic_sampling_max_tries=3)
    train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "r", reward_fns={"flat": neutral_is_flat})
    assert sum(r["refilled_groups"] for r in log_records(tmp_path / "r")) > 0, "the run must replace some prompts"
    assert len(built) == 3
    for m, (clips, prompts) in built:  # (prompt texts can repeat; the clips tell the rows apart)
        assert prompts == [e.prompt for e in m.examples]
        assert all(np.array_equal(c, row_audio(e.row)) for c, e in zip(clips, m.examples))


def test_constant_reward_gives_no_update(tiny, corpus, tmp_path):
    """Every group zero-variance: advantages are 0, so is the gradient; the weights do not move."""
    model = copy.deepcopy(tiny[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_grpo(small(steps=2, reward_funcs=["one"]), PromptConfig(), corpus, (model, tiny[1]), tmp_path / "r",
               reward_fns={"one": lambda prompts, completions, **kw: [1.0] * len(completions)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    logs = log_records(tmp_path / "r")
    assert all(r["zero_var_frac"] == 1.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in logs)


def strip_times(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "time" and not k.startswith("time/") and "per_s" not in k}


def test_exact_resume_and_final_checkpoint(tiny, corpus, tmp_path):
    """Interrupted after the step-2 checkpoint and resumed = one uninterrupted run, bit for bit
    (weights, logged rewards/losses), with every stateful feature on."""
    cfg = small(steps=6, save_every=2, beta=0.05, num_iterations=2, dynamic_sampling=True, oversample_hard=0.3,
                scale_rewards="batch", class_balance=1.0, ptx_coef=0.5, ptx_batch_size=2, reward_funcs=["format", "sentiment_accuracy", "hash"], reward_weights=[0.5, 1.0, 1.0])
    fns = {"hash": text_hash_reward}
    whole = train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "A", reward_fns=fns)

    class Interrupt(Exception):
        pass

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "B", reward_fns=fns, progress=stop_at_3)
    assert sorted(p.name for p in (tmp_path / "B" / "checkpoints").iterdir()) == ["step-2"]
    resumed = train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "B", reward_fns=fns)
    assert resumed["resumed_from"] == 2 and whole["resumed_from"] is None

    a, b = load_file(tmp_path / "A" / "model.safetensors"), load_file(tmp_path / "B" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = log_records(tmp_path / "A"), log_records(tmp_path / "B")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 7))
    assert [strip_times(r) for r in la] == [strip_times(r) for r in lb]

    # The final model: a plain from_pretrained folder with stage-2 metadata and per-task logs.
    model, processor = load_pretrained(tmp_path / "A")
    meta = read_pallm_meta(tmp_path / "A")
    assert meta["stage"] == "grpo" and meta["train_config"]["beta"] == 0.05 and meta["labels"] == ["negative", "neutral", "positive"]
    init, trained = tiny[0].state_dict(), model.state_dict()
    assert trained.keys() == init.keys() and any(not torch.equal(trained[k], init[k]) for k in init)  # it trained
    first = la[0]
    for key in ("reward", "rewards/format", "rewards/hash", "classify/accuracy", "classify/parse_rate", "respond/reward",
                "kl", "entropy", "clip_frac", "completion_length", "zero_var_frac", "time/generate", "time/reward",
                "time/backward", "examples_per_s", "classify/kl", "respond/entropy"):
        assert key in first, key
    assert "rewards/sentiment_accuracy" in first and "respond/rewards/sentiment_accuracy" not in first  # None routes
    assert la[1]["clip_frac"] >= 0 and "reward" not in la[1]  # 2nd pass over the same generations
    with pytest.raises(PallmError, match="finished run"):
        train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "A", reward_fns=fns)


def test_lora_reference_is_the_adapter_disabled_model(tiny, corpus, tmp_path, monkeypatch):
    """beta > 0 with LoRA: no second model in memory; KL is exactly 0 before the first update."""
    made = []
    real_init = PolicyScorer.__init__

    def counting_init(self, policy, temperature):
        made.append(type(policy).__name__)
        real_init(self, policy, temperature)

    monkeypatch.setattr(PolicyScorer, "__init__", counting_init)
    cfg = small(steps=3, beta=0.1, learning_rate=1e-2, lora={"enabled": True, "r": 4}, reward_funcs=["hash"])
    train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), tmp_path / "L", reward_fns={"hash": text_hash_reward})
    assert made == ["PeftModel"]  # the policy's scorer only; the reference is the same module
    logs = log_records(tmp_path / "L")
    assert logs[0]["kl"] == 0.0 and logs[-1]["kl"] > 0
    model, _ = load_pretrained(tmp_path / "L")  # merged
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"

    made.clear()
    train_grpo(small(steps=1, beta=0.1, reward_funcs=["hash"]), PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]),
               tmp_path / "F", reward_fns={"hash": text_hash_reward})
    assert len(made) == 2  # full fine-tuning: the policy and a frozen copy of the init


def test_unknown_reward_and_unservable_task(tiny, corpus, tmp_path):
    with pytest.raises(PallmError, match="unknown reward"):
        train_grpo(small(reward_funcs=["nope"]), PromptConfig(), corpus, tiny, tmp_path / "x")
    rows = [r.model_copy(update={"response": None}) for r in read_manifest(corpus, resolve_audio=False)]
    base = tmp_path / "noreply"
    shutil.copytree(corpus, base)
    write_manifest(rows, base, overwrite=True)
    with pytest.raises(PallmError, match="respond"):
        train_grpo(small(), PromptConfig(), base, tiny, tmp_path / "y")
    with pytest.raises(ConfigError, match="vLLM computes itself"):  # before any engine or model is touched
        train_grpo(small(use_vllm=True), PromptConfig(speaker_norm=True), corpus, tiny, tmp_path / "z")
    assert not (tmp_path / "z").exists()


DDP_SCRIPT = """
import hashlib, json, os, sys
import torch
from pallm.data.manifest import read_manifest
from pallm.model import build_tiny
from pallm.prompts.format import PromptConfig
from pallm.train.examples import tokenizer_texts
from pallm.train.grpo import GRPOConfig, train_grpo

corpus, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
calls = []
def hashed(prompts, completions, **kw):
    r = [int(hashlib.sha1(c.encode()).hexdigest()[:6], 16) / 16**6 for c in completions]
    calls.append(r)
    return r
model, proc = build_tiny(tokenizer_texts(read_manifest(corpus), PromptConfig()))
cfg = GRPOConfig(steps=2, per_device_batch_size=2, num_generations=4, max_completion_length=8, save_every=1, eval_every=1,
                 eval_rows=2, load_best_model_at_end=True, metric_for_best_model="parse_rate",
                 scale_rewards="batch", learning_rate=1e-3, reward_funcs=["hashed"], ptx_coef=0.5, ptx_batch_size=2,
                 class_balance=1.0)
s = train_grpo(cfg, PromptConfig(), corpus, (model, proc), out, reward_fns={"hashed": hashed})
h = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
json.dump({"hash": h, "first_rewards": calls[0], "summary": s}, open(os.path.join(out, f"rank{rank}.json"), "w"))
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(corpus, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): rewards gathered before normalisation,
    weights identical on both ranks after the updates (the ptx term on too: its gradients are
    all-reduced with the RL ones), and the best-on-dev model, judged on rank 0 only, kept and
    published by both ranks (a collective save)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate CLI not found")
    script, out = tmp_path / "ddp.py", tmp_path / "run"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"  # the shipped one
    cmd = [launcher, "launch", "--config_file", str(config), "--main_process_port", "29517", str(script), str(corpus), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["hash"] == r1["hash"]  # DDP kept the weights in sync
    assert r0["summary"]["processes"] == 2 and r0["summary"]["completions"] == 2 * 2 * 2 * 4
    logged = log_records(out)[0]["reward"]
    both = np.mean(r0["first_rewards"] + r1["first_rewards"])
    assert logged == pytest.approx(both, abs=1e-6)  # metrics (and batch statistics) span both ranks
    assert logged != pytest.approx(np.mean(r0["first_rewards"]), abs=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    meta = read_pallm_meta(out)
    best = meta["summary"]["best_model"]
    assert meta["stage"] == "grpo" and best == r0["summary"]["best_model"] == r1["summary"]["best_model"]
    assert best["step"] in (1, 2) and meta.get("step", 2) == best["step"]


def test_conflict_share_draws_conflict_rows_as_classify_prompts(corpus):
    from pallm.train.examples import ExampleStream
    from pallm.train.grpo import PromptSampler

    rows = [r for r in read_manifest(corpus) if r.split == "train"]
    stream = ExampleStream(rows, {"classify": 0.5, "respond": 0.5}, PromptConfig(), list(SENTS), seed=0)
    conflict = {r.id for r in rows if r.congruent is False}

    def share(s: float) -> float:
        sampler = PromptSampler(stream, rows, PromptConfig(), list(SENTS), 0.0, seed=0, conflict_share=s)
        draws = sampler.draw(2000)
        return np.mean([e.row.id in conflict and e.task == "classify" for e in draws])

    base = len(conflict) / len(rows) * 0.5  # the stream alone: conflict rows, half of them as classify
    assert share(0.0) == pytest.approx(base, abs=0.04)
    assert share(0.6) == pytest.approx(0.6 + 0.4 * base, abs=0.04)


def test_class_recall_weights_the_class_being_lost():
    from pallm.train.examples import Example
    from pallm.train.grpo import ClassRecall

    rows = [Row(id=f"r{i}", audio="x.wav", corpus="toy", speaker="s", split="train", sentiment=s, emotion=e)
            for i, (s, e) in enumerate([("negative", "angry"), ("positive", "happy"), ("negative", "sad"), ("neutral", None)])]
    tracker = ClassRecall(rows, PromptConfig(), strength=1.0, momentum=0.5)
    assert tracker.class_weights() == {} and tracker.group_weights([Example(rows[0], "classify", "", "")]) == [1.0]
    tracker.update([("r0", 0.2), ("r1", 1.0), ("r3", 0.5), ("unknown", 0.0)])
    tracker.update([("r0", 0.0)])  # EMA: 0.5 * 0.2 + 0.5 * 0.0
    assert tracker.recall == pytest.approx({"angry": 0.1, "happy": 1.0, "neutral": 0.5})  # no emotion: the gold label
    w = tracker.class_weights()
    assert sum(w.values()) / 3 == pytest.approx(1.0)
    assert w["angry"] == pytest.approx(10 * w["happy"]) and w["neutral"] == pytest.approx(2 * w["happy"])
    ex = [Example(rows[0], "classify", "", ""), Example(rows[0], "respond", "", ""), Example(rows[2], "classify", "", "")]
    assert tracker.group_weights(ex) == [pytest.approx(w["angry"]), 1.0, 1.0]  # respond, and a class not seen yet: 1

    tracker.update([("r0", 0.0)] * 20)
    assert tracker.class_weights()["angry"] == pytest.approx(3 * (1 / 0.05) / (1 / 0.05 + 1 + 2))  # floored at 0.05
    twin = ClassRecall(rows, PromptConfig(), strength=1.0)
    twin.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert twin.recall == tracker.recall
    off = ClassRecall(rows, PromptConfig(), strength=0.0)
    off.load_state_dict(tracker.state_dict())
    assert off.class_weights() == {} and "classify/recall/angry" in off.stats()  # tracked and logged, not applied


def test_class_balance_changes_the_updates_once_recall_differs(answering, corpus, tmp_path):
    """The first round has no recall yet (weights 1): the same update; later rounds weight the
    groups, so the runs part."""
    runs = {}
    for strength in (0.0, 2.0):
        model = copy.deepcopy(answering[0])
        cfg = small(steps=4, learning_rate=5e-4, max_completion_length=6, task_weights={"classify": 1.0},
                    reward_funcs=["sentiment_accuracy"], class_balance=strength)
        train_grpo(cfg, PromptConfig(), corpus, (model, answering[1]), tmp_path / f"b{strength}")
        runs[strength] = (log_records(tmp_path / f"b{strength}"), model.state_dict())
    (plain, w0), (balanced, w2) = runs[0.0], runs[2.0]
    assert plain[0]["loss"] == balanced[0]["loss"]
    assert any(k.startswith("classify/recall/") for k in plain[0]) and not any("class_weight" in k for k in plain[-1])
    weights = [v for k, v in balanced[-1].items() if k.startswith("classify/class_weight/")]
    assert len(weights) >= 2 and max(weights) > min(weights)
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)


def test_transcript_dropout_hides_the_words_and_tells_the_rewards(corpus):
    from pallm.train.examples import ExampleStream
    from pallm.train.grpo import PromptSampler, reward_kwargs

    rows = [r for r in read_manifest(corpus) if r.split == "train"]
    cfg = PromptConfig()
    stream = ExampleStream(rows, {"classify": 0.5, "respond": 0.5}, cfg, list(SENTS), seed=0)

    def draws(p: float, prompt_cfg: PromptConfig = cfg):
        return PromptSampler(stream, rows, prompt_cfg, list(SENTS), 0.0, seed=0, transcript_dropout=p).draw(1000)

    plain, dropped = draws(0.0), draws(0.3)
    hidden = [e for e in dropped if not e.transcript]
    assert all(e.transcript for e in plain)
    assert len(hidden) / len(dropped) == pytest.approx(0.3, abs=0.04)
    # same rows and tasks in the same order (the stream is not disturbed); only the prompt changes
    assert [(e.row.id, e.task) for e in dropped] == [(e.row.id, e.task) for e in plain]
    for e in hidden:
        assert e.row.transcript not in e.prompt
        assert e.prompt == build_prompt(e.task, e.row, cfg.model_copy(update={"transcript": False}), list(SENTS))
    kw = reward_kwargs(dropped[:50], 2, cfg, list(SENTS))  # affect_grounding checks the words claim only if shown
    assert kw["transcript_in_prompt"] == [e.transcript for e in dropped[:50] for _ in range(2)]
    # a prompt without transcripts has nothing to drop
    assert all(e.transcript for e in draws(0.5, cfg.model_copy(update={"transcript": False})))


def test_gradient_checkpointing_same_updates(tiny, corpus, tmp_path):
    """Gradient checkpointing (train mode, dropout zeroed) trains exactly like the default eval-mode
    path: same logged losses and the same weights after the steps, with a dev evaluation in between
    (which must hand the model back in train mode, or checkpointing would silently stop)."""
    fns = {"hash": text_hash_reward}
    outs = {}
    for gc in (False, True):
        model = copy.deepcopy(tiny[0])
        for m in model.modules():  # dropout as a real checkpoint may have it must not leak into the update
            if isinstance(getattr(m, "dropout", None), float):
                m.dropout = 0.1
        cfg = small(steps=3, eval_every=2, eval_rows=2, gradient_checkpointing=gc, reward_funcs=["hash"])
        train_grpo(cfg, PromptConfig(), corpus, (model, tiny[1]), tmp_path / str(gc), reward_fns=fns)
        outs[gc] = (load_file(tmp_path / str(gc) / "model.safetensors"), log_records(tmp_path / str(gc)))
        if gc:
            assert model.training and model.is_gradient_checkpointing
    (wa, la), (wb, lb) = outs[False], outs[True]
    # Not bit-identical: checkpointing runs full rows, the default shares each prompt's K/V over its
    # group (same maths, other float sums), and Adam turns ~1e-7 gradient noise on near-zero
    # gradients into up to ~4e-5 here. A real difference (dropout left on) moves weights by ~lr = 1e-3.
    assert all(torch.allclose(wa[k], wb[k], atol=2e-4) for k in wa)
    losses = [[r["loss"] for r in log if r["kind"] == "train"] for log in (la, lb)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_ptx_term_mixes_stage1_loss_into_the_update(tiny, corpus, tmp_path):
    """ptx_coef > 0: every step also lowers the stage-1 NLL. With every group zero-variance (a
    constant reward) the RL gradient is 0, so all movement is the ptx term's: the logged NLL of
    the (fresh each step) stage-1 batches falls, and ptx_coef 0 leaves the weights untouched."""
    const = {"one": lambda prompts, completions, **kw: [1.0] * len(completions)}
    model = copy.deepcopy(tiny[0])
    train_grpo(small(steps=8, reward_funcs=["one"], ptx_coef=1.0, ptx_batch_size=4, learning_rate=3e-3), PromptConfig(),
               corpus, (model, tiny[1]), tmp_path / "ptx", reward_fns=const)
    nll = [r["ptx_nll"] for r in log_records(tmp_path / "ptx") if r["kind"] == "train"]
    assert len(nll) == 8 and nll[-1] < nll[0] * 0.9, nll
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny[0].state_dict().values()))
    with pytest.raises(ValidationError):
        small(ptx_coef=-1.0)


def test_load_best_model_at_end_publishes_the_best_dev_step(tiny, corpus, tmp_path):
    """load_best_model_at_end (transformers' name): the published model is the dev-best step's
    (ties keep the earliest), not the last one; the step checkpoint of that step holds the same weights."""
    fns = {"hash": text_hash_reward}
    out = tmp_path / "best"
    cfg = small(steps=4, eval_every=2, eval_rows=2, save_every=2, keep_checkpoints=2, reward_funcs=["hash"],
                load_best_model_at_end=True, metric_for_best_model="parse_rate")
    summary = train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), out, reward_fns=fns)
    curve = summary["dev_curve"]
    assert [d["step"] for d in curve] == [2, 4]
    want = 2 if curve[0]["parse_rate"] >= curve[1]["parse_rate"] else 4
    assert summary["best_model"]["step"] == want and read_pallm_meta(out)["step"] == want
    ref, got = load_file(out / "checkpoints" / f"step-{want}" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    last = load_file(out / "checkpoints" / "step-4" / "model.safetensors")
    assert want == 4 or not all(torch.equal(last[k], got[k]) for k in last)
    assert not (out / "best").exists()


def test_average_last_checkpoints_publishes_the_mean_of_the_last_steps(tiny, corpus, tmp_path):
    """average_last_checkpoints=2 with 3 steps, a checkpoint every 2: the final step 3 is saved
    too, and the published weights are the mean of steps 2 and 3, not step 3's."""
    out = tmp_path / "avg"
    cfg = small(steps=3, save_every=2, keep_checkpoints=2, reward_funcs=["hash"], average_last_checkpoints=2)
    summary = train_grpo(cfg, PromptConfig(), corpus, (copy.deepcopy(tiny[0]), tiny[1]), out,
                         reward_fns={"hash": text_hash_reward})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert summary["averaged_steps"] == [2, 3] and read_pallm_meta(out)["averaged_steps"] == [2, 3]
    w2, w3 = (load_file(out / "checkpoints" / f"step-{s}" / "model.safetensors") for s in (2, 3))
    got = load_file(out / "model.safetensors")
    assert any(not torch.equal(w2[k], w3[k]) for k in w3)
    for k in w3:
        torch.testing.assert_close(got[k], (w2[k] + w3[k]) / 2, rtol=0, atol=1e-6)
