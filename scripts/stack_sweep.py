"""The compression stack on SmolLM2-135M: CommonKV × cache quantization × SnapKV-style eviction, measured bytes.

    python scripts/stack_sweep.py axes                # per-channel vs per-token quantization error (latents, K, V)
    python scripts/stack_sweep.py values              # ctx-ppl with values per channel instead of per token
    python scripts/stack_sweep.py ppl [--only NAME…]  # compressed-context perplexity + measured cache bytes
    python scripts/stack_sweep.py needle [--only …]   # needle retrieval at 4096 tokens
    python scripts/stack_sweep.py report              # docs/stack.md table + docs/stack/*.png from the JSON

Checkpoints (ratio 0: every layer kept, the full cache; 0.5 and 0.75: CommonKV) are converted once into
--workdir. Every figure runs in bfloat16 (the dtype a deployment uses), so "removed" is measured against the
16-bit full cache: 1 − cache.nbytes() after a C-token prefill / (Σ_layers 2·h_kv·hd · 2 bytes · C).
Results go to --json (one entry per configuration; reruns skip what is there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from commonkv_convert.architectures import CACHE_KWARG, cache_of
from commonkv_convert.convert import convert
from commonkv_convert.evaluate.ppl import compressed_context_ppl, tokenize_text
from commonkv_convert.evaluate.runner import EvalSettings, run_eval
from commonkv_convert.evaluate.targets import load_target
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime.quantization import dequantize, quantize
from commonkv_convert.testing import smollm2_dir

DTYPE = torch.bfloat16
C, E, WINDOWS = 2048, 128, 4
RATIOS = (0.0, 0.5, 0.75)


def configs() -> dict[str, tuple[float, dict]]:
    """name → (conversion ratio, run-time options). 'full' is ratio 0 without options: the reference."""
    out: dict[str, tuple[float, dict]] = {}
    for ratio in RATIOS:
        tag = "full" if ratio == 0 else f"ckv{ratio:g}"
        out[tag] = (ratio, {})
        for bits in (8, 4, 2):
            out[f"{tag}+q{bits}"] = (ratio, {"bits": bits})
        for budget in (1024, 512, 256, 128):
            out[f"{tag}+e{budget}"] = (ratio, {"budget": budget})
        for bits, budget in ((4, 512), (2, 512), (2, 256), (2, 128), (4, 128), (4, 64), (2, 64)):
            out[f"{tag}+q{bits}+e{budget}"] = (ratio, {"bits": bits, "budget": budget})
        out[f"{tag}+q2r128"] = (ratio, {"bits": 2, "residual": 128})  # KIVI's longer fp window
        for bits, budget in ((None, 512), (None, 128), (4, 128)):  # one pick for all layers (scope=model)
            out[f"{tag}{f'+q{bits}' if bits else ''}+e{budget}m"] = (ratio, {"bits": bits, "budget": budget,
                                                                            "scope": "model"})
        out[f"{tag}+q4+e256"] = (ratio, {"bits": 4, "budget": 256})
        if ratio:
            for bits in (4, 2):
                out[f"{tag}+q{bits}token"] = (ratio, {"bits": bits, "latent_axis": "token"})
    return out


def checkpoint(workdir: Path, ratio: float) -> Path:
    out = workdir / f"smollm2-r{ratio:g}"
    if not (out / "config.json").is_file():
        convert(str(smollm2_dir()), out, ConvertOptions(ratio=ratio), overwrite=True)
    return out


class PrefillBytes(torch.nn.Module):
    """Wraps a model; records the prompt length and cache bytes after every prefill (a call without a cache)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.bytes, self.prompts = model, [], []

    @property
    def device(self):
        return self.inner.device

    @property
    def generation_config(self):
        return self.inner.generation_config

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        prefill = kwargs.get(CACHE_KWARG) is None
        out = self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        if prefill:
            self.bytes.append(cache_of(out).nbytes())
            self.prompts.append(input_ids.shape[1])
        return out


def load(path: Path, runtime: dict):
    return load_checkpoint(path, dtype=DTYPE, kv_cache=runtime)


def run_ppl(args, results: dict) -> None:
    ids = None
    for name in args.only or list(configs()):
        ratio, runtime = configs()[name]
        if "ctx-ppl" in results.get(name, {}):
            continue
        path = checkpoint(args.workdir, ratio)
        model = load(path, runtime)
        if ids is None:
            from transformers import AutoTokenizer

            ids = tokenize_text(AutoTokenizer.from_pretrained(path), essays_text(), WINDOWS * (C + E))
        t0 = time.perf_counter()
        wrapped = PrefillBytes(model)
        ppl = compressed_context_ppl(wrapped, ids, C, E, max_windows=WINDOWS)
        full_bytes = model.config.full_kv_elements_per_token() * DTYPE.itemsize * C
        assert len(set(wrapped.bytes)) == 1 and wrapped.bytes[0] == model.config.cache_bytes(C, DTYPE.itemsize)
        entry = {"ratio": ratio, "runtime": runtime, "ctx-ppl": ppl["ppl"], "nll": ppl["nll"], "tokens": ppl["tokens"],
                 "cache_bytes": wrapped.bytes[0], "full_cache_bytes": full_bytes,
                 "removed": 1 - wrapped.bytes[0] / full_bytes, "seconds": round(time.perf_counter() - t0, 1)}
        results.setdefault(name, {}).update(entry)
        save(args.json, results)
        print(name, json.dumps(entry), flush=True)


