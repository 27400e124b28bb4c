"""Decode speed of converted checkpoints against their source model on CPU, with quality beside it: docs/speed.md.

    python scripts/speed_benchmark.py            # SmolLM2-135M and Qwen2.5-Coder-0.5B, ratios 0.5 0.75 and the
                                                 # planner's plans at 0.5 (PLANNER),
                                                 # batch 1 and 8, contexts 2048 and 8192 (28 min on 2 cores)
    python scripts/speed_benchmark.py --quick    # smoke test: SmolLM2, ratio 0.5, batch 1, 256 tokens (~2 min)

Writes OUT (default docs/speed.md) and OUT with .json (every number). The source model and each converted
checkpoint decode with caches filled directly with random content of the right shapes through the runtime's own
cache classes (`CommonKVCache`, transformers' `DynamicCache`): decode time does not depend on what the cache holds,
and prefilling 8k real tokens would take minutes per configuration on 2 cores. Per configuration the source and
the checkpoints are timed in turn, `--repeats` times in rotating order, each on a freshly filled cache; the speed
is reported as a ratio against the source measured in the same run, so load from other jobs affects both alike.
A second pass times the parts of a step (cache append, reading back quantized codes, key rebuild, RoPE,
attention, the value up-projection, the rest) by wrapping the runtime's functions, beside the prediction of `commonkv_convert/decode_cost.py`.
Quality: compressed-context perplexity (`commonkv eval --tasks ctx-ppl`, essays, C=512, E=128, 4 windows).
Checkpoints are converted once (`commonkv convert SRC OUT --ratio R`) and cached beside the source models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from commonkv_convert.architectures import CACHE_KWARG
from commonkv_convert.decode_cost import (
    PARTS,
    full_roles,
    layer_roles,
    relative_cost,
    shape_from_config,
    step_cost,
)
from commonkv_convert.demo import is_current
from commonkv_convert.real_models import REAL_MODELS, cache_root, real_model_dir
from commonkv_convert.validate import filled_cache
from commonkv_convert.runtime import modeling_commonkv as ckv
from commonkv_convert.runtime import quantization

MEASURED_PARTS = ("append", "dequant", "rebuild", "rope", "attention", "projections", "rest")


# ------------------------------------------------------------------------------------------------------------
# timing: random caches of the right shapes, decode steps, the parts of a step
# ------------------------------------------------------------------------------------------------------------
def fill_cache(model: PreTrainedModel, batch: int, tokens: int) -> Cache:
    """A cache holding `tokens` random tokens per sequence, built as a prefill would leave it.

    CommonKV checkpoints: the runtime's own cache, filled by `validate.filled_cache`. Stock models: a
    `DynamicCache` with K/V [B, h, T, hd] per layer."""
    config = model.config
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=model.dtype)

    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if isinstance(model, ckv.CommonKVForCausalLM):
        return filled_cache(config, batch, tokens, rand)
    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        cache.update(rand(batch, kv_heads, tokens, head_dim), rand(batch, kv_heads, tokens, head_dim), i)
    return cache


@torch.inference_mode()
def decode_steps(model: PreTrainedModel, cache: Cache, batch: int, steps: int) -> list[float]:
    """Seconds of each of `steps` one-token decode steps on `cache` (random token ids: the cost is the same)."""
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        times.append(time.perf_counter() - start)
    return times


def measure(models: dict[str, PreTrainedModel], batch: int, tokens: int, steps: int, repeats: int,
            warmup: int = 1) -> dict[str, list[float]]:
    """Per model, the step times of `repeats` rounds (rotating order), each on a fresh cache after `warmup`
    untimed steps: interleaved, so a change in machine load falls on every model alike."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            cache = fill_cache(models[name], batch, tokens)
            decode_steps(models[name], cache, batch, warmup)
            times[name] += decode_steps(models[name], cache, batch, steps)
            del cache
    return times


# Linear modules timed by name: latent layers' up-projections rebuild every cached token; the K/V-side projections
# of the new token (kept layers' k/v_proj, a group's shared down-projection) are what decode_cost calls projections.
LINEAR_PARTS = {"k_up": "rebuild", "v_up": "rebuild", "k_proj": "projections", "v_proj": "projections",
                "down": "projections"}


