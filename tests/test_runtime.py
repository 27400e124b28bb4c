"""The runtime: real latent cache bytes, padding, the fused value path, remote-code loading (the family × method
matrix is test_families.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DummyLayer

from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime import modeling_commonkv as ckv
from commonkv_convert.runtime.modeling_commonkv import LatentLayer
from commonkv_convert.testing import TINY_FAMILIES

from .helpers import convert_tiny, left_padded

FAMILIES = list(TINY_FAMILIES)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch,length", [(1, 7), (2, 33), (3, 64)])
def test_cache_bytes_equal_plan(merged_dirs, batch, length):
    model = load_checkpoint(merged_dirs["llama"], dtype=torch.float32)
    with torch.inference_mode():
        cache = model(_ids(batch, length), use_cache=True).past_key_values
        cache = model(_ids(batch, 1, 1), past_key_values=cache, use_cache=True).past_key_values
    expected = model.config.kv_elements_per_token() * batch * (length + 1) * 4
    assert cache.nbytes() == expected
    assert expected < model.config.full_kv_elements_per_token() * batch * (length + 1) * 4 * 0.5 + 1


def test_merged_group_holds_one_latent(merged_dirs):
    model = load_checkpoint(merged_dirs["qwen3"], dtype=torch.float32)
    with torch.inference_mode():
        cache = model(_ids(2, 16), use_cache=True).past_key_values
    for group in model.config.commonkv["groups"]:
        anchor, *others = group["layers"]
        assert isinstance(cache.layers[anchor], LatentLayer)
        assert cache.layers[anchor].latent.shape == (2, 1, 16, group["rank"])
        for layer in others:
            assert isinstance(cache.layers[layer], DummyLayer)
            assert cache.layers[layer].keys is None and cache.layers[layer].values is None


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_ratio_zero_checkpoint_generates_source_tokens(family, tiny_model_dirs, tmp_path):
    """`--ratio 0` keeps every layer's K/V: generate() must be the source's, token for token (transformers 5.24's
    `cache=` once made it `Paris-----…`)."""
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=torch.float32).eval()
    converted = load_checkpoint(convert_tiny(tiny_model_dirs[family], tmp_path / "r0", ratio=0.0), dtype=torch.float32)
    assert all(g["mode"] == "keep" for g in converted.config.commonkv["groups"])
    prompt = _ids(1, 10, 4)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=257)
    assert torch.equal(source.generate(prompt, **kwargs), converted.generate(prompt, **kwargs))
    # decode on a CPU attends with `matmul_attention`, the source with SDPA: the logits agree in a padded batch too
    ids, mask = left_padded([_ids(1, n, n)[0] for n in (5, 11, 8)])
    kwargs |= dict(attention_mask=mask, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    want, got = source.generate(ids, **kwargs), converted.generate(ids, **kwargs)
    assert torch.equal(want.sequences, got.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(want.scores, got.scores)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_single_prompts(family, merged_dirs):
    model = load_checkpoint(merged_dirs[family], dtype=torch.float32)
    prompts = [_ids(1, n, n)[0] for n in (5, 11, 8)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=257)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)[0, len(p):]
        assert torch.equal(batched[row], alone), f"prompt {row}"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fused_value_path_equals_explicit(merged_dirs, impl):
    model = load_checkpoint(merged_dirs["qwen2"], dtype=torch.float32, attn_implementation=impl)
    ids = _ids(2, 20)
    with torch.inference_mode():
        model.config.commonkv["value_path"] = "fused"
        fused = model(ids).logits
        model.config.commonkv["value_path"] = "explicit"
        explicit = model(ids).logits
        model.config.commonkv["value_path"] = "auto"
        auto = model(ids).logits
    assert (fused - explicit).abs().max() < 1e-4
    assert (auto - explicit).abs().max() < 1e-4


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("values", ["latent", "per_head"])
def test_matmul_attention_equals_eager_attention(mask_kind, values):
    """The fused attention reads the latent once for all heads, and CPU decode reads kept layers' per-head values
    the same way; both must equal the family's eager attention (over the latent as every KV head's values), with
    each kind of mask transformers hands over (decode and prefill)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    for q_len in (1, 5):
        b, heads, kv_heads, hd, tokens, r = 2, 6, 2, 8, 13, 11
        query, key = torch.randn(b, heads, q_len, hd), torch.randn(b, kv_heads, tokens, hd)
        latent = torch.randn(b, 1 if values == "latent" else kv_heads, tokens, r)
        causal = torch.ones(q_len, tokens, dtype=torch.bool).tril(tokens - q_len)
        allowed = causal.expand(b, 1, q_len, tokens).clone()
        allowed[0, ..., :3] = False  # a left-padded row
        mask = {"none": None, "bool": allowed,
                "additive": torch.zeros(b, 1, q_len, tokens).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
        reference_mask = (torch.zeros(1, 1, q_len, tokens).masked_fill(~causal, torch.finfo(torch.float32).min)
                          if mask is None else mask if mask.dtype != torch.bool else
                          torch.zeros(b, 1, q_len, tokens).masked_fill(~mask, torch.finfo(torch.float32).min))
        module = type("M", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
        expected = eager_attention_forward(module, query, key, latent.expand(-1, kv_heads, -1, -1), reference_mask,
                                           scaling=0.3)[0]
        got = ckv.matmul_attention(query, key, latent, mask, 0.3)
        assert got.shape == (b, q_len, heads, r)
        assert torch.allclose(got, expected, atol=1e-5), (q_len, (got - expected).abs().max())


def test_fused_decode_of_a_padded_batch_equals_explicit(merged_dirs):
    """Greedy decoding of a left-padded batch takes the fused path at every step; rebuilt values must give the
    same tokens."""
    model = load_checkpoint(merged_dirs["llama"], dtype=torch.float32)
    ids, mask = left_padded([_ids(1, n, n)[0] for n in (5, 11, 8)])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=257,
                  output_scores=True, return_dict_in_generate=True)
    runs = {}
    try:
        for path in ("fused", "explicit"):
            model.config.commonkv["value_path"] = path
            runs[path] = model.generate(ids, **kwargs)
    finally:
        model.config.commonkv["value_path"] = "auto"
    assert torch.equal(runs["fused"].sequences, runs["explicit"].sequences)
    for fused, explicit in zip(runs["fused"].scores, runs["explicit"].scores):
        assert (fused - explicit).abs().max() < 1e-4


def _run_isolated(code: str, tmp_path, checkpoint) -> subprocess.CompletedProcess:
    """A fresh interpreter in which the commonkv package cannot be imported."""
    script = "import sys; sys.modules['commonkv_convert'] = None\n" + textwrap.dedent(code)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "CKPT": str(checkpoint)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral"])  # plain; sliding + scaled; experts stored apart
def test_copied_checkpoint_loads_with_remote_code_only(family, merged_dirs, tmp_path):
    copy = tmp_path / "copied-checkpoint"
    shutil.copytree(merged_dirs[family], copy)
    ok = _run_isolated("""
        import os, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(os.environ["CKPT"], trust_remote_code=True)
        assert type(model).__name__ == "CommonKVForCausalLM", type(model)
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=257)
        print("OK", out[0].tolist())
    """, tmp_path, copy)
    assert ok.returncode == 0, ok.stderr[-2000:]
    here = load_checkpoint(copy, dtype=torch.float32).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4,
                                                               do_sample=False, pad_token_id=257)
    assert ok.stdout.splitlines()[-1] == f"OK {here[0].tolist()}"  # the shipped runtime is this one

    refused = _run_isolated("""
        import os
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(os.environ["CKPT"])
        except ValueError as err:
            print("REFUSED", "trust_remote_code" in str(err))
        else:
            print("LOADED")
    """, tmp_path, copy)
    assert refused.stdout.rstrip().endswith("REFUSED True"), refused.stdout + refused.stderr[-2000:]
