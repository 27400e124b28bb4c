"""`commonkv analyze`: look at a model before choosing a ratio — the CommonKV paper's observation, measured.

Runs the converter's own analysis (layer-by-layer calibration and the factorization of every span the
allocator could pick) and adds layer × layer views of it:

- **hidden / key / value**: token-mean cosine similarity between every pair of layers, on the same calibration
  tokens (hidden = residual stream entering the layer; key / value = raw `k_proj` / `v_proj` outputs).
- **latent**: for groups of `group_size` consecutive layers (the partition from layer 0), the cosine between
  layers' inputs projected onto the row space of the group's shared down-projection `A_g` — the exact `A_g` a
  conversion would write, at the rank a merged group gets at `ratio` — in an orthonormal basis of that space
  (as the paper's orthonormal `Vᵀ`). The converter stores latents in data-whitened coordinates (unit variance
  per component); cosines there weigh low-energy directions up and come out lower (SmolLM2, groups of 2,
  rank 192: 0.66 whitened vs 0.87 orthonormal), but the subspace, and so the information kept, is the same.
  Pairs in different groups share no projection: blank.

The suggestion comes from the same budget search `convert` runs: for every group size up to `group_size`
and a grid of ratios, the optimal plan's estimated held-out K/V error (relative, mean over layers). The
suggested group size is the smallest one within `GROUP_TOLERANCE` of the best error at the largest
ratio of the suggested range; the range runs from the largest ratio whose estimated error stays below
`ERROR_LOW` to the largest one below `ERROR_HIGH`. The thresholds come from one measured model: on
SmolLM2-135M-Instruct the compressed-context perplexity rose by about 8× the estimated error (error 0.0195 at
ratio 0.5 → +15.9% ctx-ppl; 0.075 at 0.7 → +62%; README "Results"), so 0.006 ≈ +5% and 0.02 ≈ +15% there.
Other models will map differently: the table of errors per ratio is in the JSON and the terminal summary, and
`commonkv eval` on a conversion is the real check.

A converted checkpoint's `commonkv_report.json` keeps adjacent-pair and per-group similarities only, so for
a converted directory the adjacent-pair view is drawn from its report, with no recalibration.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .analysis import Analysis
from .checkpoint.format import REPORT_FILE, group_elements
from .errors import PlanError, UserInputError
from .methods import analyze_source, method_for
from .progress import Reporter
from .recipe import ConvertOptions
from .resume import CandidateStore

KINDS = ("hidden", "key", "value", "latent")
RATIO_GRID = tuple(round(0.2 + 0.05 * i, 2) for i in range(15))  # 0.2, 0.25, ..., 0.9
ERROR_LOW = 0.006  # mean relative K/V error at the safe end of the suggested range (≈ +5% ctx-ppl on SmolLM2)
ERROR_HIGH = 0.02  # ... and at the aggressive end (≈ +15% on SmolLM2)
GROUP_TOLERANCE = 0.05  # a larger group size must lower the estimated error by more than 5% to be suggested
KEEP_TOKENS = 512  # tokens per layer kept for the layer × layer maps (evenly spaced over the calibration set)


def analyze(model: str, options: ConvertOptions, *, reporter: Reporter | None = None) -> dict:
    """Similarity maps, mergeable groups and a suggested group size / ratio range for `model` (JSON-able).

    `options` are conversion options (calibration, group size, ratio for the latent rank); a directory holding
    a converted checkpoint is read from its report instead.
    """
    local = Path(model)
    if (local / "config.json").is_file() and _is_converted(local):
        return from_report(local)
    from .checkpoint.reader import open_model

    reporter = reporter or Reporter()
    with open_model(model, revision=options.revision, allow_pickle=options.allow_pickle) as source:
        analysis = analyze_source(source, options, reporter, keep_tokens=KEEP_TOKENS)
        try:
            return summarize(analysis, options, source.model_id)
        finally:
            analysis.store.close()


def summarize(analysis: Analysis, options: ConvertOptions, model_id: str) -> dict:
    """Everything `analyze` reports, from a finished analysis whose candidates are still in their store."""
    facts, g = analysis.facts, options.group_size
    layers = facts.num_layers
    matrices = {kind: cosine_matrix([analysis.samples[l][kind] for l in range(layers)])
                for kind in ("hidden", "key", "value")}
    rank = latent_rank(options.ratio, g, facts.d_kv, options.rank_step, facts.hidden_size)
    matrices["latent"] = latent_matrix(analysis, g, rank)
    groups = sliding_groups(analysis, matrices, g, rank) if g > 1 else []
    table = error_table(analysis, options)
    return {
        "model": model_id,
        "source": "calibration",
        "layers": layers,
        "group_size": g,
        "latent_rank": rank,
        "ratio_for_rank": options.ratio,
        "tokens_per_layer": int(analysis.samples[0]["hidden"].shape[0]),
        "calibration": analysis.calibration,
        "matrices": {k: _rounded(m) for k, m in matrices.items()},
        "adjacent": adjacent_rows(matrices),
        "distance": distance_profile(matrices),
        "groups": groups,
        "errors": table,
        "suggestion": suggest(table),
    }


# ------------------------------------------------------------------------------------------------------------
# pure math
# ------------------------------------------------------------------------------------------------------------
def cosine_matrix(samples: list[torch.Tensor]) -> torch.Tensor:
    """[L, L] token-mean cosine similarity: entry (i, j) = mean_t cos(s_i[t], s_j[t])."""
    unit = torch.nn.functional.normalize(torch.stack([s.double() for s in samples]), dim=-1)  # [L, T, D]
    return torch.einsum("itd,jtd->ij", unit, unit) / unit.shape[1]


def latent_rank(ratio: float, group: int, d_kv: int, step: int, hidden: int) -> int:
    """Rank of a merged group of `group` layers that keeps (1 − ratio) of their K/V elements, on the rank grid."""
    rank = int((1 - ratio) * group_elements("keep", group, 0, d_kv)) // step * step
    return max(min(step, hidden), min(rank, hidden))


def latent_matrix(analysis: Analysis, group: int, rank: int) -> torch.Tensor:
    """Cosine of latents under each group's shared down-projection (NaN between groups)."""
    layers = analysis.facts.num_layers
    out = torch.full((layers, layers), math.nan, dtype=torch.float64)
    for start in range(0, layers, group):
        size = min(group, layers - start)
        span = list(range(start, start + size))
        cand = analysis.candidates.get((start, size))
        if cand is None:  # no latent of this span is narrower than its K/V: nothing to compare
            continue
        down, _ = CandidateStore.factors(cand, min(rank, int(cand.ranks[-1])))
        sims = cosine_matrix(project(analysis, span, down))
        out[start:start + size, start:start + size] = sims
    return out


