#!/usr/bin/env python3
"""Cache memory, peak memory and decode speed: a Llama-3-8B-shaped model, base vs commonkv, on CUDA in bf16.

What it does (a benchmark driver, not a test):

1. builds a random-init 4-layer Llama with Llama-3-8B shapes (hidden 4096, 32 heads, 8 KV heads, head_dim 128,
   intermediate 14336, vocab 128256, rope_theta 500000) as bf16 safetensors plus the byte tokenizer;
2. converts it at ratio 0.5 (group_size 2) in one sweep (one calibration and factorization) into the plans of
   `VARIANTS`: the default allocator, `allocator="uniform"` (every pair of layers merged into one latent), the
   planner over 16/8/4/2 bits, and the planner within `--max-decode-cost` with value-latent layers allowed; a
   plan the limit rules out is recorded as such;
3. for the base model (transformers, DynamicCache) and each converted model (`load_checkpoint`), at each batch
   size and context (8192 and 32768 random tokens, `logits_to_keep=1`): records the cache bytes (measured and
   analytic), the peak allocated memory during prefill and then the greedy decode speed of 128 tokens (tokens/s
   over the batch, and against the base at the same batch and context); before that it checks on a short prompt
   that the fused value path matches the explicit one in bf16 and records which SDPA backend each attention
   call dispatches to. A cell that runs out of memory is recorded as OOM;
4. prints a markdown table and writes everything to --out as JSON.

    PYTHONPATH=. python3 scripts/gpu_memory.py --out $OUT/gpu_memory.json          # the real run (CUDA)
    PYTHONPATH=. python scripts/gpu_memory.py --tiny --device cpu --out /tmp/gm.json  # smoke run, tiny shapes

The random weights make the plans' quality meaningless; only their memory and speed are measured here.
Conversion runs on the CPU and takes minutes at these shapes; to keep each device call short, convert first
into an ignored folder of the checkout (`--convert-only --workdir .cache/gpu_memory`), then measure with the
same `--workdir` in the next call while the machine is still warm. `--value-paths fused,explicit` also
measures the converted models with the explicit value path (B_v c, then attention at head_dim).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from commonkv_convert.architectures import CACHE_KWARG, cache_of
from commonkv_convert.checkpoint.format import REPORT_FILE
from commonkv_convert.convert import convert_sweep
from commonkv_convert.demo import is_current
from commonkv_convert.errors import PlanError
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime import modeling_commonkv
from commonkv_convert.runtime.modeling_commonkv import CommonKVCache
from commonkv_convert.testing import byte_tokenizer

LLAMA3_8B_SHAPES = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
    vocab_size=128256, num_hidden_layers=4, max_position_embeddings=65536,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
TINY_SHAPES = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
    vocab_size=1024, num_hidden_layers=4, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
MiB = 2**20
# The plans measured: ConvertOptions fields on top of ratio 0.5, group_size 2 and the calibration settings.
# `context` is filled in with the shortest measured context, where the planner prices the unquantized window.
VARIANTS = {
    "optimal": {},
    "uniform": {"allocator": "uniform"},
    "plan": {"bits": "16,8,4,2"},
    "plan-fast": {"bits": "16,8,4,2", "latent_values": True, "max_decode_cost": 1.0},
}


# ----------------------------------------------------------------------------------------------------------
# build and convert
# ----------------------------------------------------------------------------------------------------------
def build_base(out_dir: Path, shapes: dict, seed: int = 0) -> Path:
    """Random-init Llama saved as bf16 safetensors with the byte tokenizer (ids 0..257 < vocab)."""
    config = LlamaConfig(
        **shapes, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=256, pad_token_id=257,
        initializer_range=0.02,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    byte_tokenizer().save_pretrained(out_dir)
    del model
    gc.collect()
    return out_dir


def convert_variants(base: Path, work: Path, variants: dict[str, dict], reuse: bool) -> dict[str, dict]:
    """Convert `base` into work/commonkv-NAME for each variant in one sweep (reusing current checkpoints when
    `reuse`); return name -> plan and validation, or the error of a variant no plan meets."""
    wanted = {name: ConvertOptions(**fields) for name, fields in variants.items()}
    reused = {name for name, options in wanted.items() if reuse and is_current(work / f"commonkv-{name}", options)}
    missing = {f"commonkv-{name}": options for name, options in wanted.items() if name not in reused}
    failed: dict[str, PlanError] = {}
    start = time.perf_counter()
    if missing:
        first = next(iter(missing.values()))
        convert_sweep(str(base), first, missing, work, overwrite=True, plan_errors=failed)
    seconds = round(time.perf_counter() - start, 1)
    out = {}
    for name, fields in variants.items():
        error = failed.get(f"commonkv-{name}")
        if error is not None:
            out[name] = {"options": fields, "error": str(error)}
            continue
        report = json.loads((work / f"commonkv-{name}" / REPORT_FILE).read_text())
        out[name] = {
            "options": fields,
            "reused": name in reused,
            "sweep_seconds": None if name in reused else seconds,
            "plan": plan_of(report["groups"]),
            "ratio": report["ratio"],
            "kv_elements_per_token": report["kv_elements_per_token"],
            "validation": report.get("validation"),
        }
    return out


def plan_of(groups: list[dict]) -> list[dict]:
    return [{k: g[k] for k in ("layers", "mode", "rank", "elements", "bits") if k in g} for g in groups]


def plan_text(plan: list[dict]) -> str:
    parts = []
    for g in plan:
        layers = "-".join(str(l) for l in (g["layers"][0], g["layers"][-1])) if len(g["layers"]) > 1 \
            else str(g["layers"][0])
        bits = f" {g['bits']}b" if g.get("bits", 16) != 16 else ""
        parts.append((f"L{layers} keep" if g["mode"] == "keep" else f"L{layers} {g['mode']} r{g['rank']}") + bits)
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# SDPA backend recording
# ----------------------------------------------------------------------------------------------------------
PHASE = {"name": "prefill"}  # what the model is doing, for the SDPA records: prefill | decode


@contextlib.contextmanager
def phase(name: str):
    previous, PHASE["name"] = PHASE["name"], name
    try:
        yield
    finally:
        PHASE["name"] = previous


class SdpaRecorder:
    """Wraps F.scaled_dot_product_attention; records, per call pattern, the backend the dispatcher picks.

    A "v_broadcast_view" value is a stride-0 view over heads (no copy); otherwise SDPA got a materialized tensor.
    """

    def __init__(self) -> None:
        self.calls: dict[tuple, dict] = {}
        self._orig = None

    def __enter__(self):
        self._orig = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._wrapped
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._orig

    def _wrapped(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, **kw):
        pattern = (
            PHASE["name"], "one" if query.shape[-2] == 1 else "several",
            (query.shape[1], query.shape[-1]), (key.shape[1], key.shape[-1]), (value.shape[1], value.shape[-1]),
            value.shape[1] > 1 and value.stride(1) == 0, attn_mask is not None, bool(is_causal), bool(enable_gqa),
            str(query.dtype),
        )
        entry = self.calls.get(pattern)
        if entry is None:
            try:
                choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
                backend = torch.nn.attention.SDPBackend(choice).name
            except Exception as err:  # noqa: BLE001 - a private API: report, do not fail the benchmark
                backend = f"unknown ({type(err).__name__}: {str(err)[:80]})"
            fields = ("phase", "query_rows", "q_heads_dim", "k_heads_dim", "v_heads_dim", "v_broadcast_view",
                      "mask", "is_causal", "enable_gqa", "dtype")
            entry = self.calls[pattern] = {
                **{k: list(v) if isinstance(v, tuple) else v for k, v in zip(fields, pattern)},
                "backend": backend, "calls": 0,
            }
        entry["calls"] += 1
        return self._orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa, **kw)

    def summary(self) -> list[dict]:
        return list(self.calls.values())


def attention_kernels(model, ids: torch.Tensor) -> list[str]:
    """Names of the CUDA kernels of one prefill + one decode step that look like attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        with phase("decode"):
            model(input_ids=ids[:, -1:], **{CACHE_KWARG: cache_of(out)}, use_cache=True)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    hints = ("fmha", "flash", "attention", "attn", "cudnn", "cutlass", "softmax")
    return sorted(n[:160] for n in names if any(h in n.lower() for h in hints))


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def cache_bytes(cache) -> int:
    """CommonKVCache: bytes over unique storages; a stock cache: keys + values of every layer."""
    if isinstance(cache, CommonKVCache):
        return cache.nbytes()
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def analytic_bytes(model, tokens: int, elt: int, batch: int, prompt: int) -> int:
    """Converted: the runtime's own formula (`CommonKVConfig.cache_bytes`: per-group bits, weighted groups);
    base: 2 · n_kv · head_dim · layers per token."""
    cfg = model.config
    if isinstance(cfg, modeling_commonkv.CommonKVConfig):
        return cfg.cache_bytes(tokens, elt, prompt=prompt, batch=batch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_key_value_heads * head_dim * cfg.num_hidden_layers * tokens * elt * batch


def greedy_steps(model, token: torch.Tensor, cache, steps: int):
    with phase("decode"):
        for _ in range(steps):
            out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
            cache = cache_of(out)
            token = out.logits[:, -1:].argmax(-1)
    return token, cache


def random_ids(length: int, vocab: int, device: torch.device, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def measure_context(model, name: str, tokens: int, batch: int, args, device: torch.device,
                    weights: int | None) -> dict:
    row: dict = {"model": name, "tokens": tokens, "batch": batch}
    vocab = model.config.vocab_size
    ids = random_ids(tokens, vocab, device, seed=tokens, batch=batch)
    elt = torch.tensor([], dtype=args.torch_dtype).element_size()
    out = cache = token = None
    try:
        free(device)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(device)
        row["prefill_s"] = round(time.perf_counter() - t0, 4)
        row["prefill_tok_s"] = round(batch * tokens / row["prefill_s"], 1)
        pk = peak(device)
        cache = cache_of(out)
        row["cache_bytes"] = cache_bytes(cache)
        row["cache_bytes_analytic"] = analytic_bytes(model, tokens, elt, batch, tokens)
        row["cache_bytes_match"] = row["cache_bytes"] == row["cache_bytes_analytic"]
        row["peak_allocated_bytes"] = pk
        row["peak_over_weights_bytes"] = None if pk is None or weights is None else pk - weights
        token = out.logits[:, -1:].argmax(-1)
        del out
        out = None
        with torch.inference_mode():
            token, cache = greedy_steps(model, token, cache, args.decode_warmup)  # warm-up at this context
            free(device)
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            token, cache = greedy_steps(model, token, cache, args.decode_tokens)
            sync(device)
        dt = time.perf_counter() - t0
        row["decode_tokens"] = args.decode_tokens
        row["decode_s"] = round(dt, 4)
        row["decode_tok_s"] = round(batch * args.decode_tokens / dt, 2)
        row["decode_ms_per_token"] = round(1000 * dt / args.decode_tokens, 3)
        pk = peak(device)
        row["decode_peak_allocated_bytes"] = pk
        final = tokens + args.decode_warmup + args.decode_tokens
        row["cache_bytes_after_decode"] = cache_bytes(cache)
        row["cache_bytes_after_decode_match"] = (row["cache_bytes_after_decode"]
                                                 == analytic_bytes(model, final, elt, batch, tokens))
    except torch.OutOfMemoryError as err:
        row["error"] = f"OOM: {str(err).splitlines()[0][:200]}"
    finally:
        del out, cache, token
        free(device)
    return row


def fused_check(model, args, device: torch.device) -> dict:
    """Fused vs explicit value path on a short prompt (prefill logits and one decode step), both vs fp32."""
    cfg = model.config
    ids = random_ids(args.check_tokens, cfg.vocab_size, device, seed=1)

    def run(path: str, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        cfg.commonkv["value_path"] = path
        with torch.inference_mode(), phase(f"check-{tag}-prefill"):
            full = model(input_ids=ids).logits.float()
            out = model(input_ids=ids[:, :-1], use_cache=True)
            with phase(f"check-{tag}-decode"):
                step = model(input_ids=ids[:, -1:], **{CACHE_KWARG: cache_of(out)},
                             use_cache=True).logits.float()
        return full, step

    buffers = {name: buf.clone() for name, buf in model.named_buffers()}  # e.g. RoPE's fp32 inv_freq
    try:
        fused, explicit = run("fused", "fused"), run("explicit", "explicit")
        model.float()  # bf16 -> fp32 -> bf16 is exact for the weights: the reference costs no second load
        reference = run("explicit", "fp32-explicit")
    finally:
        cfg.commonkv["value_path"] = "fused"
        model.to(args.torch_dtype)
        for name, buf in buffers.items():  # .to(dtype) also cast the buffers: put them back as they were
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf
    free(device)
    result = {"tokens": args.check_tokens}
    for i, part in enumerate(("prefill", "decode_step")):
        f, e, r = fused[i], explicit[i], reference[i]
        scale = float(r.abs().max())
        result[part] = {
            "max_abs_fused_vs_explicit": float((f - e).abs().max()),
            "max_abs_fused_vs_fp32": float((f - r).abs().max()),
            "max_abs_explicit_vs_fp32": float((e - r).abs().max()),
            "max_abs_fp32_logit": scale,
            "top1_agree_fused_explicit": float((f.argmax(-1) == e.argmax(-1)).float().mean()),
        }
        # bf16 tolerance: the two bf16 paths differ by no more than either differs from fp32 (plus slack)
        bound = 2 * max(result[part]["max_abs_fused_vs_fp32"], result[part]["max_abs_explicit_vs_fp32"]) + 1e-3
        result[part]["within_bf16_tolerance"] = result[part]["max_abs_fused_vs_explicit"] <= bound
    return result


def bench_model(name: str, loader, args, device: torch.device, value_path: str | None = None) -> dict:
    free(device)
    base_alloc = allocated(device)
    t0 = time.perf_counter()
    model = loader()
    load_s = time.perf_counter() - t0
    converted = isinstance(model.config, modeling_commonkv.CommonKVConfig)
    if converted and value_path is not None:
        model.config.commonkv["value_path"] = value_path
    free(device)
    weights = allocated(device)
    entry: dict = {"model": name, "load_s": round(load_s, 1),
                   "weights_bytes": None if weights is None else weights - (base_alloc or 0),
                   "attn_implementation": model.config._attn_implementation, "rows": []}
    recorder = SdpaRecorder()
    with recorder:
        warm = random_ids(min(256, args.check_tokens), model.config.vocab_size, device, seed=2)
        with torch.inference_mode():
            out = model(input_ids=warm, use_cache=True, logits_to_keep=1)
            greedy_steps(model, out.logits[:, -1:].argmax(-1), cache_of(out), 8)
        sync(device)
        del out
        if converted and value_path in (None, "fused"):
            entry["fused_check"] = fused_check(model, args, device)
        if converted:
            entry["value_path"] = model.config.commonkv.get("value_path", "fused")
        if device.type == "cuda" and not args.no_profile:
            try:
                entry["attention_kernels"] = attention_kernels(model, warm)
            except Exception as err:  # noqa: BLE001 - profiling is a bonus
                entry["attention_kernels"] = [f"profiler failed: {type(err).__name__}: {err}"[:200]]
        for batch in args.batches:
            for tokens in args.tokens:
                row = measure_context(model, name, tokens, batch, args, device, weights)
                entry["rows"].append(row)
                print(f"  {name} @ {tokens} × {batch}: " + ", ".join(
                    f"{k}={v}" for k, v in row.items() if k not in ("model", "tokens", "batch")), flush=True)
    entry["sdpa_calls"] = recorder.summary()
    del model
    free(device)
    return entry


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
def mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MiB:,.1f}"


def markdown(results: dict) -> str:
    base = {(r["tokens"], r["batch"]): r for m in results["models"] if m["model"] == "base"
            for r in m["rows"] if "error" not in r}

    def against_base(r: dict, key: str) -> str:
        ref = base.get((r["tokens"], r["batch"]), {}).get(key)
        return f"{r[key] / ref:.3f}" if ref else "n/a"

    lines = [
        "| model | tokens | batch | cache MiB (measured) | cache MiB (analytic) | equal | bytes vs base | "
        "prefill peak MiB | peak − weights MiB | decode peak MiB | decode tok/s | tok/s vs base |",
        "|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results["models"]:
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {m['model']} | {r['tokens']} | {r['batch']} | {r['error']} |" + " |" * 8)
                continue
            lines.append(
                f"| {m['model']} | {r['tokens']} | {r['batch']} | {mib(r['cache_bytes'])} | "
                f"{mib(r['cache_bytes_analytic'])} | {'yes' if r['cache_bytes_match'] else 'NO'} | "
                f"{against_base(r, 'cache_bytes')} | {mib(r['peak_allocated_bytes'])} | "
                f"{mib(r['peak_over_weights_bytes'])} | {mib(r['decode_peak_allocated_bytes'])} | "
                f"{r['decode_tok_s']:.1f} | {against_base(r, 'decode_tok_s')} |")
    lines.append("")
    for name, conv in results["conversions"].items():
        if "error" in conv:
            lines.append(f"- plan `{name}` {conv['options']}: no plan ({conv['error']})")
            continue
        made = "reused from --workdir" if conv["reused"] else f"converted (whole sweep) in {conv['sweep_seconds']} s"
        lines.append(f"- plan `{name}` {conv['options']}: {plan_text(conv['plan'])}; achieved ratio "
                     f"{conv['ratio']['achieved']}, {conv['kv_elements_per_token']['converted']}/"
                     f"{conv['kv_elements_per_token']['full']} elements per token; {made}")
    for m in results["models"]:
        if "fused_check" in m:
            fc = m["fused_check"]
            lines.append(
                f"- fused vs explicit `{m['model']}` ({fc['tokens']} tokens): prefill max|Δ| "
                f"{fc['prefill']['max_abs_fused_vs_explicit']:.4g} (fused/explicit vs fp32 "
                f"{fc['prefill']['max_abs_fused_vs_fp32']:.4g}/{fc['prefill']['max_abs_explicit_vs_fp32']:.4g}, "
                f"|logit| ≤ {fc['prefill']['max_abs_fp32_logit']:.3g}), decode step max|Δ| "
                f"{fc['decode_step']['max_abs_fused_vs_explicit']:.4g}; within bf16 tolerance: "
                f"{fc['prefill']['within_bf16_tolerance'] and fc['decode_step']['within_bf16_tolerance']}")
        backends = sorted({
            f"{c['phase']}:{c['backend']} q{c['q_heads_dim']}·{c['query_rows']} k{c['k_heads_dim']} "
            f"v{c['v_heads_dim']}{' view' if c['v_broadcast_view'] else ''}{' gqa' if c['enable_gqa'] else ''}"
            f"{' mask' if c['mask'] else ''}{' causal' if c['is_causal'] else ''}"
            for c in m.get("sdpa_calls", []) if not c["phase"].startswith("check-")})
        lines.append(f"- SDPA dispatch `{m['model']}`: "
                     f"{', '.join(backends) or 'no SDPA call (every layer attends with matmul_attention)'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above 0, else argparse's one-line usage error."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, short contexts (smoke test, CPU-friendly)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=positive(int), nargs="+", default=None, help="prefill lengths (default 8192 32768)")
    p.add_argument("--batches", type=positive(int), nargs="+", default=None, help="batch sizes (default 1 8 32)")
    p.add_argument("--decode-tokens", type=positive(int), default=None, help="timed greedy decode steps (default 128)")
    p.add_argument("--decode-warmup", type=int, default=4, help="untimed decode steps before timing")
    p.add_argument("--check-tokens", type=positive(int), default=None, help="prompt length of the fused-vs-explicit check")
    p.add_argument("--samples", type=positive(int), default=None, help="calibration samples (default 16)")
    p.add_argument("--seq-len", type=positive(int), default=None, help="calibration sequence length (default 256)")
    p.add_argument("--models", default="base," + ",".join(VARIANTS),
                   help=f"comma list of base and the plans {', '.join(VARIANTS)}")
    p.add_argument("--max-decode-cost", type=positive(float), default=VARIANTS["plan-fast"]["max_decode_cost"],
                   help="plan-fast's decode-cost limit against the full cache")
    p.add_argument("--value-paths", default="fused",
                   help="comma list: value paths of the converted models to measure (fused, explicit)")
    p.add_argument("--convert-only", action="store_true",
                   help="build and convert into --workdir, measure nothing (split a long device run in two calls)")
    p.add_argument("--no-profile", action="store_true", help="skip the CUDA profiler pass (kernel names)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the base and converted models here and reuse them when present "
                        "(default: a temporary directory, removed at the end)")
    args = p.parse_args(argv)
    if args.convert_only and args.workdir is None:
        p.error("--convert-only needs --workdir (the models would be deleted at the end)")
    args.tokens = args.tokens or ([256, 1024] if args.tiny else [8192, 32768])
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8, 32])
    unknown = {m.strip() for m in args.models.split(",") if m.strip()} - {"base", *VARIANTS}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from base, {', '.join(VARIANTS)}")
    args.decode_tokens = args.decode_tokens or (16 if args.tiny else 128)
    args.check_tokens = args.check_tokens or (64 if args.tiny else 256)
    args.samples = args.samples or (8 if args.tiny else 16)
    args.seq_len = args.seq_len or (64 if args.tiny else 256)
    args.value_paths = [v.strip() for v in args.value_paths.split(",") if v.strip()]
    if set(args.value_paths) - {"fused", "explicit"}:
        p.error(f"--value-paths: unknown {sorted(set(args.value_paths) - {'fused', 'explicit'})}")
    args.torch_dtype = getattr(torch, args.dtype)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = TINY_SHAPES if args.tiny else LLAMA3_8B_SHAPES
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="commonkv-gpu-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "dtype": args.dtype,
        },
        "shapes": {k: v for k, v in shapes.items()},
        "settings": {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()},
        "conversions": {}, "models": [],
    }
    try:
        base = work / "base"
        t0 = time.perf_counter()
        if not (base / "config.json").is_file():
            build_base(base, shapes)
        results["build_s"] = round(time.perf_counter() - t0, 1)
        print(f"base model in {base} ({results['build_s']} s)", flush=True)
        common = dict(ratio=0.5, group_size=2, samples=args.samples, seq_len=args.seq_len, context=min(args.tokens))
        variants = {name: {**common, **fields} for name, fields in VARIANTS.items() if name in wanted}
        if "plan-fast" in variants:
            variants["plan-fast"]["max_decode_cost"] = args.max_decode_cost
        results["conversions"] = convert_variants(base, work, variants, reuse=args.workdir is not None)
        for name, conv in results["conversions"].items():
            print(f"converted {name}: " + (conv.get("error") or f"{plan_text(conv['plan'])} ratio {conv['ratio']}"),
                  flush=True)

        if args.convert_only:
            return results
        attn = "sdpa"
        if "base" in wanted:
            results["models"].append(bench_model("base", lambda: AutoModelForCausalLM.from_pretrained(
                base, dtype=args.torch_dtype, attn_implementation=attn).to(device).eval(), args, device))
        for name, conv in results["conversions"].items():
            if "error" in conv:
                continue
            path = work / f"commonkv-{name}"
            loader = lambda p=path: load_checkpoint(p, dtype=args.torch_dtype, device=str(device),  # noqa: E731
                                                    attn_implementation=attn)
            for value_path in args.value_paths:
                label = f"commonkv-{name}" + ("" if value_path == "fused" else f"[{value_path}]")
                results["models"].append(bench_model(label, loader, args, device, value_path))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    results["table"] = table
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
