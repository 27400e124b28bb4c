"""The decode-cost model: hand-computed figures for a tiny plan, and the orderings any plan must obey."""

from __future__ import annotations

import json

import pytest
from torch import nn
from transformers import AutoModelForCausalLM

from commonkv_convert.decode_cost import (
    Shape,
    layer_roles,
    per_token_cost,
    relative_cost,
    shape_from_config,
    step_cost,
    weight_macs_from_config,
)

# 2 layers, 4 query heads, 2 KV heads of 8 (d_kv 16), hidden 32; 10 000 MACs of weights per token
TINY = Shape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, weight_macs=10_000)
KEEP_THEN_LATENT = [{"layers": [0], "mode": "keep"}, {"layers": [1], "mode": "per_layer", "rank": 8}]
SMOL = Shape(layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, weight_macs=134_479_872)


def per_layer(shape: Shape, rank: int) -> list[dict]:
    return [{"layers": [i], "mode": "per_layer", "rank": rank} for i in range(shape.layers)]


def test_tiny_plan_matches_the_hand_computation() -> None:
    # e = 2 bytes, T = 100, batch 1.
    # keep layer, per token: cat copy 4·16·2 = 128 B; q kᵀ + p·V 2·4·8 = 64 MACs reading 2·16·2 = 64 B.
    #   per step: k/v projections 2·32·16 = 1024 MACs, their weights 2048 B.
    # latent layer (r 8), per token: k_up 8·16 = 128 MACs, (8 + 16)·2 = 48 B; RoPE tables 8/2 + 2·8·8 = 132 MACs,
    #   10.5·8·4 = 336 B; apply_rope 2·16 = 32 MACs, (10·16 + 2·8)·2 = 352 B; q kᵀ 32 MACs, 32 B; latent cat 32 B;
    #   fused p·C 4·8 = 32 MACs reading 2·8·2 = 32 B  →  356 MACs, 832 B.
    #   per step: down 32·8 = 256 MACs, 512 B; B_v 4·8·8 = 256 MACs, 256 B; k_up weight 256 B → 512 MACs, 1024 B.
    # rest: 10 000 − 2·(2·32·16) = 7952 MACs, 15 904 B.
    plan = step_cost(TINY, layer_roles(2, KEEP_THEN_LATENT), 100, element_size=2)
    assert plan.total_macs == (64 * 100 + 1024) + (356 * 100 + 512) + 7952 == 51_488
    assert plan.total_bytes == (192 * 100 + 2048) + (832 * 100 + 1024) + 15_904 == 121_376
    assert plan.macs["rebuild"] == 128 * 100 and plan.bytes["append"] == (128 + 32) * 100
    # the full cache: two keep layers
    full_macs, full_bytes = 2 * (64 * 100 + 1024) + 7952, 2 * (192 * 100 + 2048) + 15_904
    rel = relative_cost(TINY, KEEP_THEN_LATENT, 100, element_size=2, macs_per_byte=1.0)
    assert rel.macs == pytest.approx(51_488 / full_macs)
    assert rel.bytes == pytest.approx(121_376 / full_bytes)
    assert rel.cost == pytest.approx((51_488 + 121_376) / (full_macs + full_bytes))
    assert rel.speed == pytest.approx(1 / rel.cost)
    groups = per_token_cost(TINY, KEEP_THEN_LATENT, element_size=2)
    assert [(g["macs_per_token"], g["bytes_per_token"]) for g in groups] == [(64, 192), (356, 832)]


def test_batch_scales_sequences_but_not_weights_or_rope_tables() -> None:
    one = step_cost(TINY, layer_roles(2, KEEP_THEN_LATENT), 100, element_size=2)
    eight = step_cost(TINY, layer_roles(2, KEEP_THEN_LATENT), 100, batch=8, element_size=2)
    assert eight.bytes["projections"] == one.bytes["projections"]  # weights are read once per step
    assert eight.macs["projections"] == 8 * one.macs["projections"]
    assert eight.macs["rope"] == 8 * 32 * 100 + 132 * 100  # apply per sequence, tables once for the batch


def test_the_full_plan_costs_exactly_the_full_cache() -> None:
    groups = [{"layers": [i], "mode": "keep"} for i in range(SMOL.layers)]
    rel = relative_cost(SMOL, groups, 8192, batch=8)
    assert (rel.cost, rel.macs, rel.bytes) == (1.0, 1.0, 1.0)


def test_rebuilding_latent_keys_costs_more_the_longer_the_context() -> None:
    costs = [relative_cost(SMOL, per_layer(SMOL, 96), t).cost for t in (256, 1024, 4096, 16384)]
    assert costs == sorted(costs) and costs[-1] > 2 * costs[0]
    # and more with a wider latent
    assert relative_cost(SMOL, per_layer(SMOL, 192), 4096).cost > relative_cost(SMOL, per_layer(SMOL, 96), 4096).cost


def test_a_merged_group_saves_the_readers_append_but_not_their_rebuild() -> None:
    merged = [{"layers": [0, 1], "mode": "merged", "rank": 8, "merge": "anchor"}]
    apart = [{"layers": [0, 1], "mode": "per_layer", "rank": 8}]
    (m,), (p,) = per_token_cost(TINY, merged, element_size=2), per_token_cost(TINY, apart, element_size=2)
    assert m["macs_per_token"] == p["macs_per_token"]  # both layers rebuild keys from a latent
    assert p["bytes_per_token"] - m["bytes_per_token"] == 2 * 8 * 2  # one latent cat fewer


