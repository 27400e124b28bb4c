"""Allocate the KV budget: choose per layer span keep / per-layer latent / merged latent, a rank and a precision.

A dynamic program over (layers covered, bits spent): every option covers a span of consecutive layers starting
where the previous one ended, costs the bits it stores per token (cache elements × the price of its precision,
see `Pricing`), and carries the estimated loss measured on held-out calibration tokens: truncation
plus quantization error. The plan minimizes the summed loss subject to bits ≤ (1 − ratio) · the full cache at
16 bits, so merging, a lower rank or fewer bits are each used only where they beat the others at equal bytes.
With 16-bit options only, this is exact over elements. Pure math: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from .checkpoint.format import group_elements
from .errors import PlanError
from .factorize import Candidate
from .quant_error import QUANT_BITS
from .runtime.cache_options import KVCacheOptions

FULL_BITS = 16  # what --ratio is measured against: the full cache at 16 bits, as models are served
BUCKETS = 8192  # budget resolution of the dynamic program when prices are fractional


@dataclass(frozen=True)
class Option:
    start: int
    size: int
    mode: str  # keep | per_layer | merged
    rank: int
    cost: int  # cache elements per token
    loss: float
    errors: dict = field(default_factory=dict, compare=False)  # layer -> (key error, value error)
    bits: int = FULL_BITS  # precision of what it stores: 16 (unquantized) or one of QUANT_BITS
    price: float = FULL_BITS  # bits per stored element, scales and recent window included
    tail: tuple[int, int] | None = None  # a latent's (first channel, bits) stored at fewer bits than `bits`

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.size))

    @property
    def stored_bits(self) -> float:
        """Bits per token: what the budget counts."""
        return self.cost * self.price


@dataclass(frozen=True)
class Pricing:
    """Bits per stored element of each allowed precision, at a context of `context` tokens: the codes, their
    float16 scales (one pair per `group` values), the runtime's unquantized recent window (`residual` tokens and
    a partial group) and its `sink` first tokens, counted by the runtime's own byte formula
    (`KVCacheOptions.stream_bytes`) for the stream's real width, so padding of a last group counts too."""

    bits: tuple[int, ...] = (FULL_BITS,)
    context: int = 4096
    group: int = KVCacheOptions.group
    residual: int = KVCacheOptions.residual
    sink: int = KVCacheOptions.sink

    @classmethod
    def of_block(cls, block: dict) -> Pricing:
        """The pricing a checkpoint's plan was made with (its `commonkv` block: ratio.context, quantization)."""
        layout = KVCacheOptions.from_entry(block.get("quantization"))
        return cls(context=block.get("ratio", {}).get("context", cls.context),
                   group=layout.group, residual=layout.residual, sink=layout.sink)

    def latent(self, bits: int, rank: int, tail: tuple[int, int] | None = None) -> float:
        """Per element of a rank-`rank` latent; with a `tail` (first channel s, bits), channels s.. at those bits."""
        if tail is None:
            return self._price(bits, rank, 1, ("channel",))  # KVCacheOptions.latent_axis
        start, tail_bits = tail
        return (self._price(bits, start, 1, ("channel",)) * start
                + self._price(tail_bits, rank - start, 1, ("channel",)) * (rank - start)) / rank

    def kept(self, bits: int, head_dim: int, kv_heads: int) -> float:
        return self._price(bits, head_dim, kv_heads, ("channel", "token"))  # keys per channel, values per token

    def latent_values(self, bits: int, rank: int, head_dim: int, kv_heads: int) -> float:
        """Per element of a `latent_values` layer's keys (per channel) and value latent together."""
        d_kv = head_dim * kv_heads
        keys = self._price(bits, head_dim, kv_heads, ("channel",))
        return (keys * d_kv + self.latent(bits, rank) * rank) / (d_kv + rank)

    def _price(self, bits: int, width: int, heads: int, axes: tuple[str, ...]) -> float:
        if bits >= FULL_BITS:
            return float(FULL_BITS)
        options = KVCacheOptions(bits=bits, group=self.group, residual=self.residual, sink=self.sink)
        stored = sum(options.stream_bytes(self.context, width, heads, axis, FULL_BITS // 8) for axis in axes)
        return stored * 8 / (self.context * width * heads * len(axes))


# layer → (key, value) curves (a, b): an estimated error e costs a·e + b·e² in the loss (sensitivity.py)
Weights = dict[int, tuple[tuple[float, float], tuple[float, float]]]
UNWEIGHTED = ((1.0, 0.0), (1.0, 0.0))


def weighted_loss(errors: dict[int, tuple[float, float]], weights: Weights | None) -> float:
    """Σ over layers of each key and value error through its layer's curve (the error itself where none)."""
    total = 0.0
    for layer, (key, value) in errors.items():
        (a_k, b_k), (a_v, b_v) = (weights or {}).get(layer, UNWEIGHTED)
        total += a_k * key + b_k * key * key + a_v * value + b_v * value * value
    return total


def candidate_options(cand: Candidate, weights: Weights | None = None, pricing: Pricing = Pricing(),
                      tails: bool = False) -> list[Option]:
    """One option per rank and allowed precision of a factorization (per-layer when it has one layer, merged
    otherwise); a quantized option's errors add the latent's measured quantization error to the truncation's.
    With `tails`, also every latent whose trailing channels take the next lower allowed precision (`tail_options`)."""
    layers = cand.layers
    mode = "per_layer" if len(layers) == 1 else "merged"
    out = []
    for idx, rank in enumerate(cand.ranks.tolist()):
        cost = group_elements(mode, len(layers), rank, 0)
        for bits in pricing.bits:
            if bits < FULL_BITS and cand.quant_error is None:
                continue  # no measured quantization error (a weighted merge): not offered quantized
            errors = {l: tuple(float((cand.err_k, cand.err_v)[h][l][idx]) + _quant_error(cand, l, bits, h, idx)
                               for h in (0, 1)) for l in layers}
            out.append(Option(layers[0], len(layers), mode, rank, cost, weighted_loss(errors, weights), errors, bits,
                              pricing.latent(bits, rank)))
    if tails and cand.quant_error is not None:
        out += tail_options(cand, mode, weights, pricing)
    return out


def _quant_error(cand: Candidate, layer: int, bits: int, half: int, idx: int) -> float:
    """The measured error quantizing the first ranks[idx] channels of the latent at `bits` adds to layer's keys
    (half 0) or values (1); 0 at 16 bits."""
    return 0.0 if bits >= FULL_BITS else float(cand.quant_error[layer][QUANT_BITS.index(bits), half, idx])


def tail_options(cand: Candidate, mode: str, weights: Weights | None, pricing: Pricing) -> list[Option]:
    """Latents of every rank r whose channels s.. (s a smaller rank) are stored at the next lower allowed
    precision than channels ..s-1: the SVD's trailing directions carry the least energy, so fewer bits cost them
    less error (reverse water-filling). The latent's channels are quantized independently and their noises
    are nearly uncorrelated, so the error is the leading block's at its bits plus the tail's share at its own:
    q_b(s) + q_t(r) − q_t(s), each from the cumulative errors the analysis measured. Of one latent's options only
    those no other option beats on both bits and loss are kept: the allocator could pick no other."""
    quantized = sorted((b for b in pricing.bits if b < FULL_BITS), reverse=True)
    ranks = cand.ranks.tolist()
    out = []
    for bits, tail_bits in pairwise(quantized):
        for idx, rank in enumerate(ranks):
            cost = group_elements(mode, len(cand.layers), rank, 0)
            for s_idx, start in enumerate(ranks[:idx]):
                errors = {l: tuple(float((cand.err_k, cand.err_v)[h][l][idx]) + _quant_error(cand, l, bits, h, s_idx)
                                   + _quant_error(cand, l, tail_bits, h, idx)
                                   - _quant_error(cand, l, tail_bits, h, s_idx) for h in (0, 1)) for l in cand.layers}
                tail = (start, tail_bits)
                out.append(Option(cand.layers[0], len(cand.layers), mode, rank, cost, weighted_loss(errors, weights),
                                  errors, bits, pricing.latent(bits, rank, tail), tail))
    return _undominated(out)


def _undominated(options: list[Option]) -> list[Option]:
    """The options no other one beats on both stored bits and loss."""
    kept, best = [], math.inf
    for o in sorted(options, key=lambda o: (o.stored_bits, o.loss)):
        if o.loss < best:
            kept.append(o)
            best = o.loss
    return kept


def latent_values_options(cand: Candidate, kept_error: dict[int, tuple[float, float]], head_dim: int,
                          kv_heads: int, pricing: Pricing = Pricing(), weights: Weights | None = None) -> list[Option]:
    """A layer that keeps its keys and stores a latent of its values (`cand`: its values-only factorization), at
    every rank and allowed precision: the key error is a kept layer's at that precision (kept_error: bits → its
    measured (key, value) error), the value error the latent's truncation plus quantization error."""
    (layer,) = cand.layers
    out = []
    for idx, rank in enumerate(cand.ranks.tolist()):
        for bits in pricing.bits:
            if bits < FULL_BITS and (bits not in kept_error or cand.quant_error is None):
                continue
            key = kept_error[bits][0] if bits < FULL_BITS else 0.0
            value = float(cand.err_v[layer][idx]) + (float(cand.quant_error[layer][QUANT_BITS.index(bits), 1, idx])
                                                     if bits < FULL_BITS else 0.0)
            out.append(Option(layer, 1, "latent_values", rank,
                              group_elements("latent_values", 1, rank, head_dim * kv_heads),
                              weighted_loss({layer: (key, value)}, weights), {layer: (key, value)}, bits,
                              pricing.latent_values(bits, rank, head_dim, kv_heads)))
    return out


def keep_options(layer: int, head_dim: int, kv_heads: int, quant_error: dict[int, tuple[float, float]],
                 pricing: Pricing = Pricing(), weights: Weights | None = None) -> list[Option]:
    """The layer kept as it is, at each allowed precision (quant_error: bits → its measured (key, value) error)."""
    cost = group_elements("keep", 1, 0, head_dim * kv_heads)
    out = []
    for bits in pricing.bits:
        if bits < FULL_BITS and bits not in quant_error:
            continue
        k, v = quant_error[bits] if bits < FULL_BITS else (0.0, 0.0)
        out.append(Option(layer, 1, "keep", 0, cost, weighted_loss({layer: (k, v)}, weights), {layer: (k, v)}, bits,
                          pricing.kept(bits, head_dim, kv_heads)))
    return out


def keep_option(layer: int, d_kv: int) -> Option:
    return Option(layer, 1, "keep", 0, group_elements("keep", 1, 0, d_kv), 0.0, {layer: (0.0, 0.0)})


def allocate(options: list[Option], num_layers: int, budget: float) -> list[Option]:
    """Minimum-loss sequence of options covering layers 0..L-1 with Σ stored bits ≤ budget (bits per token).

    Integral costs run on their greatest common divisor, exactly; fractional ones (quantized options) on
    BUCKETS units of the budget, each cost rounded up, so a plan found always fits."""
    costs = [o.stored_bits for o in options]
    if all(c == int(c) for c in costs) and budget // (math.gcd(*map(int, costs)) or 1) <= 4 * BUCKETS:
        unit = math.gcd(*map(int, costs)) or 1
        units = [int(c) // unit for c in costs]
        cap = int(budget // unit)
    else:
        unit = budget / BUCKETS
        units = [math.ceil(c / unit - 1e-9) for c in costs]
        cap = BUCKETS
    by_start: dict[int, list[tuple[int, Option]]] = {}
    for idx, opt in enumerate(options):
        by_start.setdefault(opt.start, []).append((idx, opt))

    best = np.full((num_layers + 1, cap + 1), np.inf)
    best[0, 0] = 0.0
    pick = np.full((num_layers + 1, cap + 1), -1, dtype=np.int64)
    prev = np.zeros((num_layers + 1, cap + 1), dtype=np.int64)
    spent = np.arange(cap + 1)
    for i in range(num_layers):
        if not np.isfinite(best[i]).any():
            continue
        for idx, opt in by_start.get(i, []):
            j, c = i + opt.size, units[idx]
            if j > num_layers or c > cap:
                continue
            new = best[i, : cap + 1 - c] + opt.loss
            better = new < best[j, c:]
            best[j, c:][better] = new[better]
            pick[j, c:][better] = idx
            prev[j, c:][better] = spent[: cap + 1 - c][better]
    if not np.isfinite(best[num_layers]).any():
        cheapest = _cheapest(options, num_layers)
        raise PlanError(
            f"No plan fits {budget / FULL_BITS:.0f} 16-bit cache elements per token; the cheapest possible plan "
            f"needs {cheapest / FULL_BITS:.0f}. To resolve, lower --ratio, raise --group-size, lower --rank-step, "
            "or allow fewer --bits."
        )
    cost = int(np.argmin(best[num_layers]))
    plan, j = [], num_layers
    while j > 0:
        opt = options[pick[j, cost]]
        plan.append(opt)
        cost, j = int(prev[j, cost]), opt.start
    return plan[::-1]


def uniform(candidates: dict[tuple[int, int], Candidate], num_layers: int, group: int, budget: float,
            d_kv: int) -> list[Option]:
    """The baseline the allocator must beat: same group size and the same rank everywhere, at 16 bits."""
    spans = [(s, min(group, num_layers - s)) for s in range(0, num_layers, group)]
    per_group = budget / FULL_BITS // len(spans)
    plan = []
    for start, size in spans:
        cand = candidates.get((start, size))
        fitting = [o for o in candidate_options(cand) if o.cost <= per_group] if cand else []
        if not fitting:
            raise PlanError(f"A uniform plan cannot reach {budget / FULL_BITS:.0f} cache elements per token with layers "
                            f"{start}-{start + size - 1} as one group. To resolve, lower --ratio or --rank-step, "
                            "or use the optimal allocator.")
        plan.append(fitting[-1])
    return plan


def plan_cost(plan: list[Option]) -> int:
    return sum(o.cost for o in plan)


def plan_bits(plan: list[Option]) -> float:
    """Bits per token the plan stores (what --ratio is measured in, against FULL_BITS per element)."""
    return sum(o.stored_bits for o in plan)


def _cheapest(options: list[Option], num_layers: int) -> float:
    best = [0.0] + [math.inf] * num_layers
    for i in range(num_layers):
        for o in options:
            if o.start == i and i + o.size <= num_layers:
                best[i + o.size] = min(best[i + o.size], best[i] + o.stored_bits)
    return best[num_layers] if best[num_layers] < math.inf else -1