def project(analysis: Analysis, layers: list[int], down: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention inputs in an orthonormal basis of the row space of `down` (the shared latent space)."""
    basis = torch.linalg.qr(down.T.double()).Q  # [d, r]
    return [analysis.samples[l]["input"].double() @ basis for l in layers]


def sliding_groups(analysis: Analysis, matrices: dict[str, torch.Tensor], group: int, rank: int) -> list[dict]:
    """Every span of `group` consecutive layers: mean similarity of each layer to the span's first layer (the
    anchor a merged group stores) for hidden / key / value / latent, and the merged group's estimated error."""
    rows = []
    for start in range(analysis.facts.num_layers - group + 1):
        cand = analysis.candidates.get((start, group))
        if cand is None:
            continue
        span = list(range(start, start + group))
        r = min(rank, int(cand.ranks[-1]))
        down, _ = CandidateStore.factors(cand, r)
        latents = cosine_matrix(project(analysis, span, down))
        row = {"layers": span, "rank": r}
        for kind in ("hidden", "key", "value"):
            row[kind] = round(float(matrices[kind][start, start + 1:start + group].mean()), 4)
        row["latent"] = round(float(latents[0, 1:].mean()), 4)
        errors = cand.error_at(r)
        row["key_error"] = round(sum(e[0] for e in errors.values()) / group, 5)
        row["value_error"] = round(sum(e[1] for e in errors.values()) / group, 5)
        rows.append(row)
    return rows