@contextmanager
def timed_parts(model: PreTrainedModel) -> Iterator[dict[str, float]]:
    """Seconds spent in each part of a step, accumulated while inside: cache appends, key rebuild (`k_up`, and
    `v_up` where values are rebuilt), RoPE tables and application, the attention function, the K/V-side
    projections (and the fused value up-projection). Wraps the runtime's module-level functions and methods and
    `nn.Linear.forward` of `model`'s K/V modules, restored on exit; CPU ops are synchronous, so wall time around
    a call is the op's time."""
    spent: dict[str, float] = defaultdict(float)

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start
        return wrapper

    linear_part = {id(m): LINEAR_PARTS[name.rsplit(".", 1)[-1]] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_PARTS}
    linear_forward = torch.nn.Linear.forward

    def timed_linear(self, x):
        part = linear_part.get(id(self))
        return linear_forward(self, x) if part is None else timed(part, linear_forward)(self, x)

    patches = [(DynamicLayer, "update", "append"), (ckv.LatentLayer, "update", "append"),
               (quantization.CompressedLatentLayer, "update", "dequant"),
               (quantization.CompressedKVLayer, "update", "dequant"),
               (ckv.WeightedLayer, "update", "append"), (ckv, "rope_at", "rope"), (ckv, "apply_rope", "rope"),
               (ckv, "matmul_attention", "attention"), (ckv.CommonKVAttention, "_up_project_values", "projections")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        for owner, name, part in patches:
            setattr(owner, name, timed(part, getattr(owner, name)))
        ALL_ATTENTION_FUNCTIONS["sdpa"] = timed("attention", sdpa)
        torch.nn.Linear.forward = timed_linear
        yield spent
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        torch.nn.Linear.forward = linear_forward


def breakdown(model: PreTrainedModel, batch: int, tokens: int, steps: int) -> dict[str, float]:
    """Measured milliseconds per step in each part (MEASURED_PARTS; "rest" is the step less the timed parts)."""
    cache = fill_cache(model, batch, tokens)
    decode_steps(model, cache, batch, 1)
    with timed_parts(model) as spent:
        total = sum(decode_steps(model, cache, batch, steps))
    parts = {p: 1000 * spent.get(p, 0.0) / steps for p in MEASURED_PARTS if p != "rest"}
    parts["rest"] = 1000 * total / steps - sum(parts.values())
    parts["step"] = 1000 * total / steps
    return parts


def machine_rates(seconds: float = 1.0) -> dict[str, float]:
    """This machine's fp32 GEMM multiply-adds/s and memory bytes/s (read + write of a copy into an existing
    buffer): the cost model's balance is their ratio. Also the rate of a copy into fresh memory (`clone`), which
    is what `torch.cat` pays: a new buffer each time, its pages faulted in on first touch."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    big = torch.randn(32 * 2**20)  # 128 MiB, far beyond the caches
    dst = torch.empty_like(big)
    rates = {}
    for name, work, fn in (("macs_per_s", 512 * 1024 * 1024, lambda: a @ b),
                           ("bytes_per_s", 2 * big.numel() * 4, lambda: dst.copy_(big)),
                           ("fresh_copy_bytes_per_s", 2 * big.numel() * 4, big.clone)):
        fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        rates[name] = n * work / (time.perf_counter() - start)
    rates["macs_per_byte"] = rates["macs_per_s"] / rates["bytes_per_s"]
    return rates


# ------------------------------------------------------------------------------------------------------------
# the models: built, converted once, evaluated
# ------------------------------------------------------------------------------------------------------------
# The planner's plans timed beside the default ones (`ratio R`): precision in the plan, and within a predicted
# decode step (`scripts/frontier.py` measures their quality at equal bytes)
PLANNER = {"plan": {"bits": "16,8,4,2", "context": 2048}, "plan-fast": {"bits": "16,8,4,2", "context": 2048},
           "plan-fast-lv": {"bits": "16,8,4,2", "context": 2048, "latent_values": True}}
# plan-fast's --max-decode-cost per model, chosen by measurement (`scripts/runtime_ab.py --undo decode-attention`
# on each plan, batch 1). Qwen: 1.05 (the fastest plan is predicted at 1.02) decodes at 0.94-1.01x / 1.08-1.16x the
# source at 2k / 8k, where 1.25 gave 0.77x / 0.83x. SmolLM2: no plan is predicted under 1.08, and the 1.1 plan
# (9 layers at 16 bits, 7 at 2) measured 0.93x / 0.90x against 1.25's 0.94x / 1.13x. decode_cost ranks them the other
# way: it prices a 16-bit layer's append as a plain copy, where `torch.cat` into fresh memory is ~3x slower.
FAST_LIMIT = {"smollm2": 1.25, "qwen25": 1.05}


def plan_fields(model: str, ratios: list[float], planner: bool) -> dict[str, dict]:
    """Name → ConvertOptions fields of every checkpoint timed: the default conversion at each ratio, and with
    `planner` the planner's plans at the lowest ratio."""
    out = {f"ratio {r:g}": {"ratio": r} for r in ratios}
    if planner:
        limits = {p: {"max_decode_cost": FAST_LIMIT[model]} for p in ("plan-fast", "plan-fast-lv")}
        out |= {f"{name} {min(ratios):g}": {"ratio": min(ratios), **fields, **limits.get(name, {})}
                for name, fields in PLANNER.items()}
    return out


def checkpoint_dirs(model: str, plans: dict[str, dict], log: Callable[[str], object] = print) -> dict[str, Path]:
    """The cached checkpoints of `model` for each plan (ConvertOptions fields), converting the missing ones in one
    sweep: one calibration and factorization, then one checkpoint per plan (`convert_sweep`: the plan fields are
    budget fields, so the analysis `commonkv convert SRC OUT --ratio R` would run is shared)."""
    from commonkv_convert.convert import convert_sweep
    from commonkv_convert.recipe import ConvertOptions

    source = real_model_dir(model, log=log)
    name = REAL_MODELS[model]
    dirs = {p: cache_root() / f"{name.subdir}-commonkv-{p.replace(' ', '-')}".replace("-ratio-", "-") for p in plans}
    wanted = {p: ConvertOptions(**fields, base_model=name.hub_id) for p, fields in plans.items()}
    missing = {dirs[p].name: options for p, options in wanted.items()
               if not is_current(dirs[p], options)}
    if missing:
        log(f"# converting {source} at {', '.join(missing)} (one analysis) ...")
        start = time.perf_counter()
        convert_sweep(str(source), ConvertOptions(base_model=name.hub_id), missing, cache_root(), overwrite=True)
        log(f"# converted in {time.perf_counter() - start:.0f} s")
    return dirs


def ctx_ppl(path: Path, windows: int) -> float:
    from commonkv_convert.evaluate.runner import EvalSettings, run_eval
    from commonkv_convert.evaluate.targets import load_target

    settings = EvalSettings(ctx_len=512, eval_len=128, windows=windows)
    return run_eval(load_target(str(path)), ["ctx-ppl"], settings)["tasks"]["ctx-ppl"]["ppl"]


def load(path: Path) -> PreTrainedModel:
    from commonkv_convert.evaluate.targets import load_target

    return load_target(str(path)).model.eval()


def predicted_ms(config: dict, batch: int, tokens: int, rates: dict[str, float]) -> dict[str, float]:
    """decode_cost's prediction of each part of a step, in ms on a machine with the measured rates."""
    shape = shape_from_config(config)
    block = config.get("commonkv")
    roles = layer_roles(shape.layers, block["groups"], block.get("sharing")) if block else full_roles(shape.layers)
    cost = step_cost(shape, roles, tokens, batch=batch)
    parts = {p: 1000 * (cost.macs[p] / rates["macs_per_s"] + cost.bytes[p] / rates["bytes_per_s"]) for p in PARTS}
    parts["step"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------------------------
# the run and its document
# ------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rates = machine_rates()
    print(f"# machine: {rates['macs_per_s'] / 1e9:.1f} GMAC/s fp32 GEMM, {rates['bytes_per_s'] / 1e9:.1f} GB/s copy, "
          f"{rates['fresh_copy_bytes_per_s'] / 1e9:.1f} GB/s copy into fresh memory", flush=True)
    results = {"command": command(args), "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "rates": rates, "models": {}}
    for name in args.models:
        source = real_model_dir(name, log=print)
        extra = {k: Path(v) for k, v in (e.split("=", 1) for e in args.extra)}  # already converted: time them too
        fields = plan_fields(name, args.ratios, not (args.quick or extra))
        paths = {"source": source, **checkpoint_dirs(name, fields), **extra}
        configs = {k: json.loads((p / "config.json").read_text()) for k, p in paths.items()}
        entry = {"hub_id": REAL_MODELS[name].hub_id, "paths": {k: str(p) for k, p in paths.items()}, "plans": {},
                 "speed": [], "breakdown": []}
        for key, path in paths.items():
            t0 = time.perf_counter()
            ppl = ctx_ppl(path, args.windows)
            block = configs[key].get("commonkv")
            entry["plans"][key] = {
                "ctx_ppl": ppl, "removed": block["ratio"]["achieved"] if block else 0.0,
                "options": " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                    for k, v in fields.get(key, {}).items()),
                "groups": [f"{g['mode']}{len(g['layers'])}" + (f"@{g['rank']}" if g.get("rank") else "")
                           for g in block["groups"]] if block else [],
            }
            print(f"# {name} {key}: ctx-ppl {ppl:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        models = {key: load(path) for key, path in paths.items()}
        for tokens in args.contexts:
            for batch in args.batches:
                times = measure(models, batch, tokens, args.steps, args.repeats)
                src = statistics.median(times["source"])
                for key in paths:
                    if key == "source":
                        continue
                    step = statistics.median(times[key])
                    shape = shape_from_config(configs[key])
                    block = configs[key]["commonkv"]
                    pred = relative_cost(shape, block["groups"], tokens, sharing=block.get("sharing"), batch=batch,
                                         macs_per_byte=rates["macs_per_byte"])
                    row = {"plan": key, "batch": batch, "context": tokens, "source_tok_s": batch / src,
                           "tok_s": batch / step, "speed_vs_source": src / step, "predicted_speed": pred.speed,
                           "source_steps_ms": [round(1000 * t, 2) for t in times["source"]],
                           "steps_ms": [round(1000 * t, 2) for t in times[key]]}
                    entry["speed"].append(row)
                    print(json.dumps({"model": name, **{k: v for k, v in row.items() if "steps" not in k}}),
                          flush=True)
        for tokens, batch in args.breakdown:
            for key, model in models.items():
                measured = breakdown(model, batch, tokens, args.breakdown_steps)
                entry["breakdown"].append({"plan": key, "batch": batch, "context": tokens, "measured_ms": measured,
                                           "predicted_ms": predicted_ms(configs[key], batch, tokens, rates)})
                print(f"# breakdown {name} {key} b{batch} T{tokens}: "
                      + ", ".join(f"{p} {v:.1f}" for p, v in measured.items()), flush=True)
        del models
        results["models"][name] = entry
    results["load_average"] = {"start": load_before, "end": os.getloadavg()}
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    return results


def write_markdown(results: dict, out: Path) -> None:
    rates = results["rates"]
    lines = [
        "# Decode speed on CPU: converted checkpoints against their source",
        "",
        (f"Produced by `{results['command']}` in {results['wall_time_s'] / 60:.1f} min "
        f"({results['cpus']} CPUs, {results['threads']} torch threads, torch {results['torch']}, fp32). "
        f"Machine rates measured in the same run: {rates['macs_per_s'] / 1e9:.1f} GMAC/s (fp32 GEMM), "
        f"{rates['bytes_per_s'] / 1e9:.1f} GB/s (memory copy into an existing buffer; "
        f"{rates['fresh_copy_bytes_per_s'] / 1e9:.1f} GB/s into fresh memory, as `torch.cat` does), so "
        f"{rates['macs_per_byte']:.1f} MACs per byte. "
        f"Load average {results['load_average']['start'][0]:.1f} at the start and "
        f"{results['load_average']['end'][0]:.1f} at the end (the benchmark itself keeps up to 2 threads busy; "
        "anything above that is other jobs on the same 2 cores). Absolute tok/s move with the load; the ratios "
        "compare source and checkpoint timed in turn in the same run, and are what to read."),
        "",
        ("Method: caches filled with random content of the right shapes through the runtime's own cache classes "
        "(decode time does not depend on the values), then one-token decode steps timed; each configuration "
        "interleaves source and checkpoints, each on a fresh cache after one warm-up step; medians of the steps. "
        "ctx-ppl: compressed-context perplexity on the essays (512 tokens cached, 128 scored, "
        f"{results.get('windows', 4)} windows; lower is better). **predicted**: `commonkv_convert/decode_cost.py` at "
        "the measured MACs-per-byte balance."),
        "",
    ]
    for entry in results["models"].values():
        plans = entry["plans"]
        lines += [f"## {entry['hub_id']}", "",
                  "| plan | `commonkv convert` options | cache removed | ctx-ppl | groups (mode + layers per group) |",
                  "|---|---|---|---|---|"]
        for key, p in plans.items():
            groups = _compact(p["groups"]) if p["groups"] else "full cache"
            options = f"`{p['options']}`" if p.get("options") else ""
            lines.append(f"| {key} | {options} | {p['removed']:.1%} | {p['ctx_ppl']:.2f} | {groups} |")
        lines += ["", "| plan | batch | context | source tok/s | checkpoint tok/s | **speed vs source** | predicted |",
                  "|---|---|---|---|---|---|---|"]
        for r in entry["speed"]:
            lines.append(f"| {r['plan']} | {r['batch']} | {r['context']} | {r['source_tok_s']:.2f} | {r['tok_s']:.2f} "
                         f"| **{r['speed_vs_source']:.2f}×** | {r['predicted_speed']:.2f}× |")
        lines += ["", ("Where a step's time goes (ms per step; measured by timing the runtime's functions, "
                  "predicted by decode_cost at the measured rates):"), "",
                  "| plan | batch | context | | " + " | ".join(MEASURED_PARTS) + " | step |",
                  "|---|---|---|---|" + "---|" * (len(MEASURED_PARTS) + 1)]
        for b in entry["breakdown"]:
            for kind in ("measured", "predicted"):
                ms = b[f"{kind}_ms"]
                lines.append(f"| {b['plan']} | {b['batch']} | {b['context']} | {kind} | "
                             + " | ".join(f"{ms[p]:.1f}" for p in MEASURED_PARTS) + f" | {ms['step']:.1f} |")
        lines.append("")
    lines += ["## Targets (issue 14) and where the time goes", ""] + _targets(results) + [""]
    lines += [("What is left: three parts of a latent layer's step grow with the context: the key rebuild (`k_up` "
               "over all T latents), RoPE over the T rebuilt keys, and attention over latent-wide values. A kept layer "
               "pays only its attention and its append (the source) or the read-back of its codes (quantized). So "
               "the plans that decode about as fast as the source keep most layers as quantized K/V "
               "(`--max-decode-cost`: plan-fast), where the read-back replaces the source's `torch.cat` append. "
               "With `--latent-values` (plan-fast-lv) a layer may instead keep its keys and store a latent of its "
               "values only: it rebuilds nothing, so it decodes like a kept layer at a cost in bytes between a kept "
               "layer's and a latent's."), ""]
    lines += [("Parts: **append**: the cache's own update (a `torch.cat` copy of everything held, for K/V and "
              "latents alike); **dequant**: a quantized layer's update, which reads every code back into the "
              "buffer the forward's layers share; **rebuild**: `k_up` over all cached latents (and `v_up` where values are "
              "rebuilt); **rope**: cos/sin at every cached position plus their application to every rebuilt key "
              "(and the new query); **attention**: the attention function (SDPA; a one-token step on a CPU: "
              "`matmul_attention`); **projections**: the K/V-side "
              "matmuls of the new token (kept layers' `k_proj`/`v_proj`, a group's `down`, the fused `B_v`); **rest**: everything "
              "else in the step (q/o projections, MLP, norms, lm_head, Python overhead)."), ""]
    out.write_text("\n".join(lines))


def _targets(results: dict) -> list[str]:
    """The issue's targets (ratio 0.5: ≥ 1.0× the source at 8k, ≥ 0.9× at 2k, batch 1) against this run, and the
    measured shares of the ratio-0.5 step at the longest context, batch 1, that account for the gap."""
    lines = []
    for entry in results["models"].values():
        for r in entry["speed"]:
            if r["plan"].endswith(" 0.5") and r["batch"] == 1 and r["context"] in (2048, 8192):
                goal = 1.0 if r["context"] == 8192 else 0.9
                verdict = "met" if r["speed_vs_source"] >= goal else "**missed**"
                lines.append(f"- {entry['hub_id']}, {r['plan']}, batch 1, {r['context']} tokens: "
                             f"{r['speed_vs_source']:.2f}× the source (target ≥ {goal}×): {verdict}.")
        for b in entry["breakdown"]:
            if b["plan"].endswith(" 0.5") and b["batch"] == 1:
                ms, src = b["measured_ms"], next(x["measured_ms"] for x in entry["breakdown"]
                                                 if x["plan"] == "source" and x["batch"] == 1
                                                 and x["context"] == b["context"])
                shares = ", ".join(f"{p} {ms[p]:.0f} ms" for p in ("dequant", "rebuild", "rope", "attention"))
                lines.append(f"  {b['plan']}: at {b['context']} tokens a step takes {ms['step']:.0f} ms against the source's "
                             f"{src['step']:.0f} ms; {shares} (the source's attention: {src['attention']:.0f} ms).")
    return lines


def _compact(groups: list[str]) -> str:
    """["per_layer1@48", "merged2@192", ...] → "29 per_layer1, 1 merged3; ranks 48–224" (counts per kind)."""
    kinds: dict[str, int] = {}
    ranks = []
    for g in groups:
        kind, _, rank = g.partition("@")
        kinds[kind] = kinds.get(kind, 0) + 1
        ranks += [int(rank)] if rank else []
    text = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return text + (f"; ranks {min(ranks)}–{max(ranks)}" if ranks else "")


def command(args: argparse.Namespace) -> str:
    return "python scripts/speed_benchmark.py" + (" --quick" if args.quick else "") + "".join(
        f" {a}" for a in args.extra_argv)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: SmolLM2, ratio 0.5, batch 1, 256 tokens")
    parser.add_argument("--models", nargs="+", choices=list(REAL_MODELS))
    parser.add_argument("--ratios", type=float, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--steps", type=int, help="timed decode steps per round (default 3; --quick 2)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per configuration (default 3; --quick 1)")
    parser.add_argument("--windows", type=int, help="ctx-ppl essay windows (default 4; --quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", nargs="+", default=[], metavar="NAME=DIR",
                        help="converted checkpoints of the (one) model to time beside the ratio ones, instead of "
                             "converting the planner's plans")
    parser.add_argument("--out", type=Path, help="default docs/speed.md (--quick: docs/speed_quick.md)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite OUT from a run's saved JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.extra_argv = [shlex.quote(a) for a in argv if a != "--quick"]
    if "--render" in argv:  # the document names the command that measured it
        args.extra_argv = []
    quick = args.quick
    args.models = args.models or (["smollm2"] if quick else list(REAL_MODELS))
    args.ratios = args.ratios or ([0.5] if quick else [0.5, 0.75])
    args.batches = args.batches or ([1] if quick else [1, 8])
    args.contexts = args.contexts or ([256] if quick else [2048, 8192])
    args.steps = args.steps or (2 if quick else 3)
    args.breakdown_steps = 2
    args.repeats = args.repeats or (1 if quick else 3)
    args.windows = args.windows or (1 if quick else 4)
    args.breakdown = [(max(args.contexts), b) for b in args.batches]
    args.out = args.out or Path("docs/speed_quick.md" if quick else "docs/speed.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.render:
        write_markdown(json.loads(args.render.read_text()), args.out)
        return
    results = run(args)
    results["windows"] = args.windows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out)
    print(f"# wrote {args.out} and {args.out.with_suffix('.json')} in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
