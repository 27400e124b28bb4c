"""Memory and speed of a target's cache, measured on real prefills and decodes (not from the plan).

Cache bytes are counted over the unique storages the cache holds after a prefill of T tokens (the
CommonKV cache and the baseline caches count themselves with `nbytes()`; a stock cache is summed here), and
compared with the full-precision full cache of the source model at the same T. Peak memory is the
process's peak RSS on CPU and the peak allocated CUDA memory on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from ..architectures import CACHE_KWARG, cache_of
from ..memory import peak_rss_bytes, release_memory


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache holds, over unique storages (a tensor shared by two layers counts once)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_memory(model: PreTrainedModel, ids: torch.Tensor, full_bytes_per_token: int,
                   new_cache: Callable[[], Cache | None] = lambda: None) -> dict:
    """Prefill `ids` [1, T]; the cache's bytes against the full cache's, and the peak memory of the step."""
    device = model.device
    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out = model(input_ids=ids.to(device), **{CACHE_KWARG: new_cache()}, use_cache=True, logits_to_keep=1)
    _sync(device)
    tokens = ids.shape[1]
    nbytes = cache_nbytes(cache_of(out))
    full = full_bytes_per_token * tokens
    row = {"context": tokens, "cache_bytes": nbytes, "full_cache_bytes": full,
           "removed": round(1.0 - nbytes / full, 6), "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)}
    if device.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["cuda_over_weights_mb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return row


@torch.inference_mode()
def measure_speed(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, repeats: int = 2,
                  new_cache: Callable[[], Cache | None] = lambda: None) -> dict:
    """Prefill tokens/s over `ids` [1, T] and greedy decode tokens/s for `new_tokens` steps; best of repeats."""
    device = model.device
    ids = ids.to(device)
    prefill_s = decode_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(input_ids=ids, **{CACHE_KWARG: new_cache()}, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill_s = min(prefill_s, time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for step in range(new_tokens):
            position = torch.tensor([[ids.shape[1] + step]], device=device)
            out = model(input_ids=token, **{CACHE_KWARG: cache_of(out)}, position_ids=position, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s = min(decode_s, time.perf_counter() - start)
    return {"context": ids.shape[1], "prefill_tokens_per_s": round(ids.shape[1] / prefill_s, 2),
            "decode_tokens_per_s": round(new_tokens / decode_s, 2), "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "device": str(device)}