def run_needle(args, results: dict) -> None:
    settings = EvalSettings(contexts=(4096,), depths=tuple(args.depths), samples=1)
    for name in args.only or ["full", "full+q4", "full+q4+e512", "full+e512", "ckv0.5+q4", "full+q2", "full+q4+e128"]:
        if "needle" in results.get(name, {}):
            continue
        ratio, runtime = configs()[name]
        target = load_target(str(checkpoint(args.workdir, ratio)), dtype=DTYPE, kv_cache=runtime, name=name)
        per_token = target.model.config.full_kv_elements_per_token() * DTYPE.itemsize
        target.model = wrapped = PrefillBytes(target.model)
        t0 = time.perf_counter()
        result = run_eval(target, ["needle"], settings)["tasks"]["needle"]
        removed = [1 - b / (per_token * t) for b, t in zip(wrapped.bytes, wrapped.prompts)]
        results.setdefault(name, {"ratio": ratio, "runtime": runtime}).update(
            needle=result["accuracy"], needle_probes=[(p["depth"], p["score"]) for p in result["probes"]],
            needle_removed=sum(removed) / len(removed), needle_seconds=round(time.perf_counter() - t0, 1))
        save(args.json, results)
        print(name, "needle", result["accuracy"], flush=True)


@torch.inference_mode()
def run_axes(args, results: dict) -> None:
    """KIVI's measurement: relative error of what attention reads, quantizing per channel vs per token."""
    from transformers import AutoTokenizer

    out = {}
    for ratio in (0.0, 0.75):
        path = checkpoint(args.workdir, ratio)
        model = load_checkpoint(path, dtype=torch.float32)
        ids = tokenize_text(AutoTokenizer.from_pretrained(path), essays_text(), 1024)
        with torch.inference_mode():
            cache = cache_of(model(ids, use_cache=True))
        for bits in (4, 2):
            for axis in ("channel", "token"):
                errs = {"keys": [], "values": []}
                for i, layer in enumerate(cache.layers):
                    attn = model.model.layers[i].self_attn
                    if getattr(layer, "latent", None) is not None:  # compare what the up-projections rebuild
                        c = layer.latent
                        q = dequantize(*quantize(c, bits, 32, axis), bits, 32, axis, c.shape[-1], c.dtype)
                        pairs = {"keys": (attn.k_up(c), attn.k_up(q)), "values": (attn.v_up(c), attn.v_up(q))}
                    elif getattr(layer, "keys", None) is not None:
                        pairs = {}
                        for kind, x in (("keys", layer.keys), ("values", layer.values)):
                            pairs[kind] = (x, dequantize(*quantize(x, bits, 32, axis), bits, 32, axis, x.shape[-1],
                                                         x.dtype))
                    else:
                        continue
                    for kind, (ref, got) in pairs.items():
                        errs[kind].append(((got - ref).norm() / ref.norm()).item())
                for kind, values in errs.items():
                    key = f"{'full' if ratio == 0 else f'ckv{ratio:g}'} {kind} {bits}-bit {axis}"
                    out[key] = sum(values) / len(values)
                    print(key, round(out[key], 4), flush=True)
    results["_axes"] = out
    save(args.json, results)


