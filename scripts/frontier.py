"""Quality per byte: the planner's plans against every simpler method at equal memory, on two real models.

    python scripts/frontier.py                       # run what is missing, then write docs/frontier.md + .png
    python scripts/frontier.py run --models smollm2  # one model (smollm2, qwen25)
    python scripts/frontier.py report                # the page from docs/frontier.json

Each checkpoint is removed once measured (`--keep` keeps them under the cache root, frontier-MODEL/).

For each model, one analysis (`convert_sweep`: calibration and factorization once) writes every plan:
- `plan`: the planner over rank, merging and precision (`--bits 16,8,4,2`), at 50, 75, 87.5 and 93.75% of the
  bytes of the full cache at 16 bits removed; `plan+evict`: the 50% plan with eviction on top to reach the
  same points;
- `plan-fast`: the planner within `--max-decode-cost` (at 0.5 the per-model limit `scripts/speed_benchmark.py`
  times, 1.5 at 0.75): what the speed constraint costs in quality; `plan-fast-lv`: the same with
  `--latent-values`;
- `latent`: CommonKV's latent alone (`--bits 16`); `lowrank`: per-layer low rank alone (`--group-size 1`);
- `quant`: the full cache quantized at run time (8, 4, 2 bits); `evict`: the full cache with SnapKV-style
  eviction at the same points;
- extra planner variants (`--bits 16,8` …) so the loss ranking below spans at least 12 plans;
- `plan-seq`: the plan with its factors refitted on the compressed model's own stream (`--refit sequential`);
  `plan-sym`: the same with the targets also taken from that stream (`--refit symmetric`);
- `plan-lean`: the planner with the lean quantization layout (`--quant-group 64 --residual 0`: half the scale
  bytes, no unquantized recent window; a third analysis, since each precision's error is measured at the group);
  `plan-lean-seq`, `plan-lean-query`: the same with `--refit sequential`, or from an analysis with
  `--key-metric query`; `plan-r0`: the default group with `--residual 0`; `quant4-lean`, `quant2-lean`,
  `quant2-r0`: quantization alone at those layouts (`full-lean`: the lean analysis's ratio-0 plan, the full cache);
  `-sink` rows: the same checkpoints with the first token of every stream kept exact at run time (`sink`);
  `plan-sink`, `plan-sink-seq`, `plan-sink-query`: the lean layout with that sink planned (`--quant-sink 1`: each
  precision's error measured with the first token exact, its bytes priced; a fifth and sixth analysis);
  `plan-sink-query-sym`: the last with `--refit symmetric`; `plan-tail`, `plan-tail-seq`, `plan-tail-query`: the
  plan-sink rows with `--latent-tail` (a latent's trailing channels at the next lower precision); `-clip`: the
  same with `--quant-clip` (each quantization group's range by least squared error; another analysis), and
  `quant4-lean-sink-clip`, `quant2-lean-sink-clip` quantization alone with it (run-time `clip`);
- `plan-query`, `latent-query`: the plan and the latent alone from a second analysis whose key error is the
  attention-score error it causes (`--key-metric query`); its predicted KL is ranked with the others';
  `plan-query-sym`: those plans with `--refit symmetric`; `latent-query-seq`: the latent alone with the query
  metric and `--refit sequential`; `latent-fw`, `latent-query-fw`: the latent alone with `--factor-weights kl`
  (each layer's keys and values weighted in the joint SVD by the slope of their measured KL curves);
- `kvpress`: NVIDIA kvpress's presses, where `scripts/peer_kvpress.py run` has written
  docs/frontier_kvpress_MODEL.json (in its own venv: kvpress pins transformers < 5.3). It runs in float32 and
  is compared with its own full-cache row; its share removed is the share of tokens evicted.

Every figure runs in bfloat16 on the CPU. Quality: compressed-context perplexity on the essays (C=1024 tokens
cached, the next 128 scored, 4 windows) and needle retrieval at 2048 tokens (5 depths), the question fed only
after the context was compressed (question-agnostic eviction). Bytes: `cache.nbytes()` after the prefill
against the full cache at 16 bits (`removed`). The planner's predicted loss (Σ of its groups' estimated
errors) is ranked against the measured ctx-ppl of every plan it wrote (Spearman).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_benchmark import FAST_LIMIT
from stack_sweep import PrefillBytes

from commonkv_convert.convert import convert_sweep
from commonkv_convert.errors import PlanError
from commonkv_convert.evaluate.runner import EvalSettings, run_eval
from commonkv_convert.evaluate.targets import load_target
from commonkv_convert.real_models import REAL_MODELS, cache_root, real_model_dir
from commonkv_convert.recipe import ConvertOptions, written_with

DTYPE = torch.bfloat16
POINTS = (0.5, 0.75, 0.875, 0.9375)  # fraction of the 16-bit full cache's bytes removed
CTX_PPL = EvalSettings(ctx_len=1024, eval_len=128, windows=4)
NEEDLE = EvalSettings(contexts=(2048,), depths=(0.1, 0.3, 0.5, 0.7, 0.9), ask_after=True)
OBSERVE = 32  # eviction's observation window (KVCacheOptions.observe), always kept
# --max-decode-cost of the plan-fast plans at 0.75 (at 0.5: speed_benchmark's FAST_LIMIT, the per-model limit
# whose plan measured as fast as the full cache)
FAST_AT_075 = 1.5
# the lean quantization layout (--quant-group, --residual): one float16 min and step per 64 values, no unquantized
# recent window, so 4-bit codes cost 4.5 bits per element instead of about 5.3 at C=1024
LEAN = {"quant_group": 64, "residual": 0}
SINK = 1  # attention-sink tokens kept unquantized (KVCacheOptions.sink) in the -sink and plan-sink rows


def plans(model: str) -> dict[str, dict]:
    """Checkpoint name → the ConvertOptions fields it varies (all sweep fields of one analysis). Quantized groups
    are priced at the context ctx-ppl caches (--context), so `removed` there is the ratio the plan states."""
    bits = {"bits": "16,8,4,2", "context": CTX_PPL.ctx_len}
    out = {"full": {"ratio": 0.0}}
    for p in POINTS:
        out[f"plan@{p:g}"] = {"ratio": p, **bits}
        out[f"latent@{p:g}"] = {"ratio": p}
        out[f"lowrank@{p:g}"] = {"ratio": p, "group_size": 1}
    fast = {0.5: FAST_LIMIT[model], 0.75: FAST_AT_075}
    for p in (0.5, 0.75):
        out[f"plan-8bit@{p:g}"] = {"ratio": p, "bits": "16,8", "context": CTX_PPL.ctx_len}
        out[f"plan-fast@{p:g}"] = {"ratio": p, **bits, "max_decode_cost": fast[p]}
    out["plan-fast-lv@0.5"] = {**out["plan-fast@0.5"], "latent_values": True}
    out["plan@0.625"] = {"ratio": 0.625, **bits}
    for p in POINTS[1:]:
        out[f"plan-seq@{p:g}"] = {"ratio": p, **bits, "refit": "sequential"}
        out[f"plan-sym@{p:g}"] = {"ratio": p, **bits, "refit": "symmetric"}
    for p in POINTS:  # a second analysis: key error measured as the attention-score error (--key-metric query)
        out[f"plan-query@{p:g}"] = {"ratio": p, **bits, "key_metric": "query"}
    for p in POINTS[1:]:
        out[f"plan-query-sym@{p:g}"] = {**out[f"plan-query@{p:g}"], "refit": "symmetric"}
    for p in POINTS[:2]:
        out[f"latent-query@{p:g}"] = {"ratio": p, "key_metric": "query"}
    out["latent-query-seq@0.5"] = {**out["latent-query@0.5"], "refit": "sequential"}
    for name in ("latent@0.5", "latent-query@0.5"):  # the joint SVD weighted by the KL curves: another analysis
        out[name.replace("@", "-fw@")] = {**out[name], "factor_weights": "kl"}
    out["plan-r0@0.875"] = {"ratio": 0.875, **bits, "residual": 0}
    # a third analysis, its errors measured at the lean layout; its ratio-0 plan is the full cache, for the
    # quantization baselines at the same layouts
    out["full-lean"] = {"ratio": 0.0, **LEAN}
    for p in POINTS[1:]:
        out[f"plan-lean@{p:g}"] = {"ratio": p, **bits, **LEAN}
    out["plan-lean-seq@0.875"] = {**out["plan-lean@0.875"], "refit": "sequential"}
    out["plan-lean-query@0.875"] = {**out["plan-lean@0.875"], "key_metric": "query"}  # a fourth analysis
    for p in POINTS[1:]:  # the sink planned: its errors measured with the first token exact (--quant-sink)
        out[f"plan-sink@{p:g}"] = {**out[f"plan-lean@{p:g}"], "quant_sink": SINK}
    out["plan-sink-seq@0.875"] = {**out["plan-sink@0.875"], "refit": "sequential"}
    out["plan-sink-query@0.875"] = {**out["plan-sink@0.875"], "key_metric": "query"}
    out["plan-sink-query-sym@0.875"] = {**out["plan-sink-query@0.875"], "refit": "symmetric"}
    for p in POINTS[1:]:  # latents' trailing channels at the next lower precision (--latent-tail): a plan field
        out[f"plan-tail@{p:g}"] = {**out[f"plan-sink@{p:g}"], "latent_tail": True}
    out["plan-tail-seq@0.875"] = {**out["plan-tail@0.875"], "refit": "sequential"}
    out["plan-tail-query@0.875"] = {**out["plan-sink-query@0.875"], "latent_tail": True}
    for p in POINTS[2:]:  # each quantization group's range by least squared error (--quant-clip): another analysis
        out[f"plan-tail-clip@{p:g}"] = {**out[f"plan-tail@{p:g}"], "quant_clip": True}
    out["plan-tail-query-clip@0.875"] = {**out["plan-tail-query@0.875"], "quant_clip": True}
    return out


def runs(model: str) -> dict[str, tuple[str, dict, float]]:
    """Configuration → (checkpoint, run-time kv_cache options, share of context tokens kept by eviction)."""
    out = {name: (name, {}, 1.0) for name in plans(model)}
    for bits in (8, 4, 2):
        out[f"quant{bits}"] = ("full", {"bits": bits}, 1.0)
    out["quant4-lean"] = ("full-lean", {"bits": 4, "group": LEAN["quant_group"], "residual": LEAN["residual"]}, 1.0)
    out["quant2-r0"] = ("full-lean", {"bits": 2, "residual": 0}, 1.0)
    out["quant2-lean"] = ("full-lean", {"bits": 2, "group": LEAN["quant_group"], "residual": LEAN["residual"]}, 1.0)
    # the first token of every stream kept exact, out of its group's range (run-time `sink`; the plans priced
    # and measured their groups without it)
    out["quant2-lean-sink"] = ("full-lean", {**out["quant2-lean"][1], "sink": SINK}, 1.0)
    for bits in (4, 2):  # quantization alone with the clipped ranges too (run-time `clip`), sink kept
        out[f"quant{bits}-lean-sink-clip"] = ("full-lean", {**out[f"quant{bits}-lean"][1], "sink": SINK, "clip": True},
                                              1.0)
    for name in ("plan-lean@0.875", "plan-lean-seq@0.875", "plan-lean-query@0.875"):
        out[name.replace("@", "-sink@")] = (name, {"sink": SINK}, 1.0)
    for p in POINTS:
        out[f"evict@{p:g}"] = ("full", {}, 1 - p)
    for p in POINTS[1:]:  # the 50% plan, then eviction keeps (1 − p) / 0.5 of the tokens
        out[f"plan+evict@{p:g}"] = ("plan@0.5", {}, (1 - p) / 0.5)
    return out


def checkpoints(model: str, needed: set[str], use: Callable[[str, Path], None]) -> None:
    """Hand `use` the model's checkpoint of each `needed` plan: cached ones first, then the missing ones, each as
    soon as the one analysis they share has written it (so `use` may remove it before the next takes disk)."""
    base = {"validate": False, "base_model": REAL_MODELS[model].hub_id}
    sweep = ConvertOptions.sweep_fields()
    by_analysis: dict[tuple, dict[str, ConvertOptions]] = {}  # plans differing in analysis fields: one sweep each
    for n, fields in plans(model).items():
        if n in needed:
            fixed = tuple(sorted((k, v) for k, v in fields.items() if k not in sweep))
            by_analysis.setdefault(fixed, {})[n] = ConvertOptions(**base, **fields)
    failed: dict[str, PlanError] = {}  # a speed limit may have no plan: its failure is printed
    for fixed, wanted in by_analysis.items():
        reuse_or_convert(model, ConvertOptions(**base, **dict(fixed)), wanted, cache_root() / f"frontier-{model}",
                         use, plan_errors=failed)
    for name, err in failed.items():
        print(f"# {model} {name}: {err}", flush=True)


def reuse_or_convert(model: str, base: ConvertOptions, wanted: dict[str, ConvertOptions], root: Path,
                     use: Callable[[str, Path], None], plan_errors: dict[str, PlanError] | None = None) -> None:
    """Hand `use` root/NAME for each wanted checkpoint: a cached one converted with the same options at once,
    the others as the one analysis (`base`) writes them (`convert_sweep`; `plan_errors` as there)."""
    missing = {n: o for n, o in wanted.items()  # a cached plan converted with other options is converted again
               if not ((root / n / "config.json").is_file() and written_with(root / n, o))}
    for name in set(wanted) - set(missing):
        use(name, root / name)
    if missing:
        print(f"# {model} {base.key_metric} keys: converting {len(missing)} plans (one analysis)", flush=True)
        convert_sweep(str(real_model_dir(model)), base, missing, root, overwrite=True, plan_errors=plan_errors,
                      on_written=lambda n, result: use(n, result.out_dir))


def predicted_loss(config: dict) -> float | None:
    """The planner's loss of a written plan: Σ over groups of what it minimized (`est_loss`; checkpoints written
    before it was recorded: layers × (key + value error estimates), the unweighted loss)."""
    block = config.get("commonkv")
    if not block:
        return None
    def unweighted(g: dict) -> float:
        return len(g["layers"]) * (g["est_error"]["key"] + g["est_error"]["value"])
    return sum(g.get("est_loss", unweighted(g)) for g in block["groups"] if "est_error" in g)


def loss_kind(config: dict) -> str:
    """"predicted KL" where the planner weighed layers by their sensitivity (groups record est_loss), else
    "errors" (an unweighted sum): the two are not in the same units, so plans are ranked within a kind."""
    block = config.get("commonkv") or {}
    if block.get("options", {}).get("refit", "none") != "none":
        return "refitted"  # the loss estimated the factors before the refit: not ranked
    return "predicted KL" if any("est_loss" in g for g in block.get("groups", [])) else "errors"


def with_budget(options: dict, keep: float, context: int) -> dict:
    """Run-time options with eviction keeping `keep` of a `context`-token prompt (budget + observe tokens)."""
    if keep >= 1.0:
        return options
    return {**options, "budget": max(1, round(keep * context) - OBSERVE), "observe": OBSERVE}


def measure(path: Path, options: dict, keep: float, name: str) -> dict:
    """ctx-ppl and needle of one configuration, with the bytes each prefill left in the cache."""
    entry = {}
    for task, settings, context in (("ctx-ppl", CTX_PPL, CTX_PPL.ctx_len), ("needle", NEEDLE, NEEDLE.contexts[0])):
        target = load_target(str(path), dtype=DTYPE, kv_cache=with_budget(options, keep, context), name=name)
        per_token = target.model.config.full_kv_elements_per_token() * 2  # 16-bit full cache
        target.model = wrapped = PrefillBytes(target.model)
        result = run_eval(target, [task], settings)["tasks"][task]
        removed = [1 - b / (per_token * t) for b, t in zip(wrapped.bytes, wrapped.prompts)]
        if task == "ctx-ppl":
            entry.update(ctx_ppl=result["ppl"], removed=sum(removed) / len(removed))
        else:
            entry.update(needle=result["accuracy"], needle_removed=sum(removed) / len(removed),
                         needle_probes=[p["score"] for p in result["probes"]])
    return entry


def run(args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(args.threads)
    for model in args.models:
        done = results.setdefault(model, {})
        configurations = runs(model)
        order = args.only or list(configurations)  # --only also sets the order
        todo = {n: configurations[n] for n in order if n in configurations and n not in done}

        def use(ckpt: str, path: Path) -> None:
            """Measure every configuration that reads this checkpoint, then (without --keep) remove it."""
            config = json.loads((path / "config.json").read_text())
            for name, (_, options, keep) in ((n, c) for n, c in todo.items() if c[0] == ckpt):
                record(args, results, model, name, lambda: {
                    "checkpoint": ckpt, "kv_cache": options, "keep": keep,
                    "loss": predicted_loss(config) if keep >= 1 and not options else None,
                    "loss_kind": loss_kind(config), **measure(path, options, keep, name)})
            if not args.keep:
                shutil.rmtree(path)

        checkpoints(model, {ckpt for ckpt, _, _ in todo.values()}, use)


def record(args: argparse.Namespace, results: dict, model: str, name: str, measured: Callable[[], dict]) -> None:
    """Time `measured()`, store it as results[model][name] in the JSON at once (a long run keeps every figure it
    reached), and print it."""
    start = time.perf_counter()
    entry = measured()
    entry["seconds"] = round(time.perf_counter() - start, 1)
    results.setdefault(model, {})[name] = entry
    save(args.json, results, model)
    print(model, name, json.dumps({k: v for k, v in entry.items() if k != "needle_probes"}), flush=True)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=x.__getitem__)
        out = [0.0] * len(x)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def family(name: str) -> str:
    return name.split("@")[0] if "@" in name else name.rstrip("0123456789") or name


def report(args: argparse.Namespace, results: dict) -> None:
    lines = ["# Quality per byte: the planner against simpler methods at equal memory", "",
             "Produced by `python scripts/frontier.py` (see its docstring for the protocol). bf16 on CPU; "
             "ctx-ppl: essays, C=1024 cached, next 128 scored, 4 windows; needle: 2048 tokens, 5 depths, question "
             "asked after the context was compressed. `removed`: measured cache bytes after the prefill against "
             "the full cache at 16 bits.", ""]
    for model, entries in results.items():
        full = entries.get("full", {})
        lines += [f"## {model}", "", "| configuration | removed | ctx-ppl | vs full | needle | planner loss |",
                  "|---|---|---|---|---|---|"]
        rows = sorted(entries.items(), key=lambda kv: (kv[1]["removed"], kv[0]))
        for name, e in rows:
            rel = f"{100 * (e['ctx_ppl'] / full['ctx_ppl'] - 1):+.1f}%" if full else ""
            loss = f"{e['loss']:.3f}" if e.get("loss") is not None else ""
            lines.append(f"| {name} | {100 * e['removed']:.1f}% | {e['ctx_ppl']:.2f} | {rel} | "
                         f"{round(e['needle'] * len(e['needle_probes']))}/{len(e['needle_probes'])} | {loss} |")
        peers = args.json.parent / f"frontier_kvpress_{model}.json"
        rows = json.loads(peers.read_text())["results"] if peers.is_file() else []
        own = next((r for r in rows if r["press"] == "full"), None)
        for r in sorted(rows, key=lambda r: (r["removed"], r["press"])):
            rel = f"{100 * (r['ctx_ppl'] / own['ctx_ppl'] - 1):+.1f}% (fp32)" if own else ""
            lines.append(f"| kvpress {r['press']} | {100 * r['removed']:.1f}% | {r['ctx_ppl']:.2f} | {rel} | "
                         f"{r['needle']:g}/{r['probes']} | |")
        lines += verdicts(entries, rows)
        for kind in ("errors", "predicted KL"):
            ranked = [(e["loss"], e["ctx_ppl"]) for name, e in entries.items()  # the full cache's 0 is in any units
                      if e.get("loss") is not None and (e.get("loss_kind", "errors") == kind or name == "full")]
            if len(ranked) >= 3:
                rho = spearman([r[0] for r in ranked], [r[1] for r in ranked])
                lines += ["", f"Planner loss ({kind}) against measured ctx-ppl over {len(ranked)} plans: "
                              f"Spearman **{rho:.3f}**."]
        lines.append("")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"))


# the targets on the essays: bytes removed → largest ctx-ppl rise against the full cache (needle: the full's)
TARGETS = {0.5: 0.01, 0.75: 0.03, 0.875: 0.08}
PLANNER_ROWS = ("plan", "plan-seq", "plan-sym", "plan-fast", "plan-fast-lv", "plan-8bit", "plan-query",
                "plan-query-sym", "plan-r0", "plan-lean", "plan-lean-seq", "plan-lean-query", "plan-sink",
                "plan-sink-seq", "plan-sink-query", "plan-sink-query-sym", "plan-tail", "plan-tail-seq",
                "plan-tail-query", "plan-tail-clip", "plan-tail-query-clip")
SAME_BYTES = 0.002  # a row removing this much less still counts as equal memory (plans land on 50.1% for 50%)


def verdicts(entries: dict, peers: list[dict]) -> list[str]:
    """Each planner row at each point against every other method: Pareto-dominated (a row of another method
    removing at least as many bytes has ctx-ppl no higher against its own full cache and needle no lower, better
    in one) or not, and the issue's targets. kvpress rows count against their own float32 full cache."""
    full = entries.get("full")
    own_full = next((r for r in peers if r["press"] == "full"), None)
    if not full:
        return []
    # name → (removed, ctx-ppl rise against its full cache, needle share, needle shown as k/n)
    points = {name: (e["removed"], e["ctx_ppl"] / full["ctx_ppl"] - 1, e["needle"],
                     f"{round(e['needle'] * len(e['needle_probes']))}/{len(e['needle_probes'])}")
              for name, e in entries.items()}
    if own_full:
        points |= {f"kvpress {r['press']}@{r['removed']:g}":
                   (r["removed"], r["ctx_ppl"] / own_full["ctx_ppl"] - 1, r["needle"] / r["probes"],
                    f"{r['needle']:g}/{r['probes']}") for r in peers if r["press"] != "full"}
    lines = ["", "Each planner row against every other method: dominated where a row of another method removes at "
                 f"least as many bytes ({100 * SAME_BYTES:g} points of slack) with ctx-ppl no higher (against its "
                 "own full cache) and needle no lower, better in one. Targets: a ctx-ppl rise of at most "
                 + " / ".join(f"+{100 * t:g}%" for t in TARGETS.values()) + " at "
                 + " / ".join(f"{100 * p:g}%" for p in TARGETS) + " removed, with the full cache's needle score.",
             "", "| planner row | removed | vs full | needle | target | dominated by |", "|---|---|---|---|---|---|"]
    for name, (removed, rise, needle, shown) in sorted(points.items(), key=lambda kv: (kv[1][0], kv[0])):
        if family(name) not in PLANNER_ROWS:
            continue
        point = float(name.split("@")[1])
        better = [other for other, (r, ri, ne, _) in points.items() if family(other) not in PLANNER_ROWS
                  and r >= removed - SAME_BYTES and ri <= rise and ne >= needle and (ri < rise or ne > needle)]
        target = "" if point not in TARGETS else (
            "met" if rise <= TARGETS[point] and needle >= full["needle"] else "missed")
        lines.append(f"| {name} | {100 * removed:.1f}% | {100 * rise:+.1f}% | {shown} | {target} | "
                     f"{', '.join(better) or 'not dominated'} |")
    return lines


