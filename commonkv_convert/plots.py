"""PNG figures for `commonkv analyze`. matplotlib is optional (the `plot` extra) and imported only here."""

from __future__ import annotations

from pathlib import Path

from .errors import UserInputError

TITLES = {
    "hidden": "hidden states",
    "key": "raw keys",
    "value": "raw values",
    "latent": "latents, shared down-projection",
}
COLORS = {"hidden": "tab:blue", "key": "tab:red", "value": "tab:orange", "latent": "tab:green"}


def require_matplotlib():
    """pyplot on the non-interactive Agg backend, or a one-line error naming the install command."""
    try:
        import matplotlib
    except ImportError:
        raise UserInputError('Plots need matplotlib, which is not installed. To resolve, run '
                             'pip install -e ".[plot]" (or pip install "commonkv[plot]"), or run without plots.') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_analysis(result: dict, out_dir: Path) -> list[Path]:
    """Write the figures for an `analyze` result; returns the paths written."""
    plt = require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "matrices" in result:
        for kind, matrix in result["matrices"].items():
            fig, ax = plt.subplots(figsize=(4.6, 3.9))
            _heatmap(fig, ax, matrix, _title(kind, result))
            written.append(_save(fig, out_dir / f"{kind}.png", plt))
        fig, axes = plt.subplots(2, 2, figsize=(9, 7.6))
        for ax, (kind, matrix) in zip(axes.flat, result["matrices"].items()):
            _heatmap(fig, ax, matrix, _title(kind, result))
        fig.suptitle(f"{Path(result['model']).name}: layer × layer cosine similarity", fontsize=11)
        written.append(_save(fig, out_dir / "similarity.png", plt))
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    _adjacent(ax, result)
    written.append(_save(fig, out_dir / "adjacent.png", plt))
    return written


def _title(kind: str, result: dict) -> str:
    if kind == "latent":
        return f"latents (groups of {result['group_size']}, rank {result['latent_rank']})"
    return TITLES[kind]


def _heatmap(fig, ax, matrix: list[list[float | None]], title: str) -> None:
    import numpy as np

    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float))
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["RdBu_r"].with_extremes(bad="#dddddd")  # grey: pairs that share no projection
    image = ax.imshow(data, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=8)


def _adjacent(ax, result: dict) -> None:
    rows = result["adjacent"]
    for kind in TITLES:
        points = [(r["layers"][1], r[kind]) for r in rows if r.get(kind) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=TITLES[kind], color=COLORS[kind])
    ax.axhline(0, color="#999999", linewidth=0.6)
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("layer l (compared with l − 1)", fontsize=9)
    ax.set_ylabel("cosine similarity", fontsize=9)
    source = "from the conversion report" if result.get("source") == "report" else "calibration tokens"
    ax.set_title(f"Adjacent layers, {source}", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="center right")


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path
