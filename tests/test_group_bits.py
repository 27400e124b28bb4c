"""Per-group precision: a group's `bits` in the checkpoint, honoured by the cache and its byte count, overridden by
`kv_cache={"bits": ...}`, refused where it cannot be honoured, and shown by inspect and the card.

The checkpoints are converted tiny models whose config.json gets bits entries afterwards, as the planner writes
them: the weights do not depend on a group's precision, only the cache does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicLayer
from typer.testing import CliRunner

from commonkv_convert.budget import Pricing
from commonkv_convert.checkpoint.card import render_card
from commonkv_convert.checkpoint.format import block_version
from commonkv_convert.cli import app
from commonkv_convert.runtime import CommonKVConfig, CommonKVForCausalLM, load_checkpoint
from commonkv_convert.runtime import configuration_commonkv as runtime_config
from commonkv_convert.runtime.configuration_commonkv import FORMAT_VERSION, CheckpointError
from commonkv_convert.runtime.modeling_commonkv import LatentLayer, ReaderLayer
from commonkv_convert.runtime.quantization import CompressedKVLayer, CompressedLatentLayer

from .helpers import convert_tiny
from .test_runtime import _run_isolated

SMALL = {"group": 8, "residual": 5}  # quantization starts within a short test sequence
STEPS = [45, 1, 1, 1, 9, 30]  # a prefill, decode steps, and chunks that cross quantization groups


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _edit_block(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config["commonkv"])
    (path / "config.json").write_text(json.dumps(config))


def _with_bits(src: Path, dst: Path, bits: dict[int, object]) -> Path:
    """A copy of checkpoint `src` whose groups carry the bits of `bits` (group index → value), with the
    format_version the converter writes for such a block."""
    shutil.copytree(src, dst)

    def change(block: dict) -> None:
        for g, b in bits.items():
            block["groups"][g]["bits"] = b
        block["format_version"] = block_version(block["groups"], "sharing" in block)
    _edit_block(dst, change)
    return dst


def _mixed_bits(path: Path) -> dict[int, int]:
    """The first latent group at 4 bits, the first kept group at 8; the others stay unquantized."""
    groups = json.loads((path / "config.json").read_text())["commonkv"]["groups"]
    latent = next(g for g, group in enumerate(groups) if group["mode"] != "keep")
    kept = next(g for g, group in enumerate(groups) if group["mode"] == "keep")
    assert len(groups) > 2, groups  # at least one group without bits
    return {latent: 4, kept: 8}


@pytest.fixture(scope="module")
def plans(tiny_model_dirs, merged_dirs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name → (converted checkpoint, its copy with bits): `mixed` has per-layer latent and kept groups (a low
    ratio keeps layers), `merged` two anchor-merged groups, the first at 4 bits."""
    root = tmp_path_factory.mktemp("group_bits")
    mixed = convert_tiny(tiny_model_dirs["llama"], root / "mixed", ratio=0.15, group_size=2)
    return {"mixed": (mixed, _with_bits(mixed, root / "mixed-bits", _mixed_bits(mixed))),
            "merged": (merged_dirs["llama"], _with_bits(merged_dirs["llama"], root / "merged-bits", {0: 4}))}


def _run(model, batch: int = 2, steps=STEPS):
    """Feed `steps` chunks of tokens; yields (cache, tokens seen, logits) after each."""
    cache, seen = None, 0
    for step, length in enumerate(steps):
        with torch.inference_mode():  # not across the yield: a caller that stops early would keep it on
            out = model(_ids(batch, length, step), past_key_values=cache, use_cache=True)
        cache, seen = out.past_key_values, seen + length
        yield cache, seen, out.logits


def _group_bits(model) -> list[int | None]:
    return [g.get("bits") for g in model.config.commonkv["groups"]]


@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("which", ["mixed", "merged"])
def test_cache_bytes_equal_plan_with_group_bits(plans, which, evict):
    """Some groups at 4 bits, some at 8, some unquantized (plus eviction): the cache holds the analytic bytes."""
    plain, bitted = plans[which]
    options = {**SMALL, **({"budget": 16, "observe": 8} if evict else {})}
    model = load_checkpoint(bitted, dtype=torch.float32, kv_cache=options)
    for cache, seen, _ in _run(model):
        assert cache.nbytes() == model.config.cache_bytes(seen, 4, prompt=STEPS[0], batch=2), seen
    unquantized = load_checkpoint(plain, dtype=torch.float32, kv_cache=options).config
    assert cache.nbytes() < unquantized.cache_bytes(seen, 4, prompt=STEPS[0], batch=2)
    if evict:
        assert cache.get_seq_length() == 16 + 8 + sum(STEPS[1:])


