"""The vLLM rollout backend without vLLM: request building, sampling parameters, output conversion,
weight export (names and LoRA merge), and the one-line errors when vLLM or a GPU is missing.

vLLM cannot run here (no GPU); where the backend needs the `vllm` module a fake one is put in
`sys.modules` that records what it is given.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pallm.cli.main import app
from pallm.data.manifest import Row, write_manifest
from pallm.errors import PallmError
from pallm.model import FAMILIES, ModelSpec, build_tiny, encode_batch, save_checkpoint
from pallm.model.batch import banned_token_ids
from pallm.prompts.format import PromptConfig
from pallm.train.common import LoraSettings, apply_lora
from pallm.train.grpo import GRPOConfig, train_grpo
from pallm.train.rollout import RolloutBackend, stop_token_ids
from pallm.train.rollout_vllm import (
    BANNED_LOGIT_BIAS,
    VLLMBackend,
    build_requests,
    checkpoint_name,
    checkpoint_names,
    engine_kwargs,
    outputs_to_ids,
    require_vllm,
    sampling_kwargs,
)

SR = 16_000
TEXTS = ["What is the sentiment of the speaker?", "Describe how they sound, then answer.", "<think>calm</think>"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(TEXTS, ModelSpec(max_audio_seconds=2))


def clips(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.2 * rng.standard_normal(int(SR * s))).astype(np.float32) for s in seconds]


# --- a fake `vllm` module ---------------------------------------------------------------------


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw
        self.__dict__.update(kw)


class Completion:
    def __init__(self, index, token_ids, finish_reason="stop", stop_reason=None):
        self.index, self.token_ids, self.finish_reason, self.stop_reason = index, token_ids, finish_reason, stop_reason


class RequestOutput:
    def __init__(self, outputs):
        self.outputs = outputs


class FakeEngineModel:
    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded.extend(weights)
        return {n for n, _ in self.loaded}


class FakeLLM:
    """Records its constructor kwargs and requests; returns G completions per request, in reverse
    index order (vLLM does not promise an order), each [100 + prompt, 200 + sample, stop, junk]."""

    stop = 0

    def __init__(self, **kw):
        self.kw, self.calls, self.resets = kw, [], 0
        self.engine_model = FakeEngineModel()
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.engine_model))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        self.calls.append((requests, sampling_params))
        n = sampling_params.n
        return [RequestOutput([Completion(k, [100 + i, 200 + k, self.stop, 7, 7]) for k in reversed(range(n))])
                for i in range(len(requests))]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch, tiny):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(FakeLLM, "stop", stop_token_ids(tiny[1])[0])
    return mod


# --- requests -----------------------------------------------------------------------------------


def test_requests_one_placeholder_rate_and_system(tiny):
    _, processor = tiny
    audios = clips(0.05, 1.0, 3.5)  # too short (padded), fine, too long for the 2 s window (cut)
    prompts = ["Who is it?", "How do they feel?", "Say it again."]
    reqs = build_requests(processor, audios, prompts)
    assert len(reqs) == 3
    for r, p in zip(reqs, prompts):
        assert set(r) == {"prompt", "multi_modal_data"}
        assert r["prompt"].count("<|AUDIO|>") == 1 and r["prompt"].count("<|audio_bos|>") == 1
        assert r["prompt"].count("<|audio_eos|>") == 1 and p in r["prompt"]
        assert "You are a helpful assistant." in r["prompt"]  # the template's default system turn
        assert r["prompt"].endswith("<|im_start|>assistant\n")
        (wav, rate), = r["multi_modal_data"]["audio"]
        assert rate == SR == processor.feature_extractor.sampling_rate and wav.dtype == np.float32
    lengths = [len(r["multi_modal_data"]["audio"][0][0]) for r in reqs]
    assert lengths == [int(0.1 * SR), SR, 2 * SR]  # as encode_batch prepares clips
    np.testing.assert_array_equal(reqs[1]["multi_modal_data"]["audio"][0][0], audios[1])

    custom = build_requests(processor, audios[:1], prompts[:1], system="Answer in one word.")[0]["prompt"]
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in custom and "helpful assistant" not in custom
    with pytest.raises(PallmError, match="audio special token"):
        build_requests(processor, audios[:1], ["sneaky <|AUDIO|>"])
    with pytest.raises(PallmError, match="match one to one"):
        build_requests(processor, audios[:2], prompts[:1])
    # (speaker reference, clip): two placeholders, two clips in that order
    (pair,) = build_requests(processor, [(audios[1], audios[2])], prompts[:1])
    assert pair["prompt"].count("<|AUDIO|>") == 2 and "Audio 1:" in pair["prompt"] and "Audio 2:" in pair["prompt"]
    assert [len(w) for w, _ in pair["multi_modal_data"]["audio"]] == [SR, 2 * SR]
    assert engine_kwargs("m", audios_per_prompt=2)["limit_mm_per_prompt"] == {"audio": 2}


def test_request_text_is_what_the_scorer_encodes(tiny):
    """vLLM expands the single placeholder itself; collapsing the scorer's expanded run gives the same ids."""
    _, processor = tiny
    audios, prompts = clips(0.7, 1.6), ["Who is it?", "How do they feel?"]
    tok = processor.tokenizer
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    enc = encode_batch(processor, audios, prompts, padding_side="right")
    for i, r in enumerate(build_requests(processor, audios, prompts)):
        ids = [t for t, m in zip(enc["input_ids"][i].tolist(), enc["attention_mask"][i].tolist()) if m]
        collapsed = [t for j, t in enumerate(ids) if not (t == audio_id and j and ids[j - 1] == audio_id)]
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == collapsed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_one_placeholder_and_saved_names(family, tmp_path):
    """Per family: one audio placeholder per request, and weight names as save_pretrained writes them."""
    model, processor = build_tiny(TEXTS, ModelSpec(family=family, max_audio_seconds=2))
    for r in build_requests(processor, clips(0.5, 1.2), ["Who is it?", "How?"]):
        assert r["prompt"].count("<|AUDIO|>") == 1 and r["multi_modal_data"]["audio"][0][1] == SR
    names = checkpoint_names(model, [n for n, _ in model.named_parameters()])
    save_checkpoint(model, processor, tmp_path / "ck", {})
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert set(names.values()) == set(f.keys())


