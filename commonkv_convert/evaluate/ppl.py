"""Perplexity for any transformers causal LM, plain or with a compressed cache (DESIGN §7).

The cache does the compressing: the model's own (a CommonKV checkpoint builds its latent cache), or one
a baseline supplies through ``new_cache``; these functions prefill with ``use_cache=True`` and continue on
whatever cache the model returned.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..architectures import CACHE_KWARG, cache_of


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` token ids of ``text`` as a [1, T] tensor (no special tokens).

    Only a prefix of the text is tokenized (grown until it is long enough): the essays run to
    millions of characters.
    """
    chars = 8 * max_tokens
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens or chars >= len(text):  # '>' so a word cut at the end is dropped
            return torch.tensor([ids[:max_tokens]], dtype=torch.long)
        chars *= 2


def _windows(total: int, size: int, stride: int, max_windows: int | None) -> list[int]:
    starts = list(range(0, total - size + 1, stride))
    if not starts:
        raise ValueError(f"The text has {total} tokens, fewer than one window of {size}. To resolve, pass more text.")
    return starts[:max_windows]


def _summary(nll_sum: float, tokens: int, windows: int) -> dict:
    nll = nll_sum / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "windows": windows}


def _last_logit_kwargs(model: PreTrainedModel) -> dict:
    """Ask for the last position's logits only where the model supports it (saves C × vocab floats)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def compressed_context_ppl(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    context_len: int,
    eval_len: int,
    *,
    stride: int | None = None,
    max_windows: int | None = None,
    new_cache: Callable[[], Cache | None] = lambda: None,
) -> dict:
    """Perplexity of ``eval_len`` tokens scored against a cache prefilled with ``context_len`` tokens.

    Per window starting at s: prefill tokens [s, s+C) with ``use_cache=True``, then feed tokens
    [s+C, s+C+E) in one forward on that cache. Target s+C is scored with the prefill's last logit,
    targets s+C+1 … s+C+E-1 with the second forward's logits, so every scored token sees the
    context only through the (possibly compressed) cache. Windows are consecutive chunks of C+E
    tokens unless ``stride`` is given. ``new_cache`` supplies the prefill's cache (default: the model's own).
    Returns ``{"ppl", "nll" (mean), "tokens", "windows"}``.
    """
    model.eval()
    device = model.device
    ids = input_ids.reshape(1, -1).to(device)
    size = context_len + eval_len
    starts = _windows(ids.shape[1], size, stride or size, max_windows)
    keep_last = _last_logit_kwargs(model)
    # Explicit positions, so a cache that stores fewer than C tokens still scores at the true ones.
    positions = torch.arange(context_len, size, device=device).unsqueeze(0)
    nll_sum = 0.0
    for s in starts:
        prefill = model(input_ids=ids[:, s : s + context_len], **{CACHE_KWARG: new_cache()}, use_cache=True,
                        **keep_last)
        targets = ids[:, s + context_len : s + size]
        out = model(input_ids=targets, **{CACHE_KWARG: cache_of(prefill)}, position_ids=positions, use_cache=True)
        logits = torch.cat([prefill.logits[:, -1:], out.logits[:, :-1]], dim=1)
        nll_sum += F.cross_entropy(logits[0].float(), targets[0], reduction="sum").item()
    return _summary(nll_sum, eval_len * len(starts), len(starts))


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, input_ids: torch.Tensor, seq_len: int, *, max_windows: int | None = None,
    new_cache: Callable[[], Cache | None] = lambda: None,
) -> dict:
    """Teacher-forced perplexity over consecutive windows of ``seq_len`` tokens, one forward each.

    Each window scores its tokens 1 … seq_len-1 from the logits before them. A cache from ``new_cache`` is
    passed where one is given (a baseline that compresses inside the forward); otherwise none is kept.
    Returns ``{"ppl", "nll" (mean), "tokens", "windows"}``.
    """
    model.eval()
    ids = input_ids.reshape(1, -1).to(model.device)
    starts = _windows(ids.shape[1], seq_len, seq_len, max_windows)
    nll_sum = 0.0
    for s in starts:
        window = ids[:, s : s + seq_len]
        cache = new_cache()
        logits = model(input_ids=window, **{CACHE_KWARG: cache}, use_cache=cache is not None).logits
        nll_sum += F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum").item()
    return _summary(nll_sum, (seq_len - 1) * len(starts), len(starts))
