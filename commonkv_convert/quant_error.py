"""Quantization error of what a plan option stores, measured with the runtime's own quantizer.

The planner trades truncation (a lower rank) against precision (fewer bits), so both must be errors of the same
kind: the relative held-out error ‖K − K̂‖² / ‖K‖² of the keys and values a layer attends over. Truncation
errors come from Grams (factorize.py); a quantization error needs real activations, because a group's range
depends on the outliers of consecutive tokens. So both are measured on held-out calibration sequences: a kept
layer's keys (after RoPE, per channel) and values (per token), and a latent (per channel, the runtime's default
`latent_axis`) seen through each layer's up-projection. The two errors are added: quantization noise is nearly
uncorrelated with what truncation leaves out. Every held-out sequence starts at position 0, so a layout's `sink`
(its first tokens kept exact, `KVCacheOptions.sink`) applies to each as the runtime applies it to a prompt, and
its `clip` (each group's range by least squared error) as the runtime quantizes.
Pure tensor math; no I/O.
"""

from __future__ import annotations

import torch

from .runtime.cache_options import GROUP_BITS, KVCacheOptions
from .runtime.quantization import dequantize, quantize, without_sink


QUANT_BITS = GROUP_BITS  # the precisions a plan may choose below 16 bits
GROUP = KVCacheOptions.group  # tokens (channel axis) or features (token axis) per quantization group


def round_trip(x: torch.Tensor, bits: int, axis: str, group: int = GROUP, sink: int = 0,
               clip: bool = False) -> torch.Tensor:
    """x [..., T, n] quantized and read back as the runtime stores it (T a multiple of `group` for `channel`): the
    first `sink` tokens exact, and in the range of their group token `sink` stands in for them (`TokenStream`)."""
    out = dequantize(*quantize(without_sink(x, sink), bits, group, axis, clip), bits, group, axis, x.shape[-1],
                     torch.float32)
    if sink:
        out[..., :sink, :] = x[..., :sink, :].float()
    return out


def whole_groups(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """x [..., T, n] cut to a multiple of `group` tokens: only whole groups are ever quantized."""
    return x[..., : x.shape[-2] // group * group, :]


def kept_errors(keys: torch.Tensor, values: torch.Tensor, group: int = GROUP, sink: int = 0,
                clip: bool = False) -> dict[int, tuple[float, float]]:
    """A kept layer at each of QUANT_BITS: relative error of its keys [N, h, T, hd] (RoPE applied) quantized per
    channel and of its values quantized per token, as `CompressedKVLayer` stores them in groups of `group` (the
    first `sink` tokens exact)."""
    keys, values = whole_groups(keys.float(), group), whole_groups(values.float(), group)
    out = {}
    for bits in QUANT_BITS:
        out[bits] = tuple(float((x - round_trip(x, bits, axis, group, sink, clip)).square().sum()
                                / x.square().sum().clamp_min(1e-30))
                          for x, axis in ((keys, "channel"), (values, "token")))
    return out


def latent_errors(latent: torch.Tensor, ups: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
                  ranks: torch.Tensor, d_kv: int, group: int = GROUP, sink: int = 0,
                  clip: bool = False) -> dict[int, torch.Tensor]:
    """Quantization error of a latent at every rank of `ranks` and each of QUANT_BITS, in groups of `group` tokens
    (the first `sink` exact).

    latent: [N, T, r_max] held-out latents A X_p; ups: layer → [2·d_kv, r_max] (key rows, then value rows);
    targets: layer → the exact keys and values [W_k; W_v] X_l [N, T, 2·d_kv] the errors are relative to. The latent's
    channels are quantized independently (per channel), so the rank-r error uses the first r channels' noise.
    Returns layer → [len(QUANT_BITS), 2, len(ranks)] (key, value) relative errors.
    """
    latent = whole_groups(latent.float(), group)
    tokens = latent.shape[0] * latent.shape[1]
    out = {l: torch.zeros(len(QUANT_BITS), 2, len(ranks)) for l in ups}
    totals = {l: [whole_groups(t.float(), group).reshape(tokens, -1)[:, rows].square().sum().double()
                  for rows in (slice(0, d_kv), slice(d_kv, None))] for l, t in targets.items()}
    # ‖Σ_{j<r} B_j e_j‖² = Σ_{j,k<r} (BᵀB)_jk (EᵀE)_jk: every rank from one cumulative sum; BᵀB per layer
    # and EᵀE per precision are each computed once (float32 products, float64 sums)
    noises = ((latent - round_trip(latent, bits, "channel", group, sink, clip)).reshape(tokens, -1) for bits in QUANT_BITS)
    noise_grams = [(e.T @ e).double() for e in noises]
    for l, up in ups.items():
        up = up.float()
        for half, rows in enumerate((slice(0, d_kv), slice(d_kv, None))):
            up_gram = (up[rows].T @ up[rows]).double()
            for b, noise_gram in enumerate(noise_grams):
                both = up_gram * noise_gram  # symmetric: the leading r × r block's sum grows by row r's share
                energy = torch.cumsum(2 * both.tril(-1).sum(1) + both.diagonal(), 0)
                out[l][b, half] = (energy[ranks - 1] / totals[l][half].clamp_min(1e-30)).float()
    return out