def adjacent_rows(matrices: dict[str, torch.Tensor]) -> list[dict]:
    """(l-1, l) rows of every map (latent only where both layers are in one group)."""
    layers = matrices["hidden"].shape[0]
    rows = []
    for l in range(1, layers):
        row = {"layers": [l - 1, l]}
        for kind, m in matrices.items():
            value = float(m[l, l - 1])
            if not math.isnan(value):
                row[kind] = round(value, 4)
        rows.append(row)
    return rows


def distance_profile(matrices: dict[str, torch.Tensor]) -> dict[str, list[float | None]]:
    """Mean similarity of layer pairs at distance 1, 2, ... (how fast layers stop looking alike)."""
    out = {}
    for kind, m in matrices.items():
        values = []
        for d in range(1, m.shape[0]):
            diag = m.diagonal(d)
            diag = diag[~diag.isnan()]
            values.append(round(float(diag.mean()), 4) if diag.numel() else None)
        out[kind] = values
    return out


def error_table(analysis: Analysis, options: ConvertOptions) -> list[dict]:
    """Estimated mean relative K/V error of the optimal plan per (group size, ratio), as `convert` would plan."""
    rows = []
    for size in range(1, options.group_size + 1):
        for ratio in RATIO_GRID:
            variant = dataclasses.replace(options, ratio=ratio, group_size=size)
            try:
                plan = method_for(variant).plan(analysis).plan
            except PlanError:
                rows.append({"group_size": size, "ratio": ratio, "error": None})
                continue
            errors = [e for opt in plan for e in opt.errors.values()]
            key = sum(e[0] for e in errors) / len(errors)
            value = sum(e[1] for e in errors) / len(errors)
            rows.append({"group_size": size, "ratio": ratio, "key_error": round(key, 5),
                         "value_error": round(value, 5), "error": round((key + value) / 2, 5),
                         "merged_groups": sum(o.mode == "merged" for o in plan)})
    return rows


def suggest(table: list[dict]) -> dict:
    """Suggested group size and ratio range from the error table (thresholds in the module docstring)."""
    sizes = sorted({r["group_size"] for r in table})

    def error(size: int, ratio: float) -> float:
        row = next(r for r in table if r["group_size"] == size and r["ratio"] == ratio)
        return math.inf if row["error"] is None else row["error"]

    def best_size(ratio: float) -> int:
        best = min(error(s, ratio) for s in sizes)
        return next(s for s in sizes if error(s, ratio) <= best * (1 + GROUP_TOLERANCE))

    def best_error(ratio: float) -> float:
        return min(error(s, ratio) for s in sizes)

    low = [r for r in RATIO_GRID if best_error(r) <= ERROR_LOW]
    high = [r for r in RATIO_GRID if best_error(r) <= ERROR_HIGH]
    top = max(high) if high else min(RATIO_GRID)
    size = best_size(top)
    return {
        "group_size": size,
        "ratio_low": max(low) if low else None,
        "ratio_high": max(high) if high else None,
        "error_at_low": None if not low else error(best_size(max(low)), max(low)),
        "error_at_high": None if not high else error(size, top),
        "rule": (f"ratio_low / ratio_high: largest ratio whose estimated mean K/V error stays ≤ {ERROR_LOW} / "
                 f"≤ {ERROR_HIGH}; group_size: smallest size within {GROUP_TOLERANCE:.0%} of the best error at "
                 "ratio_high"),
    }