def test_cache_bytes_of_quantized_groups_beside_a_weighted_one(weighted_dirs, tmp_path):
    """A weighted group stays unquantized beside a quantized one; bytes count both. (Group 0 is made an anchor merge
    by hand: the same tensor shapes, so the cache is real even if the factors were fitted for the weighted merge.)"""
    ckpt = Path(shutil.copytree(weighted_dirs["llama"], tmp_path / "ckpt"))
    _edit_block(ckpt, lambda block: block["groups"][0].update(merge="anchor", bits=4, weights=None))
    model = load_checkpoint(ckpt, dtype=torch.float32, kv_cache=SMALL)
    for cache, seen, _ in _run(model):
        assert cache.nbytes() == model.config.cache_bytes(seen, 4, batch=2), seen
    kinds = {type(x).__name__ for x in cache.layers}
    assert {"CompressedLatentLayer", "WeightedLayer"} <= kinds, kinds


@pytest.mark.parametrize("which", ["mixed", "merged"])
def test_only_groups_with_bits_store_packed_codes(plans, which):
    model = load_checkpoint(plans[which][1], dtype=torch.float32)
    cache = list(_run(model, steps=[80]))[-1][0]
    bits = _group_bits(model)
    assert any(b is not None for b in bits) and any(b is None for b in bits)
    for role, layer in zip(cache.roles, cache.layers):
        b = bits[role.group]
        if not role.stores:
            assert isinstance(layer, ReaderLayer), role
        elif b is None:
            assert type(layer) is (LatentLayer if role.latent else DynamicLayer), role
        else:
            assert isinstance(layer, CompressedLatentLayer if role.latent else CompressedKVLayer), role
            width = role.rank if role.latent else model.config.head_dim
            for stream in layer.streams:  # 32 of 80 tokens: whole groups of 32 past the 32 recent ones
                packed = -(-width // 32) * 32 * b // 8 if stream.axis == "token" else -(-width * b // 8)
                assert stream.bits == b and stream.quantized == 32, role
                assert stream.data.dtype == torch.uint8 and stream.data.shape[-2:] == (32, packed), role


@pytest.mark.parametrize("which", ["mixed", "merged"])
def test_bits_16_is_the_checkpoint_without_bits(plans, which):
    plain, bitted = plans[which]
    want = list(_run(load_checkpoint(plain, dtype=torch.float32), steps=[80, 1, 1]))
    got = list(_run(load_checkpoint(bitted, dtype=torch.float32, kv_cache={"bits": 16}), steps=[80, 1, 1]))
    for (cache_w, _, logits_w), (cache_g, _, logits_g) in zip(want, got):
        assert torch.equal(logits_g, logits_w)
        assert [type(x) for x in cache_g.layers] == [type(x) for x in cache_w.layers]
        assert cache_g.nbytes() == cache_w.nbytes()
    quantized = list(_run(load_checkpoint(bitted, dtype=torch.float32), steps=[80, 1, 1]))
    assert not torch.equal(quantized[-1][2], want[-1][2])  # without the override the bits do quantize


@pytest.mark.parametrize("which", ["mixed", "merged"])
def test_bits_override_quantizes_every_group(plans, which):
    """kv_cache bits=4 stores every group at 4 bits, whatever the checkpoint says: as the plan without bits does."""
    plain, bitted = plans[which]
    options = {"bits": 4, **SMALL}
    model = load_checkpoint(bitted, dtype=torch.float32, kv_cache=options)
    runs = zip(_run(model), _run(load_checkpoint(plain, dtype=torch.float32, kv_cache=options)))
    for (cache, seen, logits), (_, _, want) in runs:
        assert cache.nbytes() == model.config.cache_bytes(seen, 4, batch=2)
        assert torch.equal(logits, want)
    stored = [layer for role, layer in zip(cache.roles, cache.layers) if role.stores]
    assert stored and all(isinstance(x, (CompressedLatentLayer, CompressedKVLayer)) for x in stored)
    assert {s.bits for x in stored for s in x.streams} == {4}


@pytest.mark.parametrize("bits", [3, 16, "4", None, 8.0])
def test_bad_group_bits_are_refused(plans, tmp_path, bits):
    ckpt = _with_bits(plans["merged"][0], tmp_path / "ckpt", {1: bits})
    with pytest.raises(CheckpointError, match=r"commonkv.groups\[1\] has bits=") as err:
        CommonKVForCausalLM.from_pretrained(ckpt)
    assert "\n" not in str(err.value) and "To resolve" in str(err.value)


def test_bits_on_a_weighted_group_are_refused(weighted_dirs, tmp_path):
    ckpt = _with_bits(weighted_dirs["llama"], tmp_path / "ckpt", {0: 4})
    with pytest.raises(CheckpointError, match=r"groups\[0\] is a weighted merge group with bits=4.*--merge anchor"):
        CommonKVForCausalLM.from_pretrained(ckpt)
    # the override to 16 stores nothing differently, so a weighted plan takes it
    config = CommonKVConfig.from_pretrained(weighted_dirs["llama"], kv_cache={"bits": 16})
    assert config.kv_options() is None and not any(config.layer_options(r) for r in config.layer_roles())


def _with_layout(src: Path, dst: Path, layout: object) -> Path:
    """A copy of checkpoint `src` whose block records the quantization `layout` (at this runtime's version)."""
    shutil.copytree(src, dst)

    def change(block: dict) -> None:
        block["quantization"], block["format_version"] = layout, FORMAT_VERSION
    _edit_block(dst, change)
    return dst


def test_block_layout_is_the_cache_layout(plans, tmp_path):
    """The block's quantization layout is what the quantized groups store (and what their bytes count), a load-time
    kv_cache entry overrides it field by field, and a checkpoint without one keeps the runtime defaults."""
    ckpt = _with_layout(plans["mixed"][1], tmp_path / "ckpt", {"group": 8, "residual": 0})
    model = load_checkpoint(ckpt, dtype=torch.float32)
    layouts = {(o.group, o.residual) for o in map(model.config.layer_options, model.config.layer_roles()) if o}
    assert layouts == {(8, 0)}
    for cache, seen, _ in _run(model):
        assert cache.nbytes() == model.config.cache_bytes(seen, 4, batch=2), seen
    # with residual 0 every whole group of 8 is quantized: fewer bytes than the default layout's at 48 tokens
    default = load_checkpoint(plans["mixed"][1], dtype=torch.float32)
    assert model.config.cache_bytes(48, 2) < default.config.cache_bytes(48, 2)
    assert {(o.group, o.residual) for o in map(default.config.layer_options, default.config.layer_roles()) if o} \
        == {(runtime_config.KVCacheOptions.group, runtime_config.KVCacheOptions.residual)}
    override = CommonKVConfig.from_pretrained(ckpt, kv_cache={"group": 16})
    assert {(o.group, o.residual) for o in map(override.layer_options, override.layer_roles()) if o} == {(16, 0)}


@pytest.mark.parametrize("layout", [{"group": 30}, {"residual": -1}, {"window": 4}, [8, 0], {"group": "8"},
                                    {"group": 8, "sink": 8}])
def test_bad_layout_is_refused(plans, tmp_path, layout):
    ckpt = _with_layout(plans["mixed"][1], tmp_path / "ckpt", layout)
    with pytest.raises(CheckpointError, match=r"commonkv.quantization .* is malformed") as err:
        CommonKVForCausalLM.from_pretrained(ckpt)
    assert "\n" not in str(err.value) and "To resolve" in str(err.value)


def test_cache_options_take_bits_16():
    assert runtime_config.KVCacheOptions(bits=16).active is False
    with pytest.raises(ValueError, match=r"bits=3 is not supported; pass 8, 4 or 2, 16 \(unquantized\)"):
        runtime_config.KVCacheOptions(bits=3)


def test_block_version_and_an_older_runtime(plans, monkeypatch):
    """A block with bits is written as version 3, which a runtime that knew only the sharing map (2) refuses
    instead of caching the group unquantized."""
    assert block_version([{"mode": "keep", "bits": 8}], has_sharing=False) == 3
    # a quantization layout: 5 where it differs from the runtime's defaults (an older runtime would ignore it)
    assert block_version([{"mode": "keep", "bits": 8}], False, {"group": 32, "residual": 32}) == 3
    assert block_version([{"mode": "keep", "bits": 8}], False, {"group": 64, "residual": 0}) == 5
    # its sink: 6 (a runtime that read up to 5 would call the layout malformed)
    assert block_version([{"mode": "keep", "bits": 8}], False, {"group": 64, "residual": 0, "sink": 1}) \
        == 6
    assert block_version([{"mode": "keep"}], has_sharing=True) == 2
    assert block_version([{"mode": "keep"}], has_sharing=False) == 1
    config = CommonKVConfig.from_pretrained(plans["merged"][1])
    assert config.commonkv["format_version"] == 3
    monkeypatch.setattr(runtime_config, "FORMAT_VERSION", 2)
    with pytest.raises(CheckpointError, match="format_version 3; this runtime reads up to 2"):
        config.check_block()


def test_inspect_shows_group_bits(plans):
    plain, bitted = plans["mixed"]
    result = CliRunner().invoke(app, ["inspect", str(bitted), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    expected = _mixed_bits(plain)
    assert [g.get("bits") for g in info["groups"]] == [expected.get(g) for g in range(len(info["groups"]))]
    # codes, their share of the float16 min and step and the recent window at the planner's price (4096 tokens)
    width = info["full_kv_bytes_per_token"] // info["full_kv_elements_per_token"]
    unquantized = sum(g["elements"] * width for g in info["groups"] if "bits" not in g)
    pricing, config = Pricing(), json.loads((bitted / "config.json").read_text())
    head_dim, kv_heads = config["head_dim"], config["num_key_value_heads"]
    quantized = sum(g["elements"] * (pricing.kept(g["bits"], head_dim, kv_heads) if g["mode"] == "keep"
                                     else pricing.latent(g["bits"], g["rank"])) / 8
                    for g in info["groups"] if "bits" in g)
    assert info["kv_bytes_per_token"] == pytest.approx(unquantized + quantized)
    assert pricing.latent(4, 64) == pytest.approx(5 + 11 * 32 / 4096)  # ≈ 4 + 1 bit of scales + the window
    table = CliRunner().invoke(app, ["inspect", str(bitted)], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert "bits" in table.output


def test_card_shows_group_bits():
    groups = [{"layers": [0], "mode": "keep", "elements": 256, "bits": 8},
              {"layers": [1, 2], "mode": "merged", "rank": 96, "elements": 96, "bits": 4},
              {"layers": [3], "mode": "per_layer", "rank": 64, "elements": 64}]
    block = {"ratio": {"requested": 0.5, "achieved": 0.5}, "groups": groups}
    text = render_card(block, "src", "name", "commonkv convert", full_elements=1024, elements=416)
    assert "| layers | mode | rank | bits | elements/token |" in text
    assert "| 0 | keep | - | 8 | 256 |" in text and "| 1,2 | merged | 96 | 4 | 96 |" in text
    assert "| 3 | per_layer | 64 | - | 64 |" in text
    plain = render_card({**block, "groups": [{k: v for k, v in g.items() if k != "bits"} for g in groups]}, "src",
                        "name", "commonkv convert", full_elements=1024, elements=416)
    assert "bits" not in plain


def test_checkpoint_with_bits_loads_with_remote_code_only(plans, tmp_path):
    """The shipped runtime honours the bits alone: the same layers and bytes as the package's runtime."""
    ckpt = Path(shutil.copytree(plans["mixed"][1], tmp_path / "copied"))
    run = _run_isolated("""
        import os, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(os.environ["CKPT"], trust_remote_code=True)
        ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(0))
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=257, return_dict_in_generate=True)
        cache = out.past_key_values
        bits = [layer.streams[0].bits if hasattr(layer, "streams") else None for layer in cache.layers]
        print("OK", [type(layer).__name__ for layer in cache.layers], bits,
              cache.nbytes() == model.config.cache_bytes(82, 4, prompt=80))
    """, tmp_path, ckpt)
    assert run.returncode == 0, run.stderr[-2000:]
    model = load_checkpoint(ckpt, dtype=torch.float32)
    cache = model.generate(_ids(1, 80), max_new_tokens=3, do_sample=False, pad_token_id=257,
                           return_dict_in_generate=True).past_key_values
    bits = [layer.streams[0].bits if hasattr(layer, "streams") else None for layer in cache.layers]
    assert run.stdout.splitlines()[-1] == f"OK {[type(x).__name__ for x in cache.layers]} {bits} True"
    assert {4, 8} <= set(bits)
