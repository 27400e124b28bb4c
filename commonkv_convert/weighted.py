"""Factors for the `weighted` merge mode (the CommonKV paper's merge, DESIGN §5). Pure math; no I/O.

A weighted group of layers L shares one down-projection A (r × d); every layer l keeps its own latent
c^l = A x^l while it is a sink or a recent token, and older tokens are stored once as the merged latent
m = Σ_j w_j c^j. We want, on calibration data (X_l: attention inputs of layer l, C_jk = X_j X_kᵀ):

    A     from the whitened SVD of the stacked [W_l] with the pooled Gram G = Σ_l G_ll (G = L Lᵀ):
          A = V_rᵀ L⁻¹ with V_r the top right singular vectors of [W_l] L
    B_l = W_l G_ll Aᵀ (A G_ll Aᵀ)⁻¹                       (each layer's refit for its OWN latent)
    w   = argmin Σ_l ‖W_l X_l − B_l A Σ_j w_j X_j‖²        (a G × G least-squares system)

B_l is not nested in r, but it is in per-layer orthonormal coordinates: with A G_ll Aᵀ = L_l L_lᵀ,
Ã_l = L_l⁻¹ A and U_l = W_l G_ll Ã_lᵀ, the rank-r solution is B_l A_r = U_l[:, :r] Ã_l[:r] (Cholesky factors
of leading blocks are leading blocks). So every quantity below is a cumulative sum over the latent columns,
and all ranks cost one pass, as in `factorize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .factorize import DAMP, Candidate, Gram, _orthonormalize, _right_singular_vectors, damped_cholesky


@dataclass
class WeightedCandidate(Candidate):
    """A Candidate whose `up` holds U_l (rows × r_max); B_l at rank r is U_l[:, :r] L_l[:r, :r]⁻¹."""

    chol: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> L_l, Cholesky of A G_ll Aᵀ
    merge_weights: torch.Tensor | None = None  # [n_ranks, G] calibrated w per rank of the grid

    def factors(self, rank: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self.down[:rank], {l: up_at_rank(u, self.chol[l], rank) for l, u in self.up.items()}

    def weights_at(self, rank: int) -> list[float]:
        idx = int(torch.searchsorted(self.ranks, torch.tensor(rank)))
        return [float(w) for w in self.merge_weights[idx]]


def up_at_rank(u: torch.Tensor, chol: torch.Tensor, rank: int) -> torch.Tensor:
    """B = U_r L_r⁻¹  ([rows, r]), from U [rows, r_max] and the lower Cholesky factor L [r_max, r_max]."""
    l_r = chol[:rank, :rank].to(u.dtype)
    return torch.linalg.solve_triangular(l_r.T, u[:, :rank].T, upper=True).T


def weighted_factorize(weights: dict[int, torch.Tensor], fit: Gram, held_out: Gram,
                       ranks: torch.Tensor) -> WeightedCandidate:
    """Shared A, per-layer B_l, merge weights and held-out merged-token errors for every rank in `ranks`.

    weights: layer -> stacked [W_k; W_v] (2·d_kv × d). err_k/err_v are the relative held-out errors of keys
    and values reconstructed from the merged latent (what old tokens get); recent tokens are exact latents.
    """
    layers = tuple(sorted(weights))
    r_max = int(ranks[-1])
    eye = torch.eye(weights[layers[0]].shape[1], dtype=torch.float64, device=weights[layers[0]].device)
    own = {l: fit(l, l) + eye * fit(l, l).diagonal().mean().clamp_min(1e-12) * DAMP for l in layers}
    pooled = sum(own.values())
    chol = damped_cholesky(pooled, 0.0)
    whitened = torch.cat([weights[l] for l in layers]) @ chol  # [W_l] L
    vh = _right_singular_vectors(whitened, r_max)
    down = _orthonormalize(torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T, pooled)  # V_rᵀ L⁻¹

    per_chol, per_down, up = {}, {}, {}
    for l in layers:
        per_chol[l] = damped_cholesky(down @ own[l] @ down.T, 1e-10)
        per_down[l] = torch.linalg.solve_triangular(per_chol[l], down, upper=False)  # Ã_l = L_l⁻¹ A
        up[l] = weights[l] @ own[l] @ per_down[l].T  # U_l

    fit_terms = _terms(weights, up, per_down, fit)
    ho_terms = _terms(weights, up, per_down, held_out)
    n = len(layers)
    q = sum(fit_terms[l][1].sum(0) for l in layers)  # [n, n, r_max]: Σ_l tr(P_l C_jk P_lᵀ) per rank
    p = sum(fit_terms[l][0].sum(0) for l in layers)  # [n, r_max]:    Σ_l tr(P_l C_jl W_lᵀ) per rank
    q, p = q.permute(2, 0, 1), p.T  # per rank
    ridge = torch.eye(n, dtype=q.dtype, device=q.device) * q.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None] * 1e-9
    w = torch.linalg.solve(q + ridge, p.unsqueeze(-1)).squeeze(-1)  # [r_max, n]

    d_kv = weights[layers[0]].shape[0] // 2
    err_k, err_v = {}, {}
    for l in layers:
        cross, quad, total = ho_terms[l]
        errs = []
        for rows in (slice(0, d_kv), slice(d_kv, None)):
            c = (cross[rows].sum(0).T * w).sum(-1)  # [r_max]
            qd = torch.einsum("jkr,rj,rk->r", quad[rows].sum(0), w, w)
            tot = total[rows].sum()
            errs.append(((tot - 2 * c + qd) / tot.clamp_min(1e-30))[ranks - 1].clamp_min(0).float())
        err_k[l], err_v[l] = errs
    return WeightedCandidate(layers, layers[0], down, up, ranks, err_k, err_v, chol=per_chol,
                             merge_weights=w[ranks - 1].float())


def _terms(weights, up, per_down, gram: Gram) -> dict:
    """Per layer l, per output row, as cumulative sums over latent columns (index r-1 = rank r):
    cross [rows, n, r_max] = tr(P_l C_jl W_lᵀ) and quad [rows, n, n, r_max] = tr(P_l C_jk P_lᵀ),
    P_l = U_l[:, :r] Ã_l[:r], and total [rows] = ‖W_l X_l‖²."""
    layers = tuple(sorted(weights))
    out = {}
    for l in layers:
        u, a = up[l], per_down[l]
        cross = torch.stack([torch.cumsum(u * (weights[l] @ gram(l, j) @ a.T), -1) for j in layers], 1)
        n = len(layers)
        quad = torch.empty(u.shape[0], n, n, u.shape[1], dtype=u.dtype, device=u.device)
        for x, j in enumerate(layers):
            for y, k in enumerate(layers):
                if y < x:
                    quad[:, x, y] = quad[:, y, x]
                    continue
                z = a @ gram(j, k) @ a.T  # Ã_l C_jk Ã_lᵀ
                # row i: Σ_{a,b<r} u_ia z_ab u_ib, by cumulative sums over the leading block
                quad[:, x, y] = _leading_quadratic(u, z)
        total = ((weights[l] @ gram(l, l)) * weights[l]).sum(-1)
        out[l] = (cross, quad, total)
    return out


def _leading_quadratic(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[rows, r_max]: entry (i, r-1) = u_i[:r] · z[:r, :r] · u_i[:r] (z symmetric in the sum's value)."""
    zs = (z + z.T) / 2
    lower = torch.tril(zs, -1)
    # Σ_{a,b<r} = Σ_{a<r} (u_a² z_aa + 2 u_a Σ_{b<a} z_ab u_b): each new column a adds one term
    inc = u * u * zs.diagonal() + 2 * u * (u @ lower.T)
    return torch.cumsum(inc, -1)
