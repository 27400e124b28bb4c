"""KVSharer on SmolLM2-135M-Instruct: alone (dissimilar-first vs similar-first), and with CommonKV at equal memory.

    python scripts/kvsharer_sweep.py [--share 4 8] [--combined-ratio 0.5] [--windows 8] [--out table.md]

Protocol of scripts/benchmark.py (DESIGN §7): calibration on the bundled prompts, evaluation on the
Paul Graham essays (no overlap), prefill C=512 tokens into the model's own cache, score the next E=128, over
non-overlapping windows. Rows:
  kvsharer N (order)         N layers read an earlier layer's K/V (search threshold --threshold)
  commonkv R                 CommonKV alone at the ratio KVSharer N reaches (N / layers), and at --combined-ratio
  commonkv+kvsharer N (order, path)  N sharers plus CommonKV over the other layers, --combined-ratio in total, a
                             sharer reading a latent source through its refit up-projections (refit) or the keys
                             and values the source rebuilt (source)
"memory removed" is measured: 1 − cache bytes / full cache bytes of a real cache after the validation prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from commonkv_convert.convert import convert_sweep
from commonkv_convert.errors import PlanError
from commonkv_convert.evaluate.ppl import compressed_context_ppl, tokenize_text
from commonkv_convert.evaluate.runner import EvalSettings, headline, run_eval
from commonkv_convert.evaluate.targets import load_target
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.testing import smollm2_dir


def variants(args, layers: int) -> dict[str, dict]:
    out = {}
    for n in args.share:
        for order in args.orders:
            out[f"kvsharer N={n} ({order})"] = dict(method="kvsharer", share_layers=n, share_order=order,
                                                     share_threshold=args.threshold)
    for ratio in sorted({round(n / layers, 6) for n in args.share} | {args.combined_ratio}):
        out[f"commonkv R={ratio:g}"] = dict(ratio=ratio)
    for n in args.combined_share:
        for order in args.combined_orders:
            for path in args.paths:
                out[f"commonkv+kvsharer N={n} R={args.combined_ratio:g} ({order}, {path})"] = dict(
                    method="commonkv+kvsharer", share_layers=n, ratio=args.combined_ratio, share_latent=path,
                    share_order=order, share_threshold=args.threshold)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=int, nargs="+", default=[4, 8], help="KVSharer sharing layers N")
    parser.add_argument("--orders", nargs="+", default=["dissimilar-first", "similar-first"])
    parser.add_argument("--threshold", type=float, default=ConvertOptions.share_threshold)
    parser.add_argument("--combined-ratio", type=float, default=0.5)
    parser.add_argument("--combined-share", type=int, nargs="*", default=[4])
    parser.add_argument("--combined-orders", nargs="+", default=["dissimilar-first", "similar-first"])
    parser.add_argument("--paths", nargs="+", default=["refit", "source"])
    parser.add_argument("--only", nargs="*", help="run only the rows whose name contains one of these")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--eval-len", type=int, default=128)
    parser.add_argument("--needle", type=int, default=0, metavar="TOKENS",
                        help="also run the needle task (commonkv eval's) at this context length")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    source_dir = smollm2_dir()
    ids = tokenize_text(AutoTokenizer.from_pretrained(source_dir), essays_text(),
                        (args.context + args.eval_len) * args.windows)
    score = lambda model: compressed_context_ppl(model, ids, args.context, args.eval_len,  # noqa: E731
                                                 max_windows=args.windows)["ppl"]
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    layers = source.config.num_hidden_layers
    needle = lambda path: headline(run_eval(load_target(str(path)), ["needle"], EvalSettings(  # noqa: E731
        contexts=(args.needle,), depths=tuple(args.depths), samples=1)))["needle"] if args.needle else None
    rows = [{"variant": "full cache", "ppl": score(source), "measured_ratio": 0.0, "needle": needle(source_dir)}]
    print(json.dumps(rows[-1]), flush=True)
    del source
    chosen = {n: f for n, f in variants(args, layers).items() if not args.only or any(s in n for s in args.only)}
    analyses: dict[str, dict[str, dict]] = {}  # rows that differ only in ratio / latent path share one analysis
    for name, fields in chosen.items():
        key = json.dumps({k: v for k, v in fields.items() if k not in ("ratio", "share_latent")}, sort_keys=True)
        analyses.setdefault(key, {})[name] = fields
    for key, members in analyses.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            # max_kl: the paper's order breaks this model; that is measured here, not refused
            options = {name: ConvertOptions(**fields, max_kl=math.inf) for name, fields in members.items()}
            base = ConvertOptions(**{**json.loads(key), "ratio": max(o.ratio for o in options.values())})
            try:
                results = convert_sweep(str(source_dir), base, {f"v{i}": o for i, o in enumerate(options.values())},
                                        Path(tmp))
            except PlanError as error:  # e.g. the search found fewer than N sharings above the threshold
                print(json.dumps({"variants": list(members), "error": str(error)}), flush=True)
                continue
            seconds = time.perf_counter() - start
            for name, result in zip(options, results.values()):
                model = load_checkpoint(result.out_dir, dtype=torch.float32)
                report = result.report
                sharing = report.get("sharing", {})
                rows.append({
                    "variant": name, "ppl": score(model), "measured_ratio": report["validation"]["measured_ratio"],
                    "kl": report["validation"].get("kl_source_to_converted"),
                    "pairs": sharing.get("pairs"), "tried": sharing.get("tried"),
                    "last_cosine": next((t["cosine"] for t in reversed(sharing.get("trials", [])) if t["accepted"]),
                                        None),
                    "analysis_and_writes_s": round(seconds, 1),
                })
                del model
                rows[-1]["needle"] = needle(result.out_dir)
                print(json.dumps(rows[-1]), flush=True)
    full = rows[0]["ppl"]
    lines = [f"Compressed-context perplexity, SmolLM2-135M-Instruct, essays, C={args.context}, E={args.eval_len}, "
             f"{args.windows} windows; KVSharer threshold {args.threshold}.", "",
             "| variant | memory removed (measured) | ctx-ppl | vs full | needle | pairs sharer←source | search cosine |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pairs = " ".join(f"{s}←{j}" for s, j in r.get("pairs") or []) or "-"
        cosine = f"{r['last_cosine']:.3f}" if r.get("last_cosine") is not None else "-"
        found = f"{r['needle']:.2f}" if r.get("needle") is not None else "-"
        lines.append(f"| {r['variant']} | {r['measured_ratio']:.3f} | {r['ppl']:.2f} | "
                     f"{100 * (r['ppl'] / full - 1):+.1f}% | {found} | {pairs} | {cosine} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
