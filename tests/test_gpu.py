"""The runtime on CUDA in bf16: generate runs, cache bytes equal the plan, fused values equal explicit ones.

Every test here is marked `gpu` and skipped without a CUDA device (see conftest). The checkpoint is the tiny
Llama converted into merged groups of two layers (`merged_dirs["llama"]`), so anchor and reuse layers both run.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DummyLayer

from commonkv_convert.runtime import CommonKVCache, load_checkpoint
from commonkv_convert.runtime.modeling_commonkv import LatentLayer

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16
PAD = 257


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=gen).to(DEVICE)


def _load(path, dtype=DTYPE, **kwargs):
    return load_checkpoint(path, dtype=dtype, device=DEVICE, **kwargs)


def test_generate_runs_on_cuda_bf16(merged_dirs):
    model = _load(merged_dirs["llama"])
    assert next(model.parameters()).dtype == DTYPE and next(model.parameters()).is_cuda
    prompt = _ids(2, 12, 1)
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=PAD,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (2, 28)
    assert torch.equal(out.sequences[:, :12], prompt)
    assert int(out.sequences.max()) < model.config.vocab_size
    cache = out.past_key_values
    assert isinstance(cache, CommonKVCache)
    latents = [layer.latent for layer in cache.layers if isinstance(layer, LatentLayer)]
    assert latents and all(t.is_cuda and t.dtype == DTYPE for t in latents)


def test_left_padded_generate_on_cuda_bf16(merged_dirs):
    """A padding mask takes another SDPA route than the causal flag; it must run and keep prompts apart."""
    model = _load(merged_dirs["llama"])
    prompts = [_ids(1, n, n)[0] for n in (5, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), PAD, device=DEVICE)
    mask = torch.zeros((2, width), dtype=torch.long, device=DEVICE)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    assert batched.shape == (2, width + 8)
    assert torch.equal(batched[:, :width], ids)


@pytest.mark.parametrize("batch,length", [(1, 7), (3, 33)])
def test_cache_bytes_equal_plan_on_cuda(merged_dirs, batch, length):
    model = _load(merged_dirs["llama"])
    with torch.inference_mode():
        cache = model(_ids(batch, length), use_cache=True).past_key_values
        cache = model(_ids(batch, 1, 1), past_key_values=cache, use_cache=True).past_key_values
    element = torch.tensor([], dtype=DTYPE).element_size()
    expected = model.config.kv_elements_per_token() * batch * (length + 1) * element
    assert cache.nbytes() == expected
    full = model.config.full_kv_elements_per_token() * batch * (length + 1) * element
    assert expected <= full // 2
    for group in model.config.commonkv["groups"]:
        anchor, *others = group["layers"]
        latent = cache.layers[anchor].latent
        assert latent.is_cuda and latent.dtype == DTYPE
        assert latent.shape == (batch, 1, length + 1, group["rank"])
        assert all(isinstance(cache.layers[layer], DummyLayer) for layer in others)


def _logits(model, ids: torch.Tensor, value_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits over the whole prompt, and the logits of one cached decode step after it."""
    model.config.commonkv["value_path"] = value_path
    try:
        with torch.inference_mode():
            full = model(ids).logits.float()
            cache = model(ids[:, :-1], use_cache=True).past_key_values
            step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits.float()
    finally:
        model.config.commonkv["value_path"] = "auto"
    return full, step


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fused_value_path_matches_explicit_on_cuda_bf16(merged_dirs, impl):
    """Fused (attention over the latent, value width r ≠ head_dim) ≈ explicit (B_v c) within bf16 rounding."""
    path = merged_dirs["llama"]
    model = _load(path, attn_implementation=impl)
    reference = _load(path, dtype=torch.float32, attn_implementation=impl)
    ids = _ids(2, 48, 5)
    fused, explicit, exact = _logits(model, ids, "fused"), _logits(model, ids, "explicit"), \
        _logits(reference, ids, "explicit")
    for f, e, r in zip(fused, explicit, exact):
        assert torch.isfinite(f).all()
        diff = float((f - e).abs().max())
        rounding = max(float((f - r).abs().max()), float((e - r).abs().max()))
        # the two bf16 paths are no further apart than bf16 rounding takes either from fp32
        assert diff <= 2 * rounding + 1e-3, (diff, rounding)
        assert diff <= 0.05 * float(r.abs().max()), (diff, float(r.abs().max()))
