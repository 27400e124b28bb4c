"""The comparison in one run: methods × ratios on SmolLM2-135M, same data, measured bytes.

    python scripts/benchmark.py            # fast: FAST_METHODS at FAST_RATIOS -> docs/results_fast.md
    python scripts/benchmark.py --full     # every method at 0.3 0.5 0.7 0.8 -> docs/results.md
    python scripts/benchmark.py [--ratios ...] [--methods ...] [--out FILE]

Writes OUT (tables), OUT with .json (every number) and OUT's stem/*.png (quality vs the measured share of the
cache removed; cache bytes vs context). Both modes evaluate every target the same way, so a fast row equals
the full table's row for the same method and ratio; the run time of each is in docs/results.md. Each method is
a `Method` in METHODS:

- a conversion: `analysis` holds the ConvertOptions fields that fix calibration and factorization, `budget`
  the per-method budget fields; methods with the same `analysis` share one calibration
  (`convert_sweep`), so a ratio sweep costs one analysis plus one write per checkpoint;
- a run-time baseline on the stock model: `baseline` (e.g. "average", MiniCache-style);
- `kv_cache`: run-time cache options passed to the loader of a converted checkpoint.

Tasks per target: compressed-context perplexity (essays, C=512, E=128, 8 windows), needle retrieval at
2048 tokens (3 depths), RULER-style probes at 1024 tokens, cache bytes at 256 and 1024 tokens. Calibration: the
bundled prompts (HotpotQA-derived), which never overlap the essays.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from commonkv_convert.convert import convert_sweep
from commonkv_convert.evaluate.plots import plot_memory, plot_quality_vs_ratio
from commonkv_convert.evaluate.runner import EvalSettings, headline, run_eval
from commonkv_convert.evaluate.targets import load_target
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.smollm2 import smollm2_dir


@dataclass(frozen=True)
class Method:
    description: str
    analysis: dict | None = None  # ConvertOptions fields of the shared analysis (None: no conversion)
    budget: dict = field(default_factory=dict)  # ConvertOptions budget fields of this method
    baseline: str | None = None  # run-time baseline on the stock model
    kv_cache: dict = field(default_factory=dict)  # run-time cache options of the converted checkpoint


WHITENED = {"group_size": 4}
METHODS: dict[str, Method] = {
    "commonkv": Method("CommonKV: allocator over keep / per-layer / merged spans of ≤ 4 layers (the default)",
                       WHITENED),
    "per-layer": Method("per-layer activation-aware low-rank, ranks by the same allocator (Palu-style)", WHITENED,
                        {"group_size": 1}),
    "merged-uniform": Method("every pair of layers merged, one rank everywhere (the paper's code)", WHITENED,
                             {"group_size": 2, "allocator": "uniform"}),
    "per-layer-plain": Method("per-layer plain SVD of the weights (no whitening), same allocator",
                              {"group_size": 1, "plain_svd": True}),
    "commonkv-weighted": Method("CommonKV with the paper's weighted merge after prefill", {
        "group_size": 4, "merge": "weighted"}),
    "average": Method("adjacent layers' raw K/V averaged, deepest layers first (MiniCache-style)",
                      baseline="average"),
    "commonkv+q2": Method("CommonKV + 2-bit cache at run time (latents per channel, K per channel, V per token, "
                          "groups of 32, 32 recent tokens unquantized)", WHITENED, kv_cache={"bits": 2}),
    "commonkv+q2+evict": Method("CommonKV + 2-bit cache + SnapKV-style eviction after prefill to 128 context "
                                "tokens + a 32-token window per layer (the share removed grows with the prompt)",
                                WHITENED, kv_cache={"bits": 2, "budget": 128}),
    # KVSharer: one search for N = 0.8 · layers (threshold off, so every ratio is reached); each ratio's N sharers
    # are a prefix of it. Ratios above 0.8 are out of reach (a source cannot share).
    "kvsharer": Method("KVSharer: later layers reuse an earlier layer's whole K/V cache, pairs tried most "
                       "dissimilar first (the paper), N = ratio · layers", {
                           "method": "kvsharer", "share_threshold": -1.0, "ratio": 0.8}),
    "kvsharer-similar": Method("KVSharer's search with pairs tried most similar first (the control)", {
        "method": "kvsharer", "share_threshold": -1.0, "share_order": "similar-first", "ratio": 0.8}),
    "commonkv+kvsharer": Method("4 KVSharer layers (similar-first) + CommonKV over the others to reach the ratio", {
        **WHITENED, "method": "commonkv+kvsharer", "share_layers": 4, "share_order": "similar-first"}),
}


FAST_METHODS = ["commonkv", "per-layer", "merged-uniform", "per-layer-plain", "average"]
FAST_RATIOS = [0.5, 0.7]
FULL_RATIOS = [0.3, 0.5, 0.7, 0.8]


def settings() -> EvalSettings:
    """Sized for a 2-core CPU (~50 s of evaluation per target; all 11 methods × 4 ratios took 50 min there,
    `--methods` runs a subset): a 4k prefill of this model costs ~20 s, so the needle runs at 2048 tokens here;
    `commonkv eval DIR --tasks needle --context 4096` measures 4k."""
    return EvalSettings(contexts=(2048,), ctx_len=512, eval_len=128, windows=8, depths=(0.1, 0.5, 0.9), samples=1)


MEMORY_CONTEXTS = (256, 1024)


def evaluate(target, tasks_settings: EvalSettings) -> dict:
    quality = run_eval(target, ["ctx-ppl", "needle"], tasks_settings)
    ruler = run_eval(target, ["ruler"], EvalSettings(contexts=(1024,), samples=tasks_settings.samples))
    memory = run_eval(target, ["memory"], EvalSettings(contexts=MEMORY_CONTEXTS))
    quality["tasks"].update(ruler["tasks"], **memory["tasks"])
    quality["wall_time_s"] += ruler["wall_time_s"] + memory["wall_time_s"]
    return quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help=f"every method at {' '.join(map(str, FULL_RATIOS))} (~50 min on 2 cores) instead of "
                             f"{', '.join(FAST_METHODS)} at {' '.join(map(str, FAST_RATIOS))} (the default)")
    parser.add_argument("--ratios", type=float, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--out", type=Path, help="default: docs/results.md with --full, else docs/results_fast.md")
    parser.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=JSON",
                        help='more conversion methods as ConvertOptions fields, e.g. g2=\'{"group_size": 2}\'')
    args = parser.parse_args()
    args.ratios = args.ratios or (FULL_RATIOS if args.full else FAST_RATIOS)
    args.methods = args.methods or (list(METHODS) if args.full else list(FAST_METHODS))
    args.out = args.out or Path("docs/results.md" if args.full else "docs/results_fast.md")
    for spec in args.extra:
        name, _, fields = spec.partition("=")
        METHODS[name] = Method(f"extra: {fields}", json.loads(fields))
        args.methods.append(name)
    start = time.perf_counter()
    source = str(smollm2_dir())
    evals = settings()
    results: list[dict] = []

    def record(method: str, ratio: float, target, extra: dict | None = None) -> None:
        result = evaluate(target, evals)
        row = {"method": method, "ratio": ratio, **headline(result), **(extra or {}),
               "eval_s": result["wall_time_s"]}
        results.append({"row": row, "result": result})
        print(json.dumps(row), flush=True)

    record("full cache", 0.0, load_target(source, name="full cache"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="commonkv-bench-"))
    by_analysis: dict[str, list[str]] = {}
    for name in args.methods:
        method = METHODS[name]
        if method.baseline:
            for ratio in args.ratios:
                record(name, ratio, load_target(source, baseline=method.baseline, ratio=ratio, name=name))
        else:
            by_analysis.setdefault(json.dumps(method.analysis, sort_keys=True), []).append(name)
    for key, names in by_analysis.items():
        # methods that differ only in run-time options (quantization, eviction) evaluate one checkpoint
        variants: dict[str, ConvertOptions] = {}
        users: dict[str, list[tuple[str, float]]] = {}
        for name in names:
            for ratio in args.ratios:
                # max_kl: the broken baselines are the point of the table, so they are measured, not refused
                options = ConvertOptions(**{**json.loads(key), **METHODS[name].budget, "ratio": ratio,
                                            "max_kl": math.inf})
                dir_name = next((d for d, o in variants.items() if o == options), f"{name}-{ratio:g}")
                variants.setdefault(dir_name, options)
                users.setdefault(dir_name, []).append((name, ratio))
        t0 = time.perf_counter()
        converted = convert_sweep(source, ConvertOptions(**json.loads(key)), variants, workdir, overwrite=True)
        print(f"# analysis {key}: {len(variants)} checkpoints in {time.perf_counter() - t0:.0f} s", flush=True)
        for dir_name, result in converted.items():
            merged = sum(g["mode"] == "merged" for g in result.report["groups"])
            for name, ratio in users[dir_name]:
                target = load_target(str(result.out_dir), kv_cache=METHODS[name].kv_cache, name=name)
                record(name, ratio, target, {"merged_groups": merged, "write_s": result.report["wall_time_s"]})
                del target
            shutil.rmtree(result.out_dir)
    total = time.perf_counter() - start
    write_results(args, results, evals, total)


def write_results(args, results: list[dict], evals: EvalSettings, total: float) -> None:
    rows = [r["row"] for r in results]
    full = next(r for r in rows if r["method"] == "full cache")
    out = args.out
    figures = out.parent / out.stem
    figures.mkdir(parents=True, exist_ok=True)
    plot_quality_vs_ratio(rows, figures / "ctx_ppl_vs_removed.png", "ctx-ppl", full["ctx-ppl"])
    plot_quality_vs_ratio(rows, figures / "needle_vs_removed.png", "needle", full["needle"])
    series = {f"{r['row']['method']} {r['row']['ratio']:g}" if r["row"]["ratio"] else "measured, full cache":
              r["result"]["tasks"]["memory"]["rows"] for r in results
              if r["row"]["method"] in ("full cache", "commonkv")}
    plot_memory(series, figures / "memory_vs_context.png")
    out.with_suffix(".json").write_text(json.dumps([r["result"] | {"row": r["row"]} for r in results],
                                                        indent=1) + "\n")
    methods = "\n".join(f"- **{n}**: {m.description}" for n, m in METHODS.items() if n in args.methods)
    lines = [
        f"# Results: SmolLM2-135M-Instruct, {'every method at every ratio' if args.full else 'the fast subset'}",
        "",
        f"Produced by `{command(args)}` in "
        f"{total / 60:.1f} min on {torch.get_num_threads()} CPU threads (torch {torch.__version__}). "
        "Calibration: the bundled prompts; evaluation: Paul Graham essays (never in the calibration text).",
        "",
        *([f"`python scripts/benchmark.py` without `--full` runs {', '.join(FAST_METHODS)} at "
           f"{' and '.join(f'{r:g}' for r in FAST_RATIOS)} ({1 + len(FAST_METHODS) * len(FAST_RATIOS)} targets, the "
           "same protocol, so its rows equal these) into docs/results_fast.md, which states its own run time.", ""]
          if args.full else []),
        f"- **removed**: share of the KV cache removed, from the bytes a real cache held after a "
        f"{MEMORY_CONTEXTS[-1]}-token "
        "prefill, against the full fp32 cache.",
        f"- **ctx-ppl**: compressed-context perplexity: prefill {evals.ctx_len} tokens into the cache, score the "
        f"next {evals.eval_len}, {evals.windows} windows. Lower is better.",
        f"- **needle**: share of {len(evals.depths)} needles (depths {', '.join(f'{d:g}' for d in evals.depths)}) "
        f"retrieved at {evals.contexts[0]} tokens.",
        f"- **ruler**: mean recall over RULER-style probes at 1024 tokens (niah, multikey, multivalue, vt; "
        f"{evals.samples} each).",
        "",
        "Methods:",
        "",
        methods,
        "",
        "| method | ratio | removed | ctx-ppl | vs full | needle | ruler | merged groups |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["ratio"], list(METHODS).index(r["method"]) if r["method"] in METHODS else -1)):
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['removed']:.3f} | {r['ctx-ppl']:.2f} | "
                     f"{100 * (r['ctx-ppl'] / full['ctx-ppl'] - 1):+.1f}% | {r['needle']:.2f} | {r['ruler']:.2f} | "
                     f"{r.get('merged_groups', '-')} |")
    lines += ["", f"![ctx-ppl vs removed]({figures.name}/ctx_ppl_vs_removed.png)",
              f"![needle vs removed]({figures.name}/needle_vs_removed.png)",
              f"![memory vs context]({figures.name}/memory_vs_context.png)", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def command(args) -> str:
    """The command line that reproduces this run."""
    extra = [spec.partition("=")[0] for spec in args.extra]
    methods = [m for m in args.methods if m not in extra]
    parts = ["python scripts/benchmark.py"] + (["--full"] if args.full else [])
    if args.ratios != (FULL_RATIOS if args.full else FAST_RATIOS):
        parts += ["--ratios", *(f"{r:g}" for r in args.ratios)]
    if methods != [m for m in (METHODS if args.full else FAST_METHODS) if m not in extra]:
        parts += ["--methods", *methods]
    return " ".join(parts + ["--extra", *(shlex.quote(spec) for spec in args.extra)] if args.extra else parts)


if __name__ == "__main__":
    main()
