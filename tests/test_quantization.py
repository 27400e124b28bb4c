"""Cache quantization: packed codes, bytes equal to the analytic plan, 8-bit close to the unquantized cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from commonkv_convert.runtime import CommonKVConfig, load_checkpoint
from commonkv_convert.runtime.quantization import TokenStream, dequantize, pack, quantize, unpack

from .helpers import convert_tiny


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def keep_dir(tiny_model_dirs, tmp_path_factory):
    """A ratio-0 conversion: every layer keeps its K/V (quantization and eviction of the full cache)."""
    return convert_tiny(tiny_model_dirs["qwen2"], tmp_path_factory.mktemp("keep") / "qwen2", ratio=0.0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_codes_round_trip_within_half_a_step(bits, axis):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 8), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    assert pack(codes, bits).shape[-1] == 8 * bits // 8
    x = torch.randn(2, 3, 64, 37) * torch.logspace(-2, 2, 37)  # channels of very different magnitudes
    data, lo, step = quantize(x, bits, 32, axis)
    assert data.dtype == torch.uint8 and lo.dtype == step.dtype == torch.float16
    y = dequantize(data, lo, step, bits, 32, axis, 37, torch.float32)
    per_value = step.float().repeat_interleave(32, -1)[..., :37] if axis == "token" else step.float().repeat_interleave(32, -2)
    # half a step, plus float32 rounding of q·s + m (values up to ~300): 1e-4 of a step
    assert ((y - x).abs() <= per_value * (0.5 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("bits,sink", [(2, 0), (4, 0), (8, 0), (2, 1)])
@pytest.mark.parametrize("which", ["merged", "keep"])
def test_cache_bytes_equal_plan(merged_dirs, keep_dir, which, bits, sink):
    path = merged_dirs["llama"] if which == "merged" else keep_dir
    model = load_checkpoint(path, dtype=torch.float32, kv_cache=dict(bits=bits, group=8, residual=5, sink=sink))
    full = load_checkpoint(path, dtype=torch.float32).config
    cache, seen = None, 0
    with torch.inference_mode():
        for step, length in enumerate([45, 1, 1, 1, 9, 30]):
            cache = model(_ids(2, length, step), past_key_values=cache, use_cache=True).past_key_values
            seen += length
            assert cache.nbytes() == model.config.cache_bytes(seen, 4, batch=2), (step, seen)
    assert cache.nbytes() < full.cache_bytes(seen, 4, batch=2)
    if which == "keep":  # by hand: 80 of 87 tokens quantized; keys per channel (groups of 8 tokens), values per token
        c = model.config
        hd, rows = c.head_dim, 2 * c.num_key_value_heads * c.num_hidden_layers  # batch 2
        keys = 80 * hd * bits // 8 + 80 // 8 * hd * 2 * 2 + (7 + sink) * hd * 4
        values = 80 * (hd * bits // 8 + hd // 8 * 2 * 2) + (7 + sink) * hd * 4
        assert cache.nbytes() == rows * (keys + values)


def test_eight_bits_close_to_unquantized(merged_dirs, keep_dir):
    ids = _ids(1, 96)
    for path in (merged_dirs["llama"], keep_dir):
        errors, agree = {}, {}
        with torch.inference_mode():
            ref = load_checkpoint(path, dtype=torch.float32)
            want = ref(ids[:, 64:], past_key_values=ref(ids[:, :64]).past_key_values).logits
            for bits in (8, 4):
                model = load_checkpoint(path, dtype=torch.float32, kv_cache=dict(bits=bits, residual=0))
                got = model(ids[:, 64:], past_key_values=model(ids[:, :64]).past_key_values).logits
                errors[bits] = (got - want).abs().max().item()
                agree[bits] = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        # the error follows the quantization step (255 vs 15 levels: ~17x), and greedy tokens do not move
        assert errors[8] < errors[4] / 8, errors
        assert agree[8] == 1.0, agree


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_sink_tokens_are_exact_and_leave_their_group_s_range(axis):
    """A first token far larger than the rest (an attention sink) is read back exactly, and the other tokens of its
    group are quantized at their own range: a smaller error than when the sink widens it."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 40, 16)
    x[..., 0, :] *= 50
    reads = {}
    for sink in (0, 1):
        stream = TokenStream(2, 8, 0, axis, sink=sink)
        stream.append(x)
        stream.compress()
        assert stream.length == 40 and stream.quantized == 40
        reads[sink] = stream.full()
    assert torch.equal(reads[1][..., 0, :], x[..., 0, :])
    errors = {sink: (y - x)[..., 1:8, :].square().sum() for sink, y in reads.items()}
    assert errors[1] < errors[0] / 4 if axis == "channel" else torch.equal(reads[1][..., 1:, :], reads[0][..., 1:, :])


def test_bad_options_are_refused():
    config = CommonKVConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, kv_cache={"bits": 3})
    with pytest.raises(ValueError, match="bits=3"):
        config.kv_options()
    weighted = {"groups": [{"layers": [0, 1], "mode": "merged", "rank": 8, "merge": "weighted", "weights": [1, 1]}]}
    config = CommonKVConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, commonkv=weighted, kv_cache={"budget": 8})
    with pytest.raises(ValueError, match="weighted merge"):
        config.kv_options()
    with pytest.raises(ValueError, match="unknown keys \\['window'\\]"):
        CommonKVConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, kv_cache={"window": 8}).kv_options()


@pytest.mark.parametrize("flat", ["kv_bits", "kv_window"])
def test_flat_cache_options_are_refused(flat):
    """`from_pretrained(dir, kv_bits=4)` would otherwise set an unused attribute and quantize nothing."""
    with pytest.raises(ValueError, match="kv_cache=\\{'bits': 4"):
        CommonKVConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, **{flat: 4})


