"""End-to-end conversion on tiny random models of every family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.testing import TINY_FAMILIES

from .helpers import check_checkpoint, convert_tiny

FAMILIES = list(TINY_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_conversion_reproduces_source_logits(family, tiny_model_dirs, exact_dirs):
    config = check_checkpoint(exact_dirs[family])
    assert all(g["mode"] == "per_layer" for g in config["commonkv"]["groups"])
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=torch.float32).eval()
    converted = load_checkpoint(exact_dirs[family], dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (source(ids).logits - converted(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_conversion_reaches_ratio_and_bytes(family, merged_dirs):
    config = check_checkpoint(merged_dirs[family])
    block = config["commonkv"]
    assert [g["mode"] for g in block["groups"]] == ["merged", "merged"]
    assert block["ratio"]["achieved"] >= 0.5
    report = json.loads((merged_dirs[family] / "commonkv_report.json").read_text())
    validation = report["validation"]
    assert validation["bytes_match"] and validation["measured_ratio"] >= 0.5
    assert 0.0 <= validation["top1_agreement"] <= 1.0
    assert report["peak_rss_mb"] > 0 and report["wall_time_s"] > 0
    pairs = report["similarity"]["adjacent"]
    assert len(pairs) == 3 and all({"hidden", "key", "value", "latent"} <= set(p) for p in pairs)


def test_allocator_meets_ratio_and_beats_uniform_estimate(tiny_model_dirs, tmp_path):
    from commonkv_convert.convert import convert
    from commonkv_convert.recipe import ConvertOptions

    src = str(tiny_model_dirs["llama"])
    common = dict(samples=8, seq_len=64, ratio=0.6, group_size=2)
    optimal = convert(src, None, ConvertOptions(**common), dry_run=True).analysis
    uniform = convert(src, None, ConvertOptions(**common, allocator="uniform"), dry_run=True).analysis
    assert optimal.achieved_ratio >= 0.6 and uniform.achieved_ratio >= 0.6
    assert sum(o.loss for o in optimal.plan) <= sum(o.loss for o in uniform.plan) + 1e-9
    assert not list(tmp_path.iterdir())


def test_plain_svd_is_no_better_on_held_out_error(tiny_model_dirs):
    from commonkv_convert.convert import convert
    from commonkv_convert.recipe import ConvertOptions

    src = str(tiny_model_dirs["qwen2"])
    common = dict(samples=8, seq_len=64, ratio=0.5, group_size=1, allocator="uniform")
    aware = convert(src, None, ConvertOptions(**common), dry_run=True).analysis
    plain = convert(src, None, ConvertOptions(**common, plain_svd=True), dry_run=True).analysis
    assert sum(o.loss for o in aware.plan) < sum(o.loss for o in plain.plan)


def test_sliding_window_layers_stay_sliding(tmp_path):
    """Mistral with a sliding window shorter than the prompt: the exact conversion must slide too."""
    from transformers import AutoConfig

    from commonkv_convert.testing import TINY_FAMILIES, byte_tokenizer

    kwargs = {k: v for k, v in TINY_FAMILIES["mistral"].items() if k != "model_type"}
    config = AutoConfig.for_model("mistral", **{**kwargs, "sliding_window": 8})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    out = convert_tiny(tmp_path / "src", tmp_path / "ckv", ratio=0.0, group_size=1, allow_keep=False, rank_step=64)
    converted = load_checkpoint(out, dtype=torch.float32)
    assert set(converted.config.layer_types) == {"sliding_attention"}
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert (source(ids).logits - converted(ids).logits).abs().max() < 1e-4
