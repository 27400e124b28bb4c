"""NVIDIA kvpress's presses on exactly the text and probes `commonkv eval` uses: a real peer at equal bytes.

kvpress 0.5.5 pins transformers < 5.3, below the range commonkv runs on, so it gets its own virtual
environment and this script has three verbs:

    python scripts/peer_kvpress.py setup /work/venv-kvpress            # torch==2.13.0 (CPU) + kvpress==0.5.5
    python scripts/peer_kvpress.py export inputs.json                  # commonkv's env: token windows + probes
    /work/venv-kvpress/bin/python scripts/peer_kvpress.py run inputs.json peers.json   # kvpress's env

`export` writes the compressed-context-perplexity windows (the first W·(C+E) essay tokens, as `commonkv eval
--tasks ctx-ppl` scores them) and the needle probes (`make_probes`, with where each question starts). `run`
imports kvpress and transformers only, never commonkv: per press and ratio it prefills each window's C tokens
under the press and scores the next E against the compressed cache; for the needle it prefills the context
under the press and only then feeds the question (question-agnostic, as `commonkv eval --ask-after`), and
decodes greedily. kvpress's `compression_ratio` is the share of cached tokens removed, so it is the share of
bytes removed at any dtype. ThinK zeroes key channels without freeing them (kvpress's own docstring), so it
runs composed with SnapKV and its rows state the nominal share, which no allocation realizes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

RATIOS = (0.5, 0.75, 0.875, 0.9375)
PRESSES = ("expected", "snapkv", "knorm", "snapkv+think")


def setup(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU wheel; kvpress would pull a CUDA build
    subprocess.run(pip + ["kvpress==0.5.5"], check=True)


def export(out: Path, model: str | None, ctx_len: int, eval_len: int, windows: int, context: int,
           depths: list[float]) -> None:
    from transformers import AutoTokenizer

    from commonkv_convert.evaluate.ppl import tokenize_text
    from commonkv_convert.evaluate.retrieval import make_probes
    from commonkv_convert.evaluate.text import essays_text
    from commonkv_convert.testing import smollm2_dir

    model = model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenize_text(tokenizer, essays_text(), windows * (ctx_len + eval_len))[0].tolist()
    probes = make_probes(tokenizer, "niah", context, len(depths), depths=tuple(depths))
    payload = {
        "model": model, "ctx_len": ctx_len, "eval_len": eval_len, "windows": windows, "context": context,
        "ctx_ppl_ids": ids,
        "needle": [{"depth": p.depth, "prompt": p.prompt.tolist(), "question_at": p.question_at,
                    "answers": list(p.answers), "max_new_tokens": p.max_new_tokens} for p in probes],
    }
    out.write_text(json.dumps(payload))
    print(f"wrote {out}: {windows} windows of {ctx_len}+{eval_len}, {len(probes)} needle probes at {context}")


def _press(name: str, ratio: float):
    from kvpress import ComposedPress, ExpectedAttentionPress, KnormPress, SnapKVPress, ThinKPress

    if name == "expected":
        return ExpectedAttentionPress(compression_ratio=ratio)
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio)
    if name == "knorm":
        return KnormPress(compression_ratio=ratio)
    if name == "snapkv+think":  # half the key channels zeroed: a quarter of the bytes, nominally
        return ComposedPress([SnapKVPress(compression_ratio=1 - (1 - ratio) / 0.75),
                              ThinKPress(key_channel_compression_ratio=0.5)])
    raise SystemExit(f"unknown press {name!r}; known: {', '.join(PRESSES)}")


def _prefill(model, ids, press):
    """Prefill `ids` [1, T] into a fresh cache, compressed by `press` (None: the full cache)."""
    import contextlib

    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits[:, -1:], cache


def _ctx_ppl(model, data: dict, press) -> float:
    import torch
    import torch.nn.functional as F

    c, e = data["ctx_len"], data["eval_len"]
    ids = torch.tensor(data["ctx_ppl_ids"]).reshape(data["windows"], c + e)
    positions = torch.arange(c, c + e).unsqueeze(0)
    nll = 0.0
    for row in ids:
        last, cache = _prefill(model, row[None, :c], press)
        out = model(input_ids=row[None, c:], past_key_values=cache, position_ids=positions, use_cache=True)
        logits = torch.cat([last, out.logits[:, :-1]], dim=1)
        nll += F.cross_entropy(logits[0].float(), row[c:], reduction="sum").item()
    return math.exp(nll / ids[:, c:].numel())


def _needle(model, tokenizer, data: dict, press) -> list[dict]:
    import torch

    rows = []
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for probe in data["needle"]:
        prompt, at = torch.tensor(probe["prompt"])[None], probe["question_at"]
        _, cache = _prefill(model, prompt[:, :at], press)
        out = model(input_ids=prompt[:, at:], past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(at, prompt.shape[1]).unsqueeze(0))
        tokens = [int(out.logits[0, -1].argmax())]
        for step in range(probe["max_new_tokens"] - 1):
            if tokens[-1] in stop:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                        position_ids=torch.tensor([[prompt.shape[1] + step]]))
            tokens.append(int(out.logits[0, -1].argmax()))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append({"depth": probe["depth"], "score": sum(a in text for a in probe["answers"]) / len(probe["answers"]),
                     "output": text.strip()})
    return rows


def run(inputs: Path, out: Path, presses: list[str], ratios: list[float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from importlib.metadata import version

    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    data = json.loads(inputs.read_text())
    model = AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    meta = {"kvpress": version("kvpress"), "transformers": version("transformers"), "torch": torch.__version__,
            **{k: data[k] for k in ("model", "ctx_len", "eval_len", "windows", "context")}}
    results = []
    for name, ratio in [("full", 0.0)] + [(p, r) for p in presses for r in ratios]:
        start = time.perf_counter()
        press = None if name == "full" else _press(name, ratio)
        ppl = _ctx_ppl(model, data, press)
        needle = _needle(model, tokenizer, data, press)
        row = {"press": name, "removed": ratio, "ctx_ppl": round(ppl, 3),
               "needle": sum(r["score"] for r in needle), "probes": len(needle), "needle_rows": needle,
               "seconds": round(time.perf_counter() - start, 1)}
        results.append(row)
        print(f"{name:14s} {ratio:7.4f}  ctx-ppl {ppl:8.3f}  needle {row['needle']:g}/{row['probes']}  "
              f"({row['seconds']:.0f} s)", flush=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")  # after each: partial runs count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    s = verbs.add_parser("setup", help="make kvpress's virtual environment")
    s.add_argument("venv", type=Path)
    e = verbs.add_parser("export", help="write the windows and probes (commonkv's environment)")
    e.add_argument("out", type=Path)
    e.add_argument("--model", help="model directory (default: the SmolLM2 built from its wheel)")
    e.add_argument("--ctx-len", type=int, default=1024)
    e.add_argument("--eval-len", type=int, default=128)
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--context", type=int, default=2048)
    e.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    r = verbs.add_parser("run", help="score kvpress's presses (kvpress's environment)")
    r.add_argument("inputs", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    r.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    args = parser.parse_args()
    if args.verb == "setup":
        setup(args.venv)
    elif args.verb == "export":
        export(args.out, args.model, args.ctx_len, args.eval_len, args.windows, args.context, args.depths)
    else:
        run(args.inputs, args.out, args.presses, args.ratios)


if __name__ == "__main__":
    main()
