"""Decode speed on CPU: tokens/s at a long context, batch 1, converted checkpoint vs its source.

    python scripts/bench_decode.py CONVERTED_DIR [--source DIR] [--context 2048] [--new-tokens 64]

Prefills CONTEXT tokens of real text (Paul Graham essays), then times greedy decoding of NEW_TOKENS tokens
one at a time with the model's own cache. Prints a table and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from commonkv_convert.evaluate.ppl import tokenize_text
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.runtime import load_checkpoint


def decode_speed(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - start)
    nbytes = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
    return {"tokens_per_s": new_tokens / best, "cache_bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converted", type=Path)
    parser.add_argument("--source", type=Path, help="source model dir (default: the converted config's base_model.id)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    converted = load_checkpoint(args.converted, dtype=torch.float32)
    source_dir = args.source or Path(converted.config.commonkv["base_model"]["id"])
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    ids = tokenize_text(AutoTokenizer.from_pretrained(args.converted), essays_text(), args.context)
    rows = {}
    for name, model in (("source", source), ("converted", converted)):
        rows[name] = decode_speed(model, ids, args.new_tokens, args.repeats)
    ratio = rows["converted"]["tokens_per_s"] / rows["source"]["tokens_per_s"]
    print(f"context {ids.shape[1]}, batch 1, {args.new_tokens} new tokens, {args.threads} threads, best of {args.repeats}")
    print("| model | decode tok/s | cache MiB |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['cache_bytes'] / 2**20:.2f} |")
    print(f"converted / source decode speed: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"context": ids.shape[1], "rows": rows, "speed_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
