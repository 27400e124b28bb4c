"""`latent_values` layers: keys cached as the family computes them, values as a per-layer latent attended in latent
space. Exact at full value rank, bytes equal to the analytic count (quantized and evicted too), chosen by the
planner under --latent-values, and priced by decode_cost without a key rebuild."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from commonkv_convert.checkpoint.format import block_version
from commonkv_convert.decode_cost import Shape, group_cost
from commonkv_convert.errors import UserInputError
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime.quantization import CompressedKVLayer

from .helpers import check_checkpoint, convert_tiny


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _as_latent_values(exact: Path, source: Path, out: Path) -> Path:
    """The full-rank per-layer checkpoint `exact` rewritten so that every layer keeps the source's k_proj and reads
    its values from the same latent: a latent_values plan whose values are exact (the latent spans K and V)."""
    shutil.copytree(exact, out)
    src = {k: v for f in source.glob("*.safetensors") for k, v in load_file(f).items()}
    for shard in out.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(shard).items() if ".k_up." not in k}
        layers = {k.split(".self_attn.")[0] for k in load_file(shard) if ".k_up." in k}
        for prefix in layers:
            for part in ("weight", "bias"):
                if f"{prefix}.self_attn.k_proj.{part}" in src:
                    tensors[f"{prefix}.self_attn.k_proj.{part}"] = src[f"{prefix}.self_attn.k_proj.{part}"]
        save_file(tensors, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        index.unlink()  # one shard at this size; the index would list the old names
    config = json.loads((out / "config.json").read_text())
    for group in config["commonkv"]["groups"]:
        group["mode"] = "latent_values"
    config["commonkv"]["format_version"] = block_version(config["commonkv"]["groups"], False)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])  # plain; k bias; k norm; MQA + sliding
def test_full_value_rank_is_exact(family, tiny_model_dirs, exact_dirs, tmp_path):
    path = _as_latent_values(exact_dirs[family], tiny_model_dirs[family], tmp_path / "lv")
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=torch.float32).eval()
    model = load_checkpoint(path, dtype=torch.float32)
    assert not any(".k_up." in name for name, _ in model.named_parameters())
    ids = _ids(2, 40)
    with torch.inference_mode():
        assert (source(ids).logits - model(ids).logits).abs().max().item() < 1e-4
        # step by step: decode attends over the cached keys and the value latent (fused), bytes as counted
        cache = model(ids[:, :24], use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_bytes(24, 4, batch=2)
        logits = []
        for t in range(24, 40):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
        assert cache.nbytes() == model.config.cache_bytes(40, 4, batch=2)
        assert (torch.cat(logits, 1) - source(ids).logits[:, 24:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("options", [dict(bits=4, group=8, residual=4), dict(budget=12, observe=4),
                                     dict(bits=4, group=8, residual=4, budget=12, observe=4)])
def test_quantized_and_evicted_bytes_equal_the_count(options, tiny_model_dirs, exact_dirs, tmp_path):
    path = _as_latent_values(exact_dirs["llama"], tiny_model_dirs["llama"], tmp_path / "lv")
    model = load_checkpoint(path, dtype=torch.float32, kv_cache=options)
    with torch.inference_mode():
        cache = model(_ids(2, 40), use_cache=True).past_key_values
        assert all(isinstance(layer, CompressedKVLayer) for layer in cache.layers)
        assert cache.nbytes() == model.config.cache_bytes(40, 4, batch=2)
        for t in range(3):
            cache = model(_ids(2, 1, t + 1), past_key_values=cache, use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_bytes(43, 4, prompt=40, batch=2)


@pytest.fixture(scope="module")
def planned(tiny_model_dirs, tmp_path_factory) -> Path:
    """The planner's choice at half the 16-bit cache with 8/4-bit precisions and latent_values layers allowed."""
    return convert_tiny(tiny_model_dirs["llama"], tmp_path_factory.mktemp("lv") / "planned", ratio=0.5,
                        bits="16,8,4", latent_values=True)


def test_planner_picks_latent_values_and_the_checkpoint_holds_it(planned, tiny_model_dirs):
    config = check_checkpoint(planned)
    groups = config["commonkv"]["groups"]
    chosen = [g for g in groups if g["mode"] == "latent_values"]
    assert chosen and config["commonkv"]["format_version"] == 4
    report = json.loads((planned / "commonkv_report.json").read_text())["validation"]
    assert report["passed"] and report["bytes_match"] and report["removed_at_16_bits"]["measured"] >= 0.5
    names = {k for f in planned.glob("*.safetensors") for k in load_file(f)}
    for g in chosen:
        (layer,) = g["layers"]
        prefix = f"model.layers.{layer}.self_attn."
        assert {prefix + "k_proj.weight", prefix + "v_up.weight"} <= names
        assert not {prefix + "k_up.weight", prefix + "v_proj.weight"} & names
    model = load_checkpoint(planned, dtype=torch.float32, kv_cache={"bits": 16})  # every group unquantized
    with torch.inference_mode():
        cache = model(_ids(1, 30), use_cache=True).past_key_values
    assert cache.nbytes() == model.config.cache_bytes(30, 4) == 30 * 4 * sum(g["elements"] for g in groups)
    card = (planned / "README.md").read_text()
    assert f"{len(chosen)} with raw keys and a value latent" in card


def test_without_the_option_the_plan_has_none(tiny_model_dirs, planned):
    from commonkv_convert.convert import convert

    analysis = convert(str(tiny_model_dirs["llama"]), None, ConvertOptions(samples=8, seq_len=64, ratio=0.5,
                                                                            bits="16,8,4"), dry_run=True).analysis
    assert all(o.mode != "latent_values" for o in analysis.plan)
    assert set(analysis.value_candidates) == {0, 1, 2, 3}  # measured anyway: a sweep may turn the option on
    cand = analysis.value_candidates[0]
    assert float(cand.err_k[0].abs().max()) == 0.0 and float(cand.err_v[0][-1]) < 1e-6  # exact at rank d_kv


def test_refit_is_refused_with_latent_values():
    with pytest.raises(UserInputError, match="--latent-values cannot be combined with --refit"):
        ConvertOptions(latent_values=True, refit="pooled")


def test_decode_cost_rebuilds_no_keys():
    """At 8k tokens a latent_values layer costs less than a per-layer latent of the same rank (no key rebuild nor
    RoPE over the cache) and, quantized, about what a kept layer at the same bits costs."""
    shape = Shape(layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, weight_macs=134_000_000)
    lv = group_cost(shape, {"layers": [0], "mode": "latent_values", "rank": 96, "bits": 8}, 8192)
    latent = group_cost(shape, {"layers": [0], "mode": "per_layer", "rank": 96, "bits": 8}, 8192)
    kept = group_cost(shape, {"layers": [0], "mode": "keep", "bits": 8}, 8192)
    assert lv < latent / 2 and lv < kept * 1.2