def test_cli_cache_flags_come_from_the_runtime_options():
    """Every KVCacheOptions field is a --kv-* flag of generate and eval, with the field's default in its help."""
    from dataclasses import fields

    from typer.testing import CliRunner

    from commonkv_convert.cli import app
    from commonkv_convert.runtime.cache_options import KVCacheOptions

    for command in ("generate", "eval"):
        text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output.split())
        for f in fields(KVCacheOptions):
            assert f"--kv-{f.name.replace('_', '-')}" in text
        assert "(default 32)" in text


def test_copied_checkpoint_quantizes_with_remote_code_only(merged_dirs, tmp_path):
    """The runtime's sibling modules travel with the checkpoint; options come through from_pretrained kwargs."""
    copy = tmp_path / "copied"
    shutil.copytree(merged_dirs["llama"], copy)
    script = "import sys; sys.modules['commonkv_convert'] = None\n" + textwrap.dedent("""
        import os, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(os.environ["CKPT"], trust_remote_code=True,
                                                     kv_cache={"bits": 4, "budget": 16})
        ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(0))
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=257, return_dict_in_generate=True)
        cache = out.past_key_values
        print("OK", type(cache.layers[0]).__name__, cache.get_seq_length(), cache.nbytes() == model.config.cache_bytes(82, 4, prompt=80))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "CKPT": str(copy)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-4:] == ["OK", "CompressedLatentLayer", "50", "True"]


@pytest.mark.parametrize("flags,message", [(["--kv-bits", "3"], "bits=3"), (["--kv-budget", "0"], "budget=0"),
                                           (["--kv-sink", "32"], "sink=32 must be in [0, group=32)")])
def test_cli_refuses_bad_cache_options(merged_dirs, flags, message):
    from typer.testing import CliRunner

    from commonkv_convert.cli import app

    result = CliRunner().invoke(app, ["generate", str(merged_dirs["llama"]), "hi", *flags], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("axis,width", [("channel", 24), ("token", 64), ("token", 40)])
def test_dequantize_into_a_view_equals_the_plain_read(axis, width):
    """A decode step dequantizes straight into the stream's whole sequence; it must read back what the plain
    path reads (also for a token axis whose last group is padded)."""
    from commonkv_convert.runtime.quantization import dequantize, quantize

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, width)
    for bits in (8, 4, 2):
        parts = quantize(x, bits, 32, axis)
        plain = dequantize(*parts, bits, 32, axis, width, torch.float32)
        whole = torch.full((2, 3, 70, width), float("nan"))
        dequantize(*parts, bits, 32, axis, width, torch.float32, out=whole[..., :64, :])
        assert torch.equal(whole[..., :64, :], plain) and whole[..., 64:, :].isnan().all()
        reference = (x - plain).abs().max()
        assert reference < 3 * (x.max() - x.min()) / (2 ** bits - 1)


@pytest.mark.parametrize("which", ["merged", "keep", "shared"])
def test_layers_sharing_a_workspace_read_what_fresh_memory_reads(merged_dirs, keep_dir, shared_dirs, which,
                                                                  tmp_path):
    """The quantized layers of a cache dequantize into one buffer per slot in turn (`Workspace`); each must attend
    over exactly what it would read from memory of its own, a KVSharer source included: its keys and values are
    read by a later layer after the layer between them has dequantized its own."""
    import json

    from commonkv_convert.runtime.modeling_commonkv import CommonKVCache

    path = {"merged": merged_dirs["llama"], "keep": keep_dir, "shared": shared_dirs["llama"]}[which]
    if which == "shared":  # layers 2 and 3 read layer 0's keys and values; layer 1 stores its own in between
        path = shutil.copytree(path, tmp_path / "shared")
        config = json.loads((path / "config.json").read_text())
        assert config["commonkv"]["sharing"]["pairs"] == [[2, 1], [3, 1]]
        config["commonkv"]["sharing"]["pairs"] = [[2, 0], [3, 0]]
        (path / "config.json").write_text(json.dumps(config))
    model = load_checkpoint(path, dtype=torch.float32, kv_cache=dict(bits=4, group=8, residual=5))
    ids = _ids(2, 60)
    shared, fresh = CommonKVCache(model.config), CommonKVCache(model.config)
    for layer in fresh.layers:
        for stream in getattr(layer, "streams", []):
            stream.workspace = None
    used = set()
    with torch.inference_mode():
        for start, end in [(0, 45), (45, 46), (46, 47), (47, 56), (56, 57)]:
            got = model(ids[:, start:end], past_key_values=shared, use_cache=True).logits
            want = model(ids[:, start:end], past_key_values=fresh, use_cache=True).logits
            assert torch.equal(got, want), (start, (got - want).abs().max())
            used |= {s.workspace[1] for layer in shared.layers for s in getattr(layer, "streams", []) if s.workspace}
            assert not shared.workspace.buffers  # freed at the end of each forward
    assert used == ({"latent"} if which == "merged" else {"keys", "values"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_a_16_bit_read_rounds_the_float32_read_once(dtype, axis):
    """In a 16-bit model dtype, q·s + m is rounded once (as the float32 read, then cast), not once per operation."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 40) * torch.logspace(-2, 2, 40)
    for bits in (8, 4, 2):
        parts = quantize(x, bits, 32, axis)
        got = dequantize(*parts, bits, 32, axis, 40, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize(*parts, bits, 32, axis, 40, torch.float32).to(dtype))