def test_a_weighted_group_concatenates_its_sequence_in_every_layer() -> None:
    weighted = [{"layers": [0, 1], "mode": "merged", "rank": 8, "merge": "weighted", "weights": [0.5, 0.5]}]
    anchor = [{"layers": [0, 1], "mode": "merged", "rank": 8, "merge": "anchor"}]
    (w,), (a,) = per_token_cost(TINY, weighted, element_size=2), per_token_cost(TINY, anchor, element_size=2)
    assert w["bytes_per_token"] - a["bytes_per_token"] == 2 * 8 * 2


def test_kvsharer_sharers_attend_only_and_a_lending_latent_source_rebuilds_values() -> None:
    keep = [{"layers": [0], "mode": "keep"}, {"layers": [1], "mode": "keep"}]
    shared = relative_cost(TINY, keep, 1000, sharing={"pairs": [[1, 0]]}, macs_per_byte=1.0)
    assert shared.macs < 1 and shared.bytes < 1  # layer 1 neither appends nor projects
    latent = [{"layers": [0], "mode": "per_layer", "rank": 8}, {"layers": [1], "mode": "keep"}]
    refit = per_token_cost(TINY, latent, sharing={"pairs": [[1, 0]], "latent_path": "refit"})
    source = per_token_cost(TINY, latent, sharing={"pairs": [[1, 0]], "latent_path": "source"})
    assert source[0]["macs_per_token"] - refit[0]["macs_per_token"] == 8 * 16 + 4 * 8 - 4 * 8  # + V rebuild, p·V
    assert refit[1]["macs_per_token"] == refit[0]["macs_per_token"]  # the sharer reads the latent like a reader
    assert source[1]["macs_per_token"] == 2 * 4 * 8  # the sharer attends over the lent K/V


def test_a_plan_the_runtime_would_refuse_is_refused() -> None:
    with pytest.raises(ValueError, match="groups"):
        relative_cost(TINY, [{"layers": [0], "mode": "keep"}], 100)  # layer 1 missing


def test_weight_macs_are_the_linear_layers_parameters(tiny_model_dir) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert weight_macs_from_config(config) == linear
    shape = shape_from_config(config)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.hidden) == (4, 4, 2, 64)


def test_inspect_and_the_card_show_the_prediction(merged_dirs, tmp_path) -> None:
    from commonkv_convert.checkpoint.card import refresh_card
    from commonkv_convert.decode_cost import config_predictions
    from commonkv_convert.inspection import describe

    checkpoint = merged_dirs["llama"]
    config = json.loads((checkpoint / "config.json").read_text())
    expected = {r.tokens: r.cost for r in config_predictions(config)}
    info = describe(str(checkpoint))
    assert info["decode_cost_at_2048"] == round(expected[2048], 3) and expected[2048] > 1  # keys rebuilt: slower
    assert info["decode_cost_at_8192"] == round(expected[8192], 3) and expected[8192] > expected[2048]
    assert "batch 1" in info["decode_cost_basis"]
    # a card written without the config gets the prediction on refresh, from the checkpoint's config.json
    card = (checkpoint / "README.md").read_text()
    (tmp_path / "README.md").write_text(card)
    (tmp_path / "config.json").write_text(json.dumps(config))
    text = refresh_card(tmp_path)
    assert text.count("## Decode cost") == 1 and "| 2048 | " in text and "| 8192 | " in text
    assert f"{expected[8192]:.2f}× (MACs" in text


def test_a_quantized_group_pays_to_read_its_codes_back():
    """A quantized kept layer appends nothing to a growing copy but dequantizes every code at each step: fewer
    bytes than the fp32 cache's cat, more MACs (the dequantization)."""
    from commonkv_convert.decode_cost import layer_roles, layer_terms

    plain, quantized = layer_roles(1, [{"layers": [0], "mode": "keep"}])[0], \
        layer_roles(1, [{"layers": [0], "mode": "keep", "bits": 4}])[0]
    assert plain.bits is None and quantized.bits == 4
    shape = SMOL
    per_token = {name: [t for t in layer_terms(shape, role, 4) if t.per_token]
                 for name, role in (("plain", plain), ("quantized", quantized))}
    assert sum(t.macs for t in per_token["quantized"]) > sum(t.macs for t in per_token["plain"])
    assert {t.part for t in per_token["quantized"]} >= {"dequant", "attention"}
    assert "append" not in {t.part for t in per_token["quantized"]}


def test_group_roles_read_a_group_as_the_whole_plan_is_read():
    """The planner prices an option from its group alone; that must agree with the roles of a whole plan."""
    from commonkv_convert.decode_cost import group_roles, layer_roles

    groups = [{"layers": [0], "mode": "keep", "bits": 8}, {"layers": [1, 2, 3], "mode": "merged", "rank": 16, "bits": 4},
              {"layers": [4], "mode": "per_layer", "rank": 8}]
    whole = layer_roles(5, groups)
    assert [r for g in groups for r in group_roles(g)] == whole
