"""PNG plots of evaluation results (matplotlib, from the `plot` extra; imported only when asked for)."""

from __future__ import annotations

from pathlib import Path

from ..plots import require_matplotlib

PPL_CLIP = 4.0  # quality-vs-ratio plots show perplexities up to this multiple of the full cache's


def plot_eval(result: dict, out_dir: Path) -> list[Path]:
    """memory.png (cache MiB vs context, with the full cache) and needle.png (accuracy by context × depth)."""
    plt = require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    tasks, name = result["tasks"], result["target"]["name"]
    if "memory" in tasks:
        plot_memory({name: tasks["memory"]["rows"]}, out_dir / "memory.png")
        written.append(out_dir / "memory.png")
    if "needle" in tasks:
        probes = tasks["needle"]["probes"]
        contexts = sorted({p["context"] for p in probes})
        depths = sorted({p["depth"] for p in probes})
        grid = [[next((p["score"] for p in probes if p["context"] == c and p["depth"] == d), float("nan"))
                 for c in contexts] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(contexts), 3.2))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"needle retrieval: {name}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "needle.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "needle.png")
    return written


def plot_memory(series: dict[str, list[dict]], path: Path) -> None:
    """Measured cache MiB vs context per target, and the full-precision full cache as a dashed line."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    full = None
    for name, rows in series.items():
        ax.plot([r["context"] for r in rows], [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=name)
        full = full or rows
    ax.plot([r["context"] for r in full], [r["full_cache_bytes"] / 2**20 for r in full], "k--", label="full cache")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache (MiB, measured)")
    _save(plt, fig, ax, path)


def plot_quality_vs_ratio(rows: list[dict], path: Path, metric: str = "ctx-ppl", full: float | None = None) -> None:
    """`metric` against the measured removed share of the cache, one line per method."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows if r["method"] != "full cache"})
    colors, markers = plt.cm.tab20.colors, "os^Dv<>ph*X"
    for i, method in enumerate(methods):
        points = sorted((r["removed"], r[metric]) for r in rows if r["method"] == method and r.get(metric) is not None)
        if points:
            ax.plot(*zip(*points), marker=markers[i % len(markers)], color=colors[(2 * i) % 20 + (i >= 10)],
                    label=method)
    if full is not None:
        ax.axhline(full, color="k", linestyle="--", label="full cache")
    ax.set_xlabel("share of the KV cache removed (measured bytes)")
    ax.set_ylabel(metric)
    if metric.endswith("ppl"):
        ax.set_yscale("log")
        if full is not None:  # a broken method (ppl in the thousands) would flatten every other line
            ax.set_ylim(0.95 * full, PPL_CLIP * full)
            ax.set_title(f"values above {PPL_CLIP:g}× the full cache are off the chart (see the table)", fontsize=8)
    _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: Path) -> None:
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
