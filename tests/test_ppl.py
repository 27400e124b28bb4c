"""compressed_context_ppl scores exactly the tokens it claims, against the cache the model returned."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from commonkv_convert.evaluate.ppl import compressed_context_ppl, perplexity, tokenize_text
from commonkv_convert.evaluate.resources import measure_memory, measure_speed
from commonkv_convert.evaluate.retrieval import greedy_answer
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.testing import TINY_FAMILIES


def _reference_nll(model: PreTrainedModel, ids: torch.Tensor, starts: list[int], c: int, e: int) -> float:
    """Mean NLL of targets s+C … s+C+E-1 from one full forward over each window (no cache)."""
    total = 0.0
    with torch.inference_mode():
        for s in starts:
            window = ids[:, s : s + c + e]
            logits = model(input_ids=window, use_cache=False).logits
            total += F.cross_entropy(logits[0, c - 1 : c + e - 1].float(), window[0, c:], reduction="sum").item()
    return total / (e * len(starts))


def _random_ids(n: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tiny_model_dir", list(TINY_FAMILIES), indirect=True)
def test_uncompressed_cache_matches_full_forward(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = _random_ids(150)
    result = compressed_context_ppl(model, ids, context_len=32, eval_len=16)
    assert result["windows"] == 3 and result["tokens"] == 48  # 150 // 48 consecutive windows
    reference = _reference_nll(model, ids, [0, 48, 96], 32, 16)
    assert result["nll"] == pytest.approx(reference, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(reference), rel=1e-4)


def test_stride_and_max_windows(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = _random_ids(100)
    result = compressed_context_ppl(model, ids, 20, 10, stride=25, max_windows=3)
    assert result["windows"] == 3 and result["tokens"] == 30
    assert result["nll"] == pytest.approx(_reference_nll(model, ids, [0, 25, 50], 20, 10), rel=1e-4)
    assert compressed_context_ppl(model, ids, 20, 10, stride=25, max_windows=3) == result  # deterministic


def test_tasks_pass_the_cache_under_the_installed_name(tiny_model_dir: Path) -> None:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes at 5.40): every task
    that threads a cache through a stock model must call it without the deprecated name."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = _random_ids(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        compressed_context_ppl(model, ids, 20, 10)
        perplexity(model, ids, 20, new_cache=DynamicCache)
        greedy_answer(model, ids, 3, question_at=30)
        measure_speed(model, ids, 2, repeats=1)
        measure_memory(model, ids, 1)


def test_too_short_input_is_refused(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="fewer than one window"):
        compressed_context_ppl(model, _random_ids(40), 32, 16)


def test_perplexity_matches_transformers_loss(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = _random_ids(130)
    result = perplexity(model, ids, 64)
    assert result["windows"] == 2 and result["tokens"] == 126
    with torch.inference_mode():
        losses = [model(input_ids=ids[:, s : s + 64], labels=ids[:, s : s + 64]).loss.item() for s in (0, 64)]
    assert result["nll"] == pytest.approx(sum(losses) / 2, rel=1e-5)


@pytest.mark.slow
def test_tokenize_text_takes_a_clean_prefix(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    text = essays_text()
    ids = tokenize_text(smollm2_tokenizer, text, 300)
    full = smollm2_tokenizer(text[:20_000], add_special_tokens=False)["input_ids"]
    assert ids.shape == (1, 300) and ids.dtype == torch.long
    assert ids[0].tolist() == full[:300]


@pytest.mark.slow
def test_smollm2_essay_ppl(smollm2_model: PreTrainedModel, smollm2_essay_ids: torch.Tensor) -> None:
    c, e = 512, 128  # DESIGN §4's protocol; one window keeps the test at a few seconds
    result = compressed_context_ppl(smollm2_model, smollm2_essay_ids, c, e, max_windows=1)
    assert result["nll"] == pytest.approx(_reference_nll(smollm2_model, smollm2_essay_ids, [0], c, e), rel=1e-4)
    assert math.isfinite(result["ppl"]) and result["ppl"] < 100
