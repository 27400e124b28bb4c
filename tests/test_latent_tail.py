"""A latent's tail: its trailing channels stored at fewer bits than its leading ones (`--latent-tail`), planned,
recorded as a group's `tail`, stored by the cache as a second stream and counted by the byte formula."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from commonkv_convert.budget import Pricing, tail_options
from commonkv_convert.checkpoint.format import block_version
from commonkv_convert.errors import UserInputError
from commonkv_convert.factorize import Candidate
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import CommonKVForCausalLM, load_checkpoint
from commonkv_convert.runtime.configuration_commonkv import (
    FORMAT_VERSION,
    CheckpointError,
)
from commonkv_convert.runtime.quantization import CompressedLatentLayer

from .helpers import convert_tiny
from .test_group_bits import _edit_block, _run

LAYOUT = {"group": 8, "residual": 0}  # every whole group quantized within a short test sequence


def _with_tail(src: Path, dst: Path, tail: object, bits: int | None = 4) -> Path:
    """A copy of checkpoint `src` whose first latent group has `bits` and `tail`, at the converter's version."""
    shutil.copytree(src, dst)

    def change(block: dict) -> None:
        g = next(g for g in block["groups"] if g["mode"] != "keep")
        g.update(tail=tail, **({"bits": bits} if bits else {}))
        block["format_version"] = block_version(block["groups"], "sharing" in block)
    _edit_block(dst, change)
    return dst


def _rank(path: Path) -> int:
    block = json.loads((path / "config.json").read_text())["commonkv"]
    return next(g["rank"] for g in block["groups"] if g["mode"] != "keep")


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_a_tail_at_the_same_bits_reads_as_one_stream(axis):
    """Channel by channel (and token by token within the split) the two streams quantize what one would: with equal
    bits the tail changes nothing but where the codes live; with fewer bits it stores fewer bytes."""
    x = torch.randn(2, 1, 70, 24, generator=torch.Generator().manual_seed(0))
    layers = [CompressedLatentLayer(4, 8, 0, "channel", sink=1, tail=tail) for tail in (None, (8, 4), (8, 2))]
    for layer in layers:
        layer.update(x[..., :45, :])
        layer.compress()
        layer.update(x[..., 45:, :])
        layer.compress()
    one, split, coarse = layers
    assert torch.equal(one.latent, split.latent)
    assert [s.quantized for s in split.streams] == [64, 64]
    size = [sum(t.numel() * t.element_size() for t in layer.tensors()) for layer in layers]
    assert size[2] < size[1]
    assert (coarse.latent - x).square().mean() > (one.latent - x).square().mean()
    assert torch.equal(coarse.latent[..., :8], one.latent[..., :8])


def test_a_tailed_group_stores_two_streams_and_counts_their_bytes(merged_dirs, tmp_path):
    """Channels s.. of the tailed group's latent are a 2-bit stream beside its 4-bit one; the cache holds the bytes
    the config's formula states at every step, fewer than the group at 4 bits throughout; a load-time bits
    override stores the whole latent at its own precision."""
    src = merged_dirs["llama"]
    start = _rank(src) // 2
    tailed = load_checkpoint(_with_tail(src, tmp_path / "tail", {"start": start, "bits": 2}), dtype=torch.float32,
                             kv_cache=LAYOUT)
    for cache, seen, _ in _run(tailed):
        assert cache.nbytes() == tailed.config.cache_bytes(seen, 4, batch=2), seen
    split = [x for role, x in zip(cache.roles, cache.layers) if isinstance(x, CompressedLatentLayer)
             and len(x.streams) == 2]
    assert split and {(x.split, x.streams[0].bits, x.streams[1].bits) for x in split} == {(start, 4, 2)}
    whole = tailed.config.cache_bytes(seen, 4, batch=2)
    four = _with_tail(src, tmp_path / "four", {"start": start, "bits": 2})
    _edit_block(four, lambda block: next(g for g in block["groups"] if "tail" in g).pop("tail"))
    assert whole < load_checkpoint(four, dtype=torch.float32, kv_cache=LAYOUT).config.cache_bytes(seen, 4, batch=2)
    override = load_checkpoint(tmp_path / "tail", dtype=torch.float32, kv_cache={**LAYOUT, "bits": 8})
    cache = list(_run(override))[-1][0]
    assert all(len(x.streams) == 1 for x in cache.layers if isinstance(x, CompressedLatentLayer))
    assert cache.nbytes() == override.config.cache_bytes(seen, 4, batch=2)


@pytest.mark.parametrize("tail", [{"start": 0, "bits": 2}, {"start": "rank", "bits": 2}, {"start": 4, "bits": 4},
                                  {"start": 4, "bits": 8}, {"start": 4}, [4, 2], {"start": 4, "bits": 2, "x": 1},
                                  "no bits"])