# ------------------------------------------------------------------------------------------------------------
# converted checkpoints: read the report
# ------------------------------------------------------------------------------------------------------------
def _is_converted(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "commonkv"
    except (OSError, ValueError):
        return False


def from_report(path: Path) -> dict:
    """The adjacent-pair and group similarities a conversion measured, from its commonkv_report.json."""
    report_path = path / REPORT_FILE
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path} is a converted checkpoint without a readable {REPORT_FILE} ({err}). "
                             "To resolve, analyze the base model instead.") from None
    similarity = report.get("similarity", {})
    adjacent = similarity.get("adjacent", [])
    return {
        "model": str(path),
        "source": "report",
        "base_model": report.get("base_model", {}).get("id"),
        "layers": len({l for g in report.get("groups", []) for l in g["layers"]}),
        "adjacent": adjacent,
        "distance": {kind: [round(sum(r[kind] for r in adjacent if kind in r) /
                                  max(1, sum(kind in r for r in adjacent)), 4)]
                     for kind in KINDS if any(kind in r for r in adjacent)},
        "groups": similarity.get("groups", []),
        "plan": report.get("groups", []),
        "ratio": report.get("ratio"),
    }


def _rounded(m: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(v, 4) for v in row] for row in m.tolist()]


# ------------------------------------------------------------------------------------------------------------
# terminal summary
# ------------------------------------------------------------------------------------------------------------
def summary_tables(result: dict, top: int = 3) -> list:
    """Rich renderables: adjacent-layer means, most / least mergeable groups, error per ratio, suggestion."""
    from rich.table import Table
    from rich.text import Text

    views = []
    means = Table(title="Similarity of adjacent layers (mean cosine over pairs)")
    kinds = [k for k in KINDS if result.get("distance", {}).get(k)]
    for kind in kinds:
        means.add_column(kind, justify="right")
    means.add_row(*[f"{result['distance'][k][0]:.3f}" for k in kinds])
    views.append(means)
    groups = [g for g in result.get("groups", []) if g.get("latent") is not None]
    if groups and result["source"] == "calibration":
        ranked = sorted(groups, key=lambda g: g["latent"], reverse=True)
        for title, rows in (("Most mergeable", ranked[:top]), ("Least mergeable", ranked[::-1][:top])):
            table = Table(title=f"{title} groups of {result['group_size']} (similarity to the group's first layer; "
                                f"est. error merged at rank {result['latent_rank']})")
            for col in ("layers", "hidden", "key", "value", "latent", "key err", "value err"):
                table.add_column(col, justify="right")
            for g in rows:
                table.add_row(f"{g['layers'][0]}-{g['layers'][-1]}", *(f"{g[k]:.3f}" for k in KINDS),
                              f"{g['key_error']:.4f}", f"{g['value_error']:.4f}")
            views.append(table)
    elif groups:
        table = Table(title="Groups of the plan (latent similarity measured at conversion)")
        table.add_column("layers")
        table.add_column("latent", justify="right")
        for g in groups:
            table.add_row(",".join(map(str, g["layers"])), f"{g['latent']:.3f}")
        views.append(table)
    if result.get("errors"):
        sizes = sorted({r["group_size"] for r in result["errors"]})
        table = Table(title="Estimated mean relative K/V error of the plan `convert` would choose")
        table.add_column("ratio", justify="right")
        for size in sizes:
            table.add_column(f"group ≤ {size}", justify="right")
        for ratio in RATIO_GRID:
            cells = []
            for size in sizes:
                row = next(r for r in result["errors"] if r["group_size"] == size and r["ratio"] == ratio)
                cells.append("no plan" if row["error"] is None else f"{row['error']:.4f}")
            table.add_row(f"{ratio:g}", *cells)
        views.append(table)
        s = result["suggestion"]
        if s["ratio_high"] is None:
            text = (f"Suggestion: no ratio in {RATIO_GRID[0]}–{RATIO_GRID[-1]} keeps the estimated error ≤ {ERROR_HIGH}; "
                    f"try a ratio below {RATIO_GRID[0]} or more calibration data.")
        else:
            low = f"below {RATIO_GRID[0]}" if s["ratio_low"] is None else f"{s['ratio_low']:g}"
            text = (f"Suggestion: --group-size {s['group_size']}, --ratio from {low} (est. error ≤ {ERROR_LOW}) "
                    f"to {s['ratio_high']:g} (≤ {ERROR_HIGH}). Rule: {s['rule']}.")
        views.append(Text(text))
    return views
