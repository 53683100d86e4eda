"""Every shipped config loads, and a config whose data is missing fails with a clear message."""

from pathlib import Path

import pytest
import yaml

from pallm.config import build_config
from pallm.pipeline import RunConfig
from pallm.data.manifest import read_manifest
from pallm.errors import ManifestError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_validate(path):
    cfg = build_config(RunConfig, path)
    assert cfg.sft.steps > 0 and cfg.grpo.steps > 0


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_yaml_with_a_distributed_type(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["distributed_type"] in {"MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert doc["num_processes"] >= 2


def test_paper_config_names_real_model_and_checks_data(tmp_path, monkeypatch):
    cfg = build_config(RunConfig, CONFIGS / "qwen2_audio_7b.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2-Audio-7B-Instruct"
    assert cfg.sft.lora.enabled and cfg.grpo.lora.enabled
    assert cfg.eval.llm_judge.model and {"api:gpt-4o-audio", "api:gemini-2.5-pro", "text_llm"} <= set(cfg.baselines)
    monkeypatch.chdir(tmp_path)  # data/paper does not exist here
    with pytest.raises(ManifestError, match="data/paper.*pallm data"):
        read_manifest(cfg.data.corpus)
