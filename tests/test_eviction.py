"""SnapKV-style eviction: kept counts, bytes, true positions after eviction, generation with padding."""

from __future__ import annotations

import pytest
import torch

import commonkv_convert.runtime.modeling_commonkv as modeling
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime.eviction import keep_indices
from commonkv_convert.runtime.quantization import CompressedKVLayer, CompressedLatentLayer

from .helpers import convert_tiny, left_padded

BUDGET, WINDOW = 20, 8


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoints(merged_dirs, exact_dirs, tiny_model_dirs, tmp_path_factory):
    """Merged anchor latents, per-layer latents (qk-norm), and a ratio-0 conversion (kept K/V only)."""
    keep = convert_tiny(tiny_model_dirs["llama"], tmp_path_factory.mktemp("evict") / "keep", ratio=0.0)
    return {"merged": merged_dirs["llama"], "per_layer": exact_dirs["qwen3"], "keep": keep}


def test_keep_indices_takes_peaks_and_window_never_padding():
    scores = torch.zeros(2, 40)
    scores[:, [3, 17, 25]] = 1.0
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :10] = False
    scores[1, :10] = 5.0  # padding must lose even with the highest score
    scores[1, 12] = 1.0
    index = keep_indices(scores, budget=3, window=5, pool=1, padding=padding)
    assert index[0].tolist() == [3, 17, 25, 35, 36, 37, 38, 39]
    assert index[1].tolist() == [12, 17, 25, 35, 36, 37, 38, 39]
    pooled = keep_indices(scores[:1], budget=3, window=5, pool=3, padding=None)  # neighbours of a peak share it
    assert set(pooled[0, :3].tolist()) <= {2, 3, 4, 16, 17, 18, 24, 25, 26}


@pytest.mark.parametrize("which", ["merged", "per_layer", "keep"])
@pytest.mark.parametrize("bits", [None, 4])
def test_each_layer_keeps_budget_plus_window(checkpoints, which, bits):
    model = load_checkpoint(checkpoints[which], dtype=torch.float32, kv_cache=dict(budget=BUDGET, observe=WINDOW, bits=bits,
                                                                                group=8, residual=4))
    with torch.inference_mode():
        cache = model(_ids(2, 70), use_cache=True).past_key_values
        stored = [layer for layer in cache.layers if isinstance(layer, (CompressedLatentLayer, CompressedKVLayer))]
        assert stored and all(layer.get_seq_length() == BUDGET + WINDOW for layer in stored)
        assert cache.evicted == 70 - BUDGET - WINDOW
        assert cache.nbytes() == model.config.cache_bytes(70, 4, batch=2)
        for _ in range(3):
            cache = model(_ids(2, 1, 1), past_key_values=cache, use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_bytes(73, 4, prompt=70, batch=2)
    assert cache.nbytes() < load_checkpoint(checkpoints[which], dtype=torch.float32).config.cache_bytes(73, 4, batch=2)


@pytest.mark.parametrize("which", ["merged", "per_layer", "keep"])
def test_decode_after_eviction_continues_at_true_positions(checkpoints, which, monkeypatch):
    """With a fixed kept set, decoding on the evicted cache equals decoding on the full cache with the evicted
    tokens masked out: keys are rotated at their own positions, new tokens at prompt length + i."""
    prompt, new = _ids(1, 60), _ids(1, 5, 1)
    kept = sorted(torch.randperm(60 - WINDOW, generator=torch.Generator().manual_seed(2))[:BUDGET].tolist())
    index = torch.tensor([kept + list(range(60 - WINDOW, 60))])
    monkeypatch.setattr(modeling, "keep_indices", lambda *args, **kwargs: index)
    evicting = load_checkpoint(checkpoints[which], dtype=torch.float32, kv_cache=dict(budget=BUDGET, observe=WINDOW))
    full = load_checkpoint(checkpoints[which], dtype=torch.float32)
    with torch.inference_mode():
        cache = evicting(prompt, use_cache=True).past_key_values
        ref_cache = full(prompt, use_cache=True).past_key_values
        seen = torch.zeros(1, 60, dtype=torch.long)
        seen[0, index[0]] = 1
        for i in range(5):
            mask = torch.cat([seen, torch.ones(1, i + 1, dtype=torch.long)], dim=1)
            step = new[:, i : i + 1]
            # the first steps without a mask (all real), the rest with generate()'s full-length mask
            out = evicting(step, past_key_values=cache, attention_mask=None if i < 2 else torch.ones_like(mask))
            ref = full(step, past_key_values=ref_cache, attention_mask=mask)
            cache, ref_cache = out.past_key_values, ref.past_key_values
            assert (out.logits - ref.logits).abs().max() < 1e-4, i


def test_generate_after_eviction_left_padded_batch(checkpoints):
    """Each row of a left-padded batch evicts among its own tokens and generates as it would alone."""
    model = load_checkpoint(checkpoints["merged"], dtype=torch.float32, kv_cache=dict(budget=BUDGET, observe=WINDOW, bits=8,
                                                                                      group=8, residual=4))
    prompts = [_ids(1, 64, 3)[0], _ids(1, 50, 4)[0]]
    ids, mask = left_padded(prompts)
    with torch.inference_mode():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=257)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=257)
            assert batch[row, -6:].tolist() == alone[0, -6:].tolist(), row


def test_model_scope_keeps_the_same_tokens_in_every_layer(checkpoints, monkeypatch):
    picks = []
    real = modeling.keep_indices
    monkeypatch.setattr(modeling, "keep_indices", lambda *a, **k: picks.append(real(*a, **k)) or picks[-1])
    for scope in ("layer", "model"):
        picks.clear()
        model = load_checkpoint(checkpoints["keep"], dtype=torch.float32, kv_cache=dict(budget=BUDGET, observe=WINDOW,
                                                                                   scope=scope))
        with torch.inference_mode():
            cache = model(_ids(1, 70), use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_bytes(70, 4)
        distinct = {tuple(p[0].tolist()) for p in picks}
        if scope == "model":
            assert (len(picks), len(distinct)) == (1, 1)
        else:  # one pick per layer, and the layers of this random model do not agree
            assert len(picks) == model.config.num_hidden_layers and len(distinct) > 1
