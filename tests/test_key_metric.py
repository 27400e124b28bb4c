"""The query-aware key metric: ‖diag(√energy) e‖² must be the mean squared attention-score error that a key
error e causes under RoPE, measured here by rotating real queries and errors at random positions."""

from types import SimpleNamespace

import torch

from commonkv_convert.calibrate import query_energy
from commonkv_convert.factorize import balance_transform, key_score_metric
from commonkv_convert.runtime.modeling_commonkv import apply_rope


def _rope(positions: torch.Tensor, rotary_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, T, rd] in transformers' layout (the rd/2 frequencies repeated), at `positions` [T]."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions[:, None].double() * inv_freq[None]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos()[None], emb.sin()[None]


def test_query_energy_predicts_the_score_error_of_a_key_error():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, rotary_dim, n = 4, 2, 8, 6, 40000  # GQA, partial rotary
    facts = SimpleNamespace(head_dim=head_dim, num_kv_heads=kv_heads, num_heads=heads)
    scales = torch.rand(heads * head_dim, dtype=torch.float64) * 3 + 0.1  # anisotropic channels
    query = torch.randn(1, n, heads * head_dim, dtype=torch.float64) * scales
    metric = key_score_metric(query_energy(query, facts, rotary_dim)).double()
    error = torch.randn(kv_heads * head_dim, dtype=torch.float64)

    q_pos, k_pos = torch.randint(0, 200000, (n,)), torch.randint(0, 200000, (n,))
    q = apply_rope(query.view(1, n, heads, head_dim).transpose(1, 2), *_rope(q_pos, rotary_dim))  # [1, H, n, hd]
    e = apply_rope(error.view(kv_heads, 1, head_dim).expand(kv_heads, n, head_dim)[None], *_rope(k_pos, rotary_dim))
    e = e.repeat_interleave(heads // kv_heads, dim=1)  # query head h reads KV head h // n_rep
    measured = (q * e).sum(-1).square().mean(-1).sum()  # Σ over heads of E[(q_mᵀ R e_n)²]
    predicted = (metric @ error).square().sum()
    assert torch.allclose(measured, predicted, rtol=0.05), (measured, predicted)

    # pairing the wrong channels (adjacent instead of rotate_half's c, c + rd/2) predicts something else
    wrong = query.square().mean(1)[0].view(heads, head_dim)
    wrong = wrong.view(kv_heads, -1, head_dim).sum(1).flatten()
    assert not torch.allclose(measured, (wrong.sqrt() * error).square().sum(), rtol=0.05)


def test_balance_transform_scales_the_key_metric_to_the_value_energy():
    torch.manual_seed(1)
    d, d_kv = 16, 8
    w_k, w_v = torch.randn(d_kv, d, dtype=torch.float64), torch.randn(d_kv, d, dtype=torch.float64) * 5
    x = torch.randn(d, 500, dtype=torch.float64)
    gram = x @ x.T
    metric = key_score_metric(torch.rand(d_kv, dtype=torch.float64) + 0.5)
    t = balance_transform(w_k, w_v, None, gram, key_metric=metric)
    keys, values = t[:d_kv, :d_kv] @ w_k @ x, t[d_kv:, d_kv:] @ w_v @ x
    assert torch.allclose(keys.square().sum(), values.square().sum())
    # the key block is the metric up to one scale: relative weights of the channels are the metric's
    ratio = t[:d_kv, :d_kv].diagonal() / metric.diagonal()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
