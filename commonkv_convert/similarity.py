"""Cross-layer similarity: the CommonKV paper's observation, measured on the model being converted.

Adjacent layers' hidden states are far more alike than their raw keys and values; projected through one
shared down-projection, their latents become alike again. Hidden / key / value similarities are token-mean
cosines taken during calibration; latent similarities come from Grams under the group's shared projection.
"""

from __future__ import annotations

from .calibrate import LayerStats
from .factorize import Candidate, cosine_from_grams


def latent_similarity(candidate: Candidate, stats: dict[int, LayerStats]) -> float:
    """Mean cosine between each non-anchor layer's latent A x_l and the anchor's latent A x_a (fit split)."""
    anchor = candidate.predictor
    proj = candidate.down.double()
    sims = [
        cosine_from_grams(stats[l].cross["fit"][anchor], stats[l].gram["fit"], stats[anchor].gram["fit"], proj)
        for l in candidate.layers
        if l != anchor
    ]
    return sum(sims) / len(sims)


def adjacent_pairs(stats: dict[int, LayerStats], pair_latent: dict[int, float]) -> list[dict]:
    """One row per adjacent pair (l-1, l): hidden, key, value and latent cosine similarity."""
    rows = []
    for layer in sorted(stats):
        if layer == 0 or not stats[layer].cos_prev:
            continue
        row = {"layers": [layer - 1, layer], **{k: round(v, 4) for k, v in stats[layer].cos_prev.items()}}
        if layer - 1 in pair_latent:
            row["latent"] = round(pair_latent[layer - 1], 4)
        rows.append(row)
    return rows