def run_values(args, results: dict) -> None:
    """ctx-ppl of the full cache with values quantized per channel instead of per token (KIVI's choice)."""
    from transformers import AutoTokenizer

    from commonkv_convert.runtime import quantization

    path = checkpoint(args.workdir, 0.0)
    ids = tokenize_text(AutoTokenizer.from_pretrained(path), essays_text(), WINDOWS * (C + E))
    real = quantization.CompressedKVLayer.__init__

    def values_per_channel(self, *a, **k):
        real(self, *a, **k)
        self.streams[1].axis = "channel"

    quantization.CompressedKVLayer.__init__ = values_per_channel
    try:
        out = {f"full+q{bits} values per channel": compressed_context_ppl(load(path, {"bits": bits}), ids, C, E,
                                                                          max_windows=WINDOWS)["ppl"]
               for bits in (4, 2)}
    finally:
        quantization.CompressedKVLayer.__init__ = real
    print(out)
    results["_values_axis"] = out
    save(args.json, results)


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def report(args, results: dict) -> None:
    full = results["full"]["ctx-ppl"]
    rows = sorted(((n, r) for n, r in results.items() if "ctx-ppl" in r), key=lambda x: -x[1]["removed"])
    lines = [
        "# The compression stack on SmolLM2-135M-Instruct: CommonKV × quantization × eviction",
        "",
        "Produced by `scripts/stack_sweep.py` (axes, ppl, needle, report), bfloat16 on a shared 2-core CPU. "
        "Names: `full` = a ratio-0 conversion (every layer keeps K/V: the full cache), `ckvR` = CommonKV at ratio R; "
        "`+qB` = B-bit cache (`--kv-bits`), `token` = latents quantized per token instead of per channel, "
        "`r128` = 128 recent tokens unquantized (default 32); `+eN` = eviction to N context tokens + a 32-token "
        "window per layer after prefill (`--kv-budget`), `m` = one pick for all layers (`--kv-scope model`).",
        "",
        f"- **removed**: 1 − cache.nbytes() after the {C}-token prefill / the 16-bit full cache of {C} tokens "
        "(measured; the analytic `config.cache_bytes` agreed on every run).",
        f"- **ctx-ppl**: prefill {C} essay tokens, score the next {E} against the cache; {WINDOWS} windows.",
        "- **needle@4k**: share of 3 needles (depths 0.1, 0.5, 0.9) retrieved from a 4096-token prompt, and the "
        "share of the cache removed at that length (eviction keeps a fixed count, so it removes more at 4k).",
        "",
        "| configuration | removed (measured) | ctx-ppl | vs full | needle@4k (removed) |", "|---|---|---|---|---|"]
    for name, r in sorted(rows, key=lambda x: x[1]["removed"]):
        needle = "-"
        if "needle" in r:
            depths = {d: sc for d, sc in r["needle_probes"] if d in (0.1, 0.5, 0.9)}
            share = sum(depths.values()) / len(depths)
            needle = f"{share:.2f}" + (f" ({100 * r['needle_removed']:.1f}%)" if "needle_removed" in r else "")
        lines.append(f"| {name} | {100 * r['removed']:.1f}% | {r['ctx-ppl']:.2f} | "
                     f"{100 * (r['ctx-ppl'] / full - 1):+.1f}% | {needle} |")
    within = [(r["removed"], -r["ctx-ppl"], n) for n, r in rows if r["ctx-ppl"] <= 1.1 * full]
    best = max(within)[::2] if within else None
    lines.append("")
    lines.append(f"Largest measured compression within +10% ctx-ppl of the full cache ({full:.2f}): "
                 + (f"{100 * best[0]:.1f}% removed ({best[1]})." if best else "none."))
    if "_values_axis" in results:
        lines += ["", "Values per channel instead of per token (KIVI's choice), ctx-ppl: " + ", ".join(
            f"{k} {v:.2f}" for k, v in results["_values_axis"].items()) + "."]
    if "_axes" in results:
        lines += ["", "| quantization error (relative, mean over layers) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in results["_axes"].items()]
    if args.plot and args.out:
        lines += ["", f"![ctx-ppl vs removed]({args.plot.relative_to(args.out.parent).as_posix()})"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.plot:
        plot(rows, full, args.plot)


def plot(rows: list[tuple[str, dict]], full: float, path: Path) -> None:
    """ctx-ppl against the measured share removed: marker = conversion, colour = what runs on top of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full": "o", "ckv0.5": "s", "ckv0.75": "^"}
    colours = {"": "black", "quant": "tab:blue", "evict": "tab:orange", "quant+evict": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for name, r in rows:
        base, *opts = name.split("+")
        if any("token" in o or "r128" in o for o in opts):
            continue  # design variants, in the table only
        kind = "+".join(k for k, p in (("quant", "q"), ("evict", "e")) if any(o.startswith(p) for o in opts))
        label = f"{base} {kind or 'alone'}"
        ax.scatter(100 * r["removed"], r["ctx-ppl"], marker=markers[base], color=colours[kind],
                   label=None if label in seen else label)
        ax.annotate(name.removeprefix(base).lstrip("+"), (100 * r["removed"], r["ctx-ppl"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
        seen.add(label)
    ax.axhline(1.1 * full, color="grey", linestyle=":", label="full cache +10%")
    ax.set_xlabel("KV cache removed, % (measured bytes vs the 16-bit full cache)")
    ax.set_ylabel(f"compressed-context perplexity (C={C}, E={E})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["axes", "values", "ppl", "needle", "report"])
    parser.add_argument("--only", nargs="*", default=[], help="configuration names (see configs())")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "commonkv" / "stack")
    parser.add_argument("--json", type=Path, default=Path("docs/stack.json"))
    parser.add_argument("--plot", type=Path, default=None, help="report: write the ctx-ppl vs removed PNG here")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="needle depths")
    parser.add_argument("--out", type=Path, default=None, help="report: write the markdown table here")
    parser.add_argument("--also", nargs="*", type=Path, default=[], help="report: more result JSONs to merge in")
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for extra in args.also:
        for name, entry in json.loads(extra.read_text()).items():
            results.setdefault(name, {}).update(entry)
    {"axes": run_axes, "values": run_values, "ppl": run_ppl, "needle": run_needle,
     "report": report}[args.what](args, results)


if __name__ == "__main__":
    main()
