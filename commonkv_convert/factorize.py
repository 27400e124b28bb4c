"""Factorize K/V projections into a shared down-projection and per-layer up-projections.

Pure tensor math on second-moment statistics (Grams) of the attention inputs; no file I/O.

For a set of target layers S that all read the latent of one *predictor* layer p (p = the layer itself for a
per-layer latent, p = the anchor for a merged group) we want, on calibration data,

    min_{A, B_l}  Σ_{l∈S} ‖W_l X_l − B_l A X_p‖²        (X_l: attention inputs of layer l, d × tokens)

which is a reduced-rank regression. With G_pp = X_p X_pᵀ = L Lᵀ and M = [W_l C_lp G_pp⁻¹]_l (C_lp = X_l X_pᵀ)
its solution is the truncated SVD of M L: A = V_rᵀ L⁻¹ ("activation-aware", whitened), and B_l the least-squares
refit. For S = {p} this is Palu/SVD-LLM style whitened SVD; for a merged group the C_lp terms are the refit that
corrects the drift between the anchor's input and each layer's own input (DESIGN §3.4).

Rows of A are then re-orthonormalized against the data (A G_pp Aᵀ = I by a Cholesky of the small r × r Gram),
which keeps the span of every leading block of rows. So the rank-r solution is simply the first r rows of A and
the first r columns of each B_l, and held-out errors for every rank come from one pass of cumulative sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Gram = Callable[[int, int], torch.Tensor]  # (i, j) -> X_i X_jᵀ  (d × d, float64)
DAMP = 1e-5  # ridge on the predictor's Gram, relative to its mean diagonal (as GPTQ/SVD-LLM damp it)


@dataclass
class Candidate:
    """Factors of one (targets, predictor) pair at the largest useful rank, with held-out error per rank."""

    layers: tuple[int, ...]
    predictor: int
    down: torch.Tensor  # [r_max, d]   rows nested by importance, data-orthonormal on the fit split
    up: dict[int, torch.Tensor]  # layer -> [2·d_kv, r_max]   key rows first, then value rows
    ranks: torch.Tensor  # [n] int64 rank grid
    err_k: dict[int, torch.Tensor]  # layer -> [n] relative held-out key error ‖K − K̂‖² / ‖K‖²
    err_v: dict[int, torch.Tensor]  # layer -> [n] relative held-out value error
    path: object = None  # where the factors were offloaded to, if they were (convert.CandidateStore)
    # layer -> [len(QUANT_BITS), 2, n] (key, value) relative held-out error the latent's quantization adds at each
    # precision and rank (quant_error.latent_errors); None where not measured (weighted merges)
    quant_error: dict[int, torch.Tensor] | None = None

    def factors(self, rank: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(down [r, d], {layer: up [2·d_kv, r]}) truncated to `rank`."""
        return self.down[:rank], {l: b[:, :rank] for l, b in self.up.items()}

    def error_at(self, rank: int) -> dict[int, tuple[float, float]]:
        idx = int(torch.searchsorted(self.ranks, torch.tensor(rank)))
        return {l: (float(self.err_k[l][idx]), float(self.err_v[l][idx])) for l in self.layers}