# --- sampling parameters ------------------------------------------------------------------------


def test_sampling_kwargs_map_the_policy(tiny):
    model, processor = tiny
    stop, banned = stop_token_ids(processor), banned_token_ids(model, processor)
    kw = sampling_kwargs(8, 0.9, 0.95, 96, stop, banned)
    assert kw["n"] == 8 and kw["temperature"] == 0.9 and kw["top_p"] == 0.95 and kw["max_tokens"] == 96
    assert kw["stop_token_ids"] == stop and stop[0] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert kw["top_k"] == -1 and kw["min_p"] == 0.0 and kw["repetition_penalty"] == 1.0  # nothing but the policy
    audio_ids = processor.tokenizer.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"])
    assert set(kw["logit_bias"]) == set(banned) >= set(audio_ids)
    assert set(kw["logit_bias"].values()) == {BANNED_LOGIT_BIAS} and BANNED_LOGIT_BIAS == -100.0
    with pytest.raises(PallmError, match="temperature"):
        sampling_kwargs(8, 0.0, 1.0, 96, stop, banned)


# --- outputs --------------------------------------------------------------------------------------


def test_outputs_grouped_per_prompt_and_cut_at_stop():
    S, E = 5, 6  # stop ids
    outs = [RequestOutput([Completion(1, [11, S, 99, 99]), Completion(0, [10, 10, 10], finish_reason="length")]),
            RequestOutput([Completion(0, [20, E, S]), Completion(1, [21], stop_reason=S)])]  # stop token dropped: restored
    assert outputs_to_ids(outs, 2, [S, E]) == [[10, 10, 10], [11, S], [20, E], [21, S]]
    with pytest.raises(PallmError, match="expected 3"):
        outputs_to_ids(outs, 3, [S, E])


# --- the backend with a fake vllm -----------------------------------------------------------------


def test_backend_builds_the_engine_and_samples(fake_vllm, tiny, tmp_path):
    model, processor = tiny
    backend = VLLMBackend(tmp_path, processor, banned_ids=banned_token_ids(model, processor),
                          gpu_memory_utilization=0.25, max_model_length=2048, seed=7)
    assert isinstance(backend, RolloutBackend)
    assert backend.llm.kw == engine_kwargs(str(tmp_path), gpu_memory_utilization=0.25, max_model_length=2048, seed=7)
    assert backend.llm.kw["limit_mm_per_prompt"] == {"audio": 1} and backend.llm.kw["enable_prefix_caching"]

    ids = backend.generate(clips(0.5, 1.0), ["Who is it?", "How?"], 3, 1.1, 0.9, 24)
    stop = FakeLLM.stop
    assert ids == [[100 + i, 200 + k, stop] for i in range(2) for k in range(3)]
    requests, params = backend.llm.calls[-1]
    assert len(requests) == 2 and all(r["prompt"].count("<|AUDIO|>") == 1 for r in requests)
    assert params.kw == sampling_kwargs(3, 1.1, 0.9, 24, stop_token_ids(processor), banned_token_ids(model, processor))
    assert backend.generate([], [], 3, 1.0, 1.0, 8) == []


def test_sync_weights_plain_model_uses_checkpoint_names(fake_vllm, tiny, tmp_path):
    model, processor = tiny
    backend = VLLMBackend(tmp_path, processor)
    backend.sync_weights(model)
    loaded = dict(backend.llm.engine_model.loaded)
    save_checkpoint(model, processor, tmp_path / "ck", {})
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert set(loaded) == set(f.keys())  # the on-disk layout vLLM loads
        for k in f.keys():
            assert torch.equal(loaded[k], f.get_tensor(k))
    assert backend.llm.resets == 1
    assert checkpoint_name("lm_head.weight") == "language_model.lm_head.weight"
    assert checkpoint_name("audio_tower.conv1.weight") == "audio_tower.conv1.weight"  # old layout passes through


