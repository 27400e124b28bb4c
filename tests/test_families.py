"""The family × method matrix: every tiny family converts exactly at full rank, and every method's checkpoint
loads, holds the bytes its plan says, decodes as it prefills and generates over the cache it hands back.

Methods and their options are `tests/conftest.py`'s METHODS; checkpoints are converted once per session.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.testing import TINY_FAMILIES

from .conftest import METHODS
from .helpers import check_checkpoint, left_padded

FAMILIES = list(TINY_FAMILIES)
MATRIX = [(family, method) for family in FAMILIES for method in METHODS]


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_conversion_is_exact(family, tiny_model_dirs, exact_dirs):
    """fp32 logits within 1e-4 of the source's, the same greedy tokens, alone and in a left-padded batch."""
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=torch.float32).eval()
    converted = load_checkpoint(exact_dirs[family], dtype=torch.float32)
    ids = _ids(2, 40)
    with torch.inference_mode():
        assert (source(ids).logits - converted(ids).logits).abs().max() < 1e-4
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=257)
    assert torch.equal(source.generate(ids[:1, :12], **kwargs), converted.generate(ids[:1, :12], **kwargs))
    padded, mask = left_padded([_ids(1, n, n)[0] for n in (6, 13, 9)])
    assert torch.equal(source.generate(padded, attention_mask=mask, **kwargs),
                       converted.generate(padded, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("family,method", MATRIX)
def test_checkpoint_validates_and_holds_its_plan(family, method, converted):
    """The report's validation passed; a real cache holds the analytic bytes after prefill and every decode step."""
    path = converted(family, method)
    check_checkpoint(path)
    validation = json.loads((path / "commonkv_report.json").read_text())["validation"]
    assert validation["passed"] and validation["bytes_match"]
    model = load_checkpoint(path, dtype=torch.float32)
    ids = _ids(2, 24)
    with torch.inference_mode():
        cache = model(ids[:, :10], use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_bytes(10, 4, batch=2)
        for t in range(10, 24):
            cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
            assert cache.nbytes() == model.config.cache_bytes(t + 1, 4, batch=2), t + 1


@pytest.mark.parametrize("family,method", [(f, m) for f, m in MATRIX if m != "weighted"])
def test_step_by_step_decode_equals_full_forward(family, method, converted):
    """(A weighted group folds older tokens after each forward, so its decode reads merged latents: not here.)"""
    model = load_checkpoint(converted(family, method), dtype=torch.float32)
    ids = _ids(2, 24)
    with torch.inference_mode():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(10, 24):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("family,method", MATRIX)
def test_generate_hands_the_cache_back_every_step(family, method, converted):
    """generate() == a manual greedy loop over the returned cache, for every max_new_tokens. transformers 5.24
    passes the cache as `cache=`; a runtime that ignored it restarted from an empty cache at every step."""
    model = load_checkpoint(converted(family, method), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare raw argmax steps, never stopped early
    prompt = _ids(1, 9, 5)
    with torch.inference_mode():
        step = model(prompt, use_cache=True)
        tokens = []
        for _ in range(8):
            tokens.append(step.logits[:, -1:].argmax(-1))
            step = model(tokens[-1], past_key_values=step.past_key_values, use_cache=True)
    for n in (1, 3, 8):
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=257)
        assert torch.equal(out[:, 9:], torch.cat(tokens[:n], dim=1)), n
