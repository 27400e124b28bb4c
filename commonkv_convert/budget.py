"""Allocate the KV budget: choose per layer span keep / per-layer latent / merged latent and a rank.

An exact dynamic program over (layers covered, elements spent): every option covers a span of consecutive
layers starting where the previous one ended, costs the cache elements it stores per token, and carries the
estimated loss measured on held-out calibration tokens. The plan minimizes the summed loss subject to
elements ≤ (1 − ratio) · full, so merging is used only where it beats spending the same elements on
per-layer latents. Pure math: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .checkpoint.format import group_elements
from .errors import PlanError
from .factorize import Candidate


@dataclass(frozen=True)
class Option:
    start: int
    size: int
    mode: str  # keep | per_layer | merged
    rank: int
    cost: int  # cache elements per token
    loss: float
    errors: dict = field(default_factory=dict, compare=False)  # layer -> (key error, value error)

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


def candidate_options(cand: Candidate, key_weight: float = 1.0, value_weight: float = 1.0) -> list[Option]:
    """One option per rank of a factorization (per-layer when it has one layer, merged otherwise)."""
    layers = cand.layers
    mode = "per_layer" if len(layers) == 1 else "merged"
    out = []
    for idx, rank in enumerate(cand.ranks.tolist()):
        errors = {l: (float(cand.err_k[l][idx]), float(cand.err_v[l][idx])) for l in layers}
        loss = sum(key_weight * k + value_weight * v for k, v in errors.values())
        out.append(Option(layers[0], len(layers), mode, rank, group_elements(mode, len(layers), rank, 0), loss, errors))
    return out


def keep_option(layer: int, d_kv: int) -> Option:
    return Option(layer, 1, "keep", 0, group_elements("keep", 1, 0, d_kv), 0.0, {layer: (0.0, 0.0)})


def allocate(options: list[Option], num_layers: int, budget: int) -> list[Option]:
    """Minimum-loss sequence of options covering layers 0..L-1 with Σ cost ≤ budget (elements per token)."""
    unit = math.gcd(*[o.cost for o in options]) or 1
    cap = budget // unit
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
            j, c = i + opt.size, opt.cost // unit
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
            f"No plan fits {budget} cache elements per token; the cheapest possible plan needs {cheapest}. "
            "To resolve, lower --ratio, raise --group-size, or lower --rank-step."
        )
    cost = int(np.argmin(best[num_layers]))
    plan, j = [], num_layers
    while j > 0:
        opt = options[pick[j, cost]]
        plan.append(opt)
        cost, j = int(prev[j, cost]), opt.start
    return plan[::-1]


def uniform(candidates: dict[tuple[int, int], Candidate], num_layers: int, group: int, budget: int,
            d_kv: int) -> list[Option]:
    """The baseline the allocator must beat: same group size and the same rank everywhere."""
    spans = [(s, min(group, num_layers - s)) for s in range(0, num_layers, group)]
    per_group = budget // len(spans)
    plan = []
    for start, size in spans:
        cand = candidates.get((start, size))
        fitting = [o for o in candidate_options(cand) if o.cost <= per_group] if cand else []
        if not fitting:
            raise PlanError(f"A uniform plan cannot reach {budget} cache elements per token with layers "
                            f"{start}-{start + size - 1} as one group. To resolve, lower --ratio or --rank-step, "
                            "or use the optimal allocator.")
        plan.append(fitting[-1])
    return plan


def plan_cost(plan: list[Option]) -> int:
    return sum(o.cost for o in plan)


def _cheapest(options: list[Option], num_layers: int) -> int:
    best = [0] + [math.inf] * num_layers
    for i in range(num_layers):
        for o in options:
            if o.start == i and i + o.size <= num_layers:
                best[i + o.size] = min(best[i + o.size], best[i] + o.cost)
    return int(best[num_layers]) if best[num_layers] < math.inf else -1
