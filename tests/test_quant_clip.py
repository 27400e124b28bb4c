"""Clipped quantization ranges (`kv_cache={"clip": true}`, `--quant-clip`): each group's range picked for the least
squared error, measured by the planner as the runtime stores it, and recorded in the checkpoint's layout."""

from __future__ import annotations

import json

import pytest
import torch

from commonkv_convert.checkpoint.format import block_version
from commonkv_convert.quant_error import round_trip
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime.configuration_commonkv import FORMAT_VERSION, CommonKVConfig
from commonkv_convert.runtime.quantization import CompressedKVLayer, CompressedLatentLayer, TokenStream

from .helpers import convert_tiny


def _group_errors(x: torch.Tensor, y: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """Squared error per quantization group of x [..., T, n] read back as y."""
    e = (x - y).square()
    return e.unflatten(-1, (-1, group)).sum(-1) if axis == "token" else e.unflatten(-2, (-1, group)).sum(-2)


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_clipped_group_reads_back_no_worse_than_min_max(axis, bits):
    """Min-max is one of the ranges tried, so no group reads back worse; on Gaussian values at 2 bits the total
    error falls by more than a quarter (min-max spends two of four levels on the tails)."""
    x = torch.randn(2, 2, 64, 32, generator=torch.Generator().manual_seed(bits))
    plain, clipped = (round_trip(x, bits, axis, 16, clip=clip) for clip in (False, True))
    per_plain, per_clipped = _group_errors(x, plain, axis, 16), _group_errors(x, clipped, axis, 16)
    assert (per_clipped <= per_plain * (1 + 1e-5) + 1e-12).all()
    if bits == 2:
        assert per_clipped.sum() < 0.75 * per_plain.sum()


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_the_stream_stores_what_the_planner_measured(axis):
    """TokenStream(clip=True) reads back exactly the planner's round trip (quant_error.round_trip), sink included."""
    x = torch.randn(1, 2, 48, 16, generator=torch.Generator().manual_seed(0))
    x[..., 0, :] *= 30
    stream = TokenStream(2, 8, 0, axis, sink=1, clip=True)
    stream.append(x)
    stream.compress()
    assert stream.quantized == 48
    assert torch.equal(stream.full(), round_trip(x, 2, axis, 8, sink=1, clip=True))


def test_clip_needs_format_8():
    assert block_version([{"mode": "per_layer", "bits": 2}], False, {"group": 32, "clip": True}) == 8 \
        == FORMAT_VERSION
    assert block_version([{"mode": "per_layer", "bits": 2}], False, {"group": 32}) < 8


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_non_boolean_clip_is_refused(value):
    config = CommonKVConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                            kv_cache={"bits": 2, "clip": value})
    with pytest.raises(ValueError, match="clip=.* must be true or false"):
        config.kv_options()


def test_a_quant_clip_conversion_records_it_and_the_runtime_honours_it(tiny_model_dir, tmp_path):
    """--quant-clip: the layout says clip (format 8), every quantized layer of the loaded cache clips, the measured
    bytes are the formula's, and a load-time clip=false turns it off."""
    out = convert_tiny(tiny_model_dir, tmp_path / "clip", ratio=0.8, bits="16,4,2", context=256, quant_group=16,
                       residual=0, quant_clip=True)
    block = json.loads((out / "config.json").read_text())["commonkv"]
    assert block["quantization"].get("clip") is True and block["format_version"] == 8
    assert any("bits" in g for g in block["groups"])
    report = json.loads((out / "commonkv_report.json").read_text())
    assert report["validation"]["bytes_match"]
    assert "least squared error" in (out / "README.md").read_text()
    for clip in (True, False):
        model = load_checkpoint(out, dtype=torch.float32, **({} if clip else {"kv_cache": {"clip": False}}))
        ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
        cache = model(ids, use_cache=True).past_key_values
        streams = [s for layer in cache.layers if isinstance(layer, CompressedKVLayer | CompressedLatentLayer)
                   for s in layer.streams]
        assert streams and {s.clip for s in streams} == {clip}
        assert cache.nbytes() == model.config.cache_bytes(64, 4)
