"""SnapKV-style token eviction after prefill: which context tokens each cached layer keeps.

Self-contained (imports only torch): copied into every converted checkpoint next to `modeling_commonkv.py`.

The last `window` queries of the prompt (the observation window) are scored against every key of the prompt;
the attention probabilities are summed over the window and the query heads, max-pooled over `pool` neighbouring
tokens (keeps a phrase together rather than isolated tokens) and each cached layer keeps its `budget` best context
tokens plus the window. A layer's cache may be read by several layers (a merged group's anchor latent): the
scores of every reader are summed, so the tokens kept are those the whole group attends to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, window: int,
                  padding: torch.Tensor | None) -> torch.Tensor:
    """Attention mass each key gets from the last `window` queries, summed over them and the heads: [B, T].

    query [B, H, T, hd] and key [B, h_kv, T, hd] (RoPE applied), the whole prompt; padding [B, T] bool (True for
    real tokens) or None.
    """
    b, heads, t, hd = query.shape
    q = query[:, :, -window:].float().unflatten(1, (key.shape[1], heads // key.shape[1]))  # [B, h_kv, n, w, hd]
    scores = torch.einsum("bjnwd,bjtd->bjnwt", q, key.float()) * scaling
    rows = torch.arange(t - window, t, device=query.device)
    allowed = torch.arange(t, device=query.device)[None, :] <= rows[:, None]  # causal: [w, T]
    if padding is not None:
        allowed = allowed & padding.bool()[:, None, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1).nan_to_num_(0.0).sum(dim=(1, 2, 3))


def keep_indices(scores: torch.Tensor, budget: int, window: int, pool: int,
                 padding: torch.Tensor | None) -> torch.Tensor:
    """Sorted indices [B, budget + window] of the tokens to keep: the best `budget` context tokens + the window."""
    t = scores.shape[-1]
    context = scores[:, : t - window]
    pooled = F.max_pool1d(context.unsqueeze(1), kernel_size=pool, stride=1, padding=pool // 2).squeeze(1)
    if padding is not None:  # after pooling, so padding never borrows a neighbour's score
        pooled = pooled.masked_fill(~padding[:, : t - window].bool(), float("-inf"))
    # rank by pooled score, ties (pooling makes plateaus) by the token's own score, then by position
    by_own = context.argsort(dim=-1, descending=True, stable=True)
    order = pooled.gather(-1, by_own).argsort(dim=-1, descending=True, stable=True)
    best = by_own.gather(-1, order[:, :budget]).sort(dim=-1).values
    recent = torch.arange(t - window, t, device=scores.device).expand(scores.shape[0], window)
    return torch.cat([best, recent], dim=-1)


__all__ = ["keep_indices", "window_scores"]