def plot(results: dict, path: Path) -> None:
    """Bytes kept against ctx-ppl (relative to each method's own full cache) and needle, one row per model; the
    earlier sections (a key with a comma, such as plans before a default changed) stay in the tables only."""
    from commonkv_convert.plots import require_matplotlib

    plt = require_matplotlib()
    models = [m for m in results if "," not in m]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for row, model in enumerate(models):
        entries, groups = results[model], {}
        full = entries.get("full", {}).get("ctx_ppl")
        for name, e in entries.items():
            groups.setdefault(family(name), []).append((e["removed"], e["ctx_ppl"] / full, e["needle"]))
        peers = path.parent / f"frontier_kvpress_{model}.json"
        rows = json.loads(peers.read_text())["results"] if peers.is_file() else []
        own = next((r["ctx_ppl"] for r in rows if r["press"] == "full"), None)
        for r in rows:
            if r["press"] != "full" and own:
                groups.setdefault(f"kvpress {r['press']}", []).append(
                    (r["removed"], r["ctx_ppl"] / own, r["needle"] / r["probes"]))
        for col, label in enumerate(("ctx-ppl / full cache's (lower is better)", "needle accuracy")):
            ax = axes[row][col]
            for i, (fam, points) in enumerate(sorted(groups.items())):
                points.sort()
                ax.plot([100 * (1 - p[0]) for p in points], [p[1 + col] for p in points], marker="os^v"[i % 4],
                        color=colors[i % len(colors)], label=fam)
            ax.set_xlabel("% of the 16-bit full cache's bytes kept")
            ax.set_ylabel(label)
            ax.set_title(f"{model}: {label}")
            if col == 0:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parser_for(doc: str, name: str) -> argparse.ArgumentParser:
    """The arguments every run/report benchmark script of this kind takes; results in docs/NAME.json/.md."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("verb", nargs="?", choices=("run", "report"), default=None)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen25"], choices=list(REAL_MODELS))
    parser.add_argument("--json", type=Path, default=Path(f"docs/{name}.json"))
    parser.add_argument("--out", type=Path, default=Path(f"docs/{name}.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true",
                        help="keep each checkpoint once measured (each holds a full copy of the model's weights)")
    return parser


def dispatch(args: argparse.Namespace, run, report) -> None:
    """Run what is missing (verb run or none), then write the page (verb report or none)."""
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.verb in (None, "run"):
        run(args, results)
    if args.verb in (None, "report"):
        report(args, results)


def save(path: Path, results: dict, model: str) -> None:
    """Write `results[model]` into the JSON at `path`, re-read first: runs for other models may be writing it."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[model] = results[model]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    results.update(merged)


def main() -> None:
    parser = parser_for(__doc__, "frontier")
    parser.add_argument("--only", nargs="+", help="configurations to run (default: all that are missing)")
    dispatch(parser.parse_args(), run, report)


if __name__ == "__main__":
    main()