def damped_cholesky(gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor of a Gram with a relative ridge, so rank-deficient calibration data still works."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    for attempt in range(6):
        ridge = scale * (damp or 1e-12) * 10**attempt if (attempt or damp) else 0.0
        factor, info = torch.linalg.cholesky_ex(gram + eye * ridge)
        if int(info) == 0:
            return factor
    raise ArithmeticError("Calibration Gram is not positive definite even after damping.")


def rank_grid(max_rank: int, step: int) -> torch.Tensor:
    return torch.arange(step, max_rank + 1, step, dtype=torch.int64)


def factorize(
    weights: dict[int, torch.Tensor],
    predictor: int,
    fit: Gram,
    held_out: Gram,
    ranks: torch.Tensor,
    *,
    whiten: bool = True,
    anchor: int | None = None,
) -> Candidate:
    """Shared down-projection for `weights` (layer -> stacked [W_k; W_v], 2·d_kv × d) read from `predictor`.

    `fit` Grams determine the factors; `held_out` Grams (other calibration tokens) measure their error.
    `anchor`: the layer whose own input the predictor stands for (default: the predictor itself); refit.py
    passes a separate predictor index for the anchor's input as the compressed layers before it leave it.
    """
    anchor = predictor if anchor is None else anchor
    layers = tuple(sorted(weights))
    r_max = int(ranks[-1])
    g_pp = fit(predictor, predictor)
    ridge = torch.eye(g_pp.shape[0], dtype=g_pp.dtype, device=g_pp.device) * g_pp.diagonal().mean().clamp_min(1e-12) * DAMP

    def cross(l: int) -> torch.Tensor:
        """X_l X_pᵀ, with the ridge on the predictor's own Gram: at full rank the refit is then W A⁻¹ exactly,
        also along directions the calibration data never visits."""
        return fit(l, predictor) + ridge if l == anchor else fit(l, predictor)

    g_pp = g_pp + ridge
    w_cross = {l: weights[l] @ cross(l) for l in layers}  # W_l C_lp, read by the SVD target and the refit
    if whiten:
        chol = damped_cholesky(g_pp, 0.0)
        # M L = W_l C_lp G_pp⁻¹ L = W_l C_lp L⁻ᵀ  (stacked over l); L⁻ᵀ via a triangular solve
        targets = torch.cat([w_cross[l] for l in layers])  # [Σ rows, d]
        whitened = torch.linalg.solve_triangular(chol, targets.T, upper=False).T
        vh = _right_singular_vectors(whitened, r_max)
        down = torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T  # V_rᵀ L⁻¹
    else:
        down = _right_singular_vectors(torch.cat([weights[l] for l in layers]), r_max)
    down = _orthonormalize(down, g_pp)
    up = {l: w_cross[l] @ down.T for l in layers}  # least squares, since A G Aᵀ = I

    p_ho = down @ held_out(predictor, predictor) @ down.T
    err_k, err_v = {}, {}
    d_kv = weights[layers[0]].shape[0] // 2
    for l in layers:
        w, b = weights[l], up[l]
        q = w @ held_out(l, predictor) @ down.T  # [rows, r_max]
        total = ((w @ held_out(l, l)) * w).sum(-1)  # ‖W X‖² per output row
        errs = []
        for rows in (slice(0, d_kv), slice(d_kv, None)):
            errs.append(_error_by_rank(b[rows], q[rows], p_ho, total[rows].sum(), ranks))
        err_k[l], err_v[l] = errs
    return Candidate(layers, predictor, down, up, ranks, err_k, err_v)


def _right_singular_vectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors (rows) of m, from the eigenvectors of its smaller Gram, cheaper than an SVD.

    With fewer rows than columns (a layer's 2·d_kv rows against the hidden size d: 1024 × 4096 for Llama-3-8B)
    the n × n eigenproblem of m mᵀ gives the left vectors u_i, and v_i = mᵀ u_i / ‖mᵀ u_i‖: (d/n)³ less work.
    """
    rows, cols = m.shape
    if rows < cols and k < rows:
        _, vecs = torch.linalg.eigh(m @ m.T)
        v = m.T @ vecs.flip(-1)[:, :k]
        return (v / v.norm(dim=0).clamp_min(torch.finfo(v.dtype).tiny)).T
    _, vecs = torch.linalg.eigh(m.T @ m)
    return vecs.flip(-1)[:, :k].T


def _orthonormalize(down: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """R⁻¹ A with A G Aᵀ = R Rᵀ: unit-variance latents, same nested row spans."""
    small = down @ gram @ down.T
    return torch.linalg.solve_triangular(damped_cholesky(small, 1e-10), down, upper=False)


def _error_by_rank(b, q, p, total, ranks) -> torch.Tensor:
    """Relative ‖W X − B_r A_r X_p‖² / ‖W X‖² for every r in `ranks`, from leading blocks.

    ‖WX − B A X_p‖² = ‖WX‖² − 2 tr(B A X_p Xᵀ Wᵀ) + tr(B A X_p X_pᵀ Aᵀ Bᵀ) = total − 2 Σ B∘Q + Σ (BᵀB)∘P.
    """
    cross = torch.cumsum((b * q).sum(0), 0)
    quad = torch.cumsum(torch.cumsum((b.T @ b) * p, 0), 1).diagonal()
    err = (total - 2 * cross + quad) / total.clamp_min(1e-30)
    return err[ranks - 1].clamp_min(0).float()


def cosine_from_grams(cross: torch.Tensor, gram_a: torch.Tensor, gram_b: torch.Tensor,
                      proj: torch.Tensor | None = None) -> float:
    """Frobenius cosine of P X_a and P X_b over all tokens, from X_a X_bᵀ and the two Grams (P = I if None)."""
    outer = None if proj is None else proj.T @ proj  # tr(P M Pᵀ) = Σ M ∘ PᵀP: one d × d product for all three

    def trace(m: torch.Tensor) -> torch.Tensor:
        return m.trace() if outer is None else (m * outer).sum()
    return float(trace(cross) / (trace(gram_a) * trace(gram_b)).sqrt().clamp_min(1e-30))


def value_output_metric(w_o: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Square root of the metric in which a value error matters: its effect after o_proj.

    Query head h reads KV head j = h // n_rep and its output passes through the columns W_o[:, h]; an error e
    in value head j therefore costs Σ_h ‖W_o[:, h] e‖² = eᵀ M_j e with M_j = Σ_h W_o[:, h]ᵀ W_o[:, h].
    Returns block-diagonal M^{1/2} (d_kv × d_kv).
    """
    d = w_o.shape[0]
    heads = w_o.view(d, -1, head_dim)  # [d, H, hd]
    n_rep = heads.shape[1] // num_kv_heads
    blocks = []
    for j in range(num_kv_heads):
        cols = heads[:, j * n_rep:(j + 1) * n_rep].reshape(d, -1, head_dim)
        metric = torch.einsum("dhe,dhf->ef", cols, cols)
        vals, vecs = torch.linalg.eigh(metric)
        blocks.append(vecs @ torch.diag(vals.clamp_min(vals.max() * 1e-8).sqrt()) @ vecs.T)
    return torch.block_diag(*blocks)


def key_score_metric(query_energy: torch.Tensor) -> torch.Tensor:
    """Square root of the metric in which a key error matters: the attention-score error it causes.

    `query_energy` [d_kv] is, per key channel, the mean square of the queries that read it (RoPE-averaged,
    calibrate.query_energy), so ‖diag(√energy) e‖² is the expected squared score error of a key error e.
    Returns that diagonal (d_kv × d_kv)."""
    energy = query_energy.double()
    return torch.diag(energy.clamp_min(float(energy.max()) * 1e-8).sqrt())


def balance_transform(w_k: torch.Tensor, w_v: torch.Tensor, value_metric: torch.Tensor | None,
                      gram: torch.Tensor, value_weight: float = 1.0,
                      key_metric: torch.Tensor | None = None) -> torch.Tensor:
    """Row transform T for [W_k; W_v]: each measured in its metric (None: as is), then scaled so that keys and
    values carry equal energy on calibration data.

    Without it the joint SVD spends the rank on whichever of K or V has larger numbers (usually keys), not on
    what the model needs. `value_weight` tilts the balance.
    """
    t_k = key_metric if key_metric is not None else torch.eye(w_k.shape[0], dtype=w_k.dtype)
    t_v = value_metric if value_metric is not None else torch.eye(w_v.shape[0], dtype=w_v.dtype)
    tk_wk, tv_wv = t_k.to(w_k.dtype) @ w_k, t_v @ w_v
    energy_k = ((tk_wk @ gram) * tk_wk).sum()
    energy_v = ((tv_wv @ gram) * tv_wv).sum()
    s_k = energy_k.clamp_min(1e-30).rsqrt()
    s_v = energy_v.clamp_min(1e-30).rsqrt() * value_weight**0.5
    return torch.block_diag(t_k.to(w_k.dtype) * s_k, t_v * s_v)