def test_bad_tails_are_refused(merged_dirs, tmp_path, tail):
    src = merged_dirs["llama"]
    bits = 4
    if tail == "no bits":
        tail, bits = {"start": 4, "bits": 2}, None
    elif isinstance(tail, dict) and tail.get("start") == "rank":
        tail = {"start": _rank(src), "bits": 2}
    ckpt = _with_tail(src, tmp_path / "ckpt", tail, bits)
    with pytest.raises(CheckpointError, match=r"commonkv.groups\[\d+\] has tail=") as err:
        CommonKVForCausalLM.from_pretrained(ckpt)
    assert "\n" not in str(err.value) and "To resolve" in str(err.value)


def test_a_tail_needs_format_7():
    assert block_version([{"mode": "per_layer", "bits": 4, "tail": {"start": 8, "bits": 2}}], False) \
        == 7 <= FORMAT_VERSION


def test_latent_tail_needs_two_quantized_precisions():
    with pytest.raises(UserInputError, match=r"--latent-tail .* --bits 16,4 .* --bits 16,8,4,2"):
        ConvertOptions(latent_tail=True, bits="16,4")


def test_tail_price_is_each_stream_s_own():
    """A tail's price is the bytes of its two streams, each at its own width and bits, per latent element."""
    pricing = Pricing(bits=(16, 4, 2), context=1024, group=32, residual=0)
    assert pricing.latent(4, 64, (32, 4)) == pytest.approx(pricing.latent(4, 64))
    assert pricing.latent(4, 64, (32, 2)) == pytest.approx((pricing.latent(4, 32) + pricing.latent(2, 32)) / 2)
    assert pricing.latent(2, 64) < pricing.latent(4, 64, (32, 2)) < pricing.latent(4, 64)


def test_the_planner_tails_latents_and_the_runtime_honours_it(tiny_model_dir, tmp_path):
    """With --latent-tail at a tight budget the plan stores tails, the checkpoint records them (format 7), and the
    cache's measured bytes remove the share the plan states; the card names each tail."""
    from commonkv_convert.validate import removed_at_16_bits

    out = convert_tiny(tiny_model_dir, tmp_path / "tail", ratio=0.85, bits="16,4,2", context=256, quant_group=16,
                       residual=0, latent_tail=True)
    block = json.loads((out / "config.json").read_text())["commonkv"]
    tails = [g for g in block["groups"] if "tail" in g]
    assert tails, block["groups"]
    assert block["format_version"] == 7
    assert all(g["bits"] == 4 and g["tail"]["bits"] == 2 and 0 < g["tail"]["start"] < g["rank"] for g in tails)
    report = json.loads((out / "commonkv_report.json").read_text())
    assert report["validation"]["bytes_match"]
    assert report["validation"]["removed_at_16_bits"]["measured"] == pytest.approx(block["ratio"]["achieved"],
                                                                                   abs=1e-6)
    assert removed_at_16_bits(load_checkpoint(out, dtype=torch.float32).config, 256) >= 0.85
    g = tails[0]
    assert f"| 4, 2 from {g['tail']['start']} |" in (out / "README.md").read_text()


def _candidate() -> Candidate:
    """One layer's factorization at ranks 8..64: truncation error falling with rank, each precision's cumulative
    quantization error rising with it (QUANT_BITS order: 8, 4, 2)."""
    ranks = torch.arange(8, 72, 8)
    trunc = (1 - ranks / 72) ** 3  # convex, as a spectrum's tail is
    quant = torch.stack([torch.stack([c * ranks / 64] * 2) for c in (0.001, 0.02, 0.3)])
    return Candidate((0,), 0, torch.zeros(64, 4), {0: torch.zeros(4, 64)}, ranks, {0: trunc}, {0: trunc},
                     quant_error={0: quant})


def test_tail_options_add_each_part_s_error_and_keep_only_the_undominated():
    """A tailed latent's error is its truncation plus the leading channels' error at their bits and the tail's
    share at its own; of one latent's tailed options none is beaten on both bits and loss by another (the
    allocator could pick no other)."""
    cand = _candidate()
    options = tail_options(cand, "per_layer", None, Pricing(bits=(16, 4, 2), context=256))
    assert options and all(o.tail[1] == 2 and o.bits == 4 and 0 < o.tail[0] < o.rank for o in options)
    for o in options:
        r, s = o.rank / 64, o.tail[0] / 64
        assert o.errors[0][0] == pytest.approx((1 - o.rank / 72) ** 3 + 0.02 * s + 0.3 * (r - s), rel=1e-5)
    for a in options:
        assert not any(b.stored_bits <= a.stored_bits and b.loss < a.loss for b in options if b is not a)
    assert len(options) < sum(range(len(cand.ranks)))  # some were dominated