def test_sync_weights_merges_lora_without_touching_the_policy(fake_vllm, tiny, tmp_path):
    import copy

    model, processor = tiny
    peft_model = apply_lora(copy.deepcopy(model), LoraSettings(enabled=True, r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))  # B = 0 at init: make the delta real
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}

    backend = VLLMBackend(tmp_path, processor)
    backend.sync_weights(peft_model)
    loaded = dict(backend.llm.engine_model.loaded)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    save_checkpoint(merged, processor, tmp_path / "merged", {})
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert set(loaded) == set(f.keys())
        for k in f.keys():
            assert torch.allclose(loaded[k], f.get_tensor(k), atol=1e-6), k
    assert any(not torch.equal(loaded[k], v) for k, v in
               ((checkpoint_name(n), p) for n, p in model.named_parameters()))  # the adapters did change weights
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # live policy untouched
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())


# --- errors ---------------------------------------------------------------------------------------


def test_missing_vllm_or_gpu_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(PallmError, match=r"needs vLLM, which is not installed: `pip install vllm`") as e:
        require_vllm()
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PallmError, match="needs a CUDA GPU"):
        require_vllm()


def test_config_fields_use_trl_names():
    cfg = GRPOConfig(use_vllm=True, vllm_gpu_memory_utilization=0.4, vllm_max_model_length=4096)
    assert cfg.use_vllm and cfg.vllm_gpu_memory_utilization == 0.4
    assert GRPOConfig().use_vllm is False and GRPOConfig().vllm_gpu_memory_utilization == 0.3
    with pytest.raises(ValueError):
        GRPOConfig(vllm_gpu_memory_utilization=1.5)


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, tiny):
    """A 4-row corpus and a tiny init checkpoint: enough to reach the backend's construction."""
    base = tmp_path_factory.mktemp("vllm_grpo")
    (base / "corpus").mkdir()
    rows = []
    for i in range(4):
        sf.write(base / "corpus" / f"a{i}.wav", clips(0.6)[0], SR, subtype="PCM_16")
        rows.append(Row(id=f"u{i}", audio=f"a{i}.wav", corpus="toy", speaker=f"s{i % 2}", split="train",
                        sentiment=("positive", "negative")[i % 2], transcript="I am here", response="Good to hear.",
                        cues={"pitch_level": "high", "pitch_variability": "mid", "loudness": "low", "rate": "mid"}))
    write_manifest(rows, base / "corpus")
    init = save_checkpoint(*tiny, base / "init", {"stage": "sft"})
    return base / "corpus", init


def test_train_grpo_use_vllm_without_vllm(grpo_setup, tmp_path, monkeypatch):
    corpus, init = grpo_setup
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = GRPOConfig(use_vllm=True, steps=1, per_device_batch_size=2, num_generations=2, eval_every=0, save_every=0)
    with pytest.raises(PallmError, match="pip install vllm"):
        train_grpo(cfg, PromptConfig(), corpus, init, tmp_path / "g")
    r = CliRunner().invoke(app, ["train", "grpo", "--init", str(init), "--out", str(tmp_path / "g2"),
                                 f"data.corpus={corpus}", "grpo.use_vllm=true", "grpo.eval_every=0"],
                           catch_exceptions=False)
    assert r.exit_code == 2 and "pip install vllm" in r.output and "Traceback" not in r.output


def test_train_grpo_builds_the_vllm_backend(grpo_setup, fake_vllm, tmp_path):
    """With vllm importable and a 'GPU', train_grpo hands the init folder to the engine and samples
    through it (the fake engine's completions), pushing weights after every step."""
    corpus, init = grpo_setup
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    built = []
    orig = FakeLLM.__init__

    def record(self, **kw):
        orig(self, **kw)
        built.append(self)

    FakeLLM.__init__ = record
    try:
        cfg = GRPOConfig(use_vllm=True, steps=2, per_device_batch_size=2, num_generations=2, max_completion_length=8,
                         eval_every=0, save_every=0, vllm_gpu_memory_utilization=0.2, mixed_precision="no")
        summary = train_grpo(cfg, PromptConfig(), corpus, init, tmp_path / "g")
    finally:
        FakeLLM.__init__ = orig
        for k, v in env.items():  # for_grpo sets the torch.distributed variables vLLM's launcher reads
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    (llm,) = built
    assert llm.kw["model"] == str(Path(init).resolve()) and llm.kw["gpu_memory_utilization"] == 0.2
    assert len(llm.calls) == 2 and summary["steps"] == 2
    assert llm.resets == 3  # initial sync + one per optimizer step
