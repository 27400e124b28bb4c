"""What each change to the latent itself buys: one analysis per factorization variant, the same plans measured.

    python scripts/factorization_ab.py                          # run what is missing, write docs/factorization.md
    python scripts/factorization_ab.py run --models smollm2 --variants plain-keys query-keys
    python scripts/factorization_ab.py run --models qwen25 --variants kl+sequential --plans latent@0.5
    python scripts/factorization_ab.py report                   # the page from docs/factorization.json

Each checkpoint is removed once measured (`--keep` keeps them under the cache root, factorization-MODEL/).

A variant is a set of analysis options (`VARIANTS`): they change calibration or factorization, so each needs
its own analysis (`convert_sweep`), from which the latent-only plans of `PLANS` are written (16-bit latents, no
quantization: the latent's own quality). Each plan is measured with scripts/frontier.py's protocol (bf16,
ctx-ppl C=1024 on the essays, needle at 2048 tokens asked after the context), against the full cache measured
in the same run, with the planner's predicted loss beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import dispatch, measure, parser_for, predicted_loss, record, reuse_or_convert

from commonkv_convert.real_models import REAL_MODELS, cache_root
from commonkv_convert.recipe import ConvertOptions

# variant → the options it sets (everything else at the defaults). Variants that differ only in sweep fields
# (budget-stage options such as layer_weights) share one analysis.
VARIANTS: dict[str, dict] = {
    "plain-keys": {"key_metric": "plain", "layer_weights": "uniform"},  # key error as is: relative ‖K − K̂‖²
    "query-keys": {"key_metric": "query", "layer_weights": "uniform"},  # key error as the score error it causes
    "kl-weights": {"key_metric": "plain", "layer_weights": "kl"},  # layers weighed by measured KL (sensitivity.py)
    "query+kl": {"key_metric": "query", "layer_weights": "kl"},
    # the kl-weights plans with their factors refitted once planned (refit.py)
    "kl+pooled": {"key_metric": "plain", "layer_weights": "kl", "refit": "pooled"},  # on all calibration tokens
    "kl+sequential": {"key_metric": "plain", "layer_weights": "kl", "refit": "sequential"},  # fed by the compressed
    "kl+symmetric": {"key_metric": "plain", "layer_weights": "kl", "refit": "symmetric"},  # targets from it too
    "query+kl+symmetric": {"key_metric": "query", "layer_weights": "kl", "refit": "symmetric"},
}
PLANS: dict[str, dict] = {
    "latent@0.5": {"ratio": 0.5},
    "latent@0.75": {"ratio": 0.75},
    "lowrank@0.5": {"ratio": 0.5, "group_size": 1},
}


def checkpoints(model: str, variants: list[str], plans: list[str], done: set[str],
                use: Callable[[str, Path], None]) -> None:
    """Hand `use` the checkpoint of each "variant/plan" (and "full") not yet measured (`done`): cached ones first
    (converted with the same options), the others as soon as written, one sweep per distinct analysis."""
    root = cache_root() / f"factorization-{model}"
    sweep = ConvertOptions.sweep_fields()
    base = {"validate": False, "base_model": REAL_MODELS[model].hub_id}
    by_analysis: dict[tuple, dict[str, dict]] = {}
    for variant in variants:
        fixed = {k: v for k, v in VARIANTS[variant].items() if k not in sweep}
        names = {f"{variant}/{plan}": {**PLANS[plan], **VARIANTS[variant]} for plan in plans}
        if variants.index(variant) == 0:
            names["full"] = {"ratio": 0.0, **VARIANTS[variant]}
        names = {n: fields for n, fields in names.items() if n not in done}
        by_analysis.setdefault(tuple(sorted(fixed.items())), {}).update(names)
    for fixed, names in by_analysis.items():
        wanted = {n: ConvertOptions(**base, **fields) for n, fields in names.items()}
        # the sensitivity stage runs only where a plan weighs layers by it (it costs about a calibration)
        weights = "kl" if any(o.layer_weights == "kl" for o in wanted.values()) else "uniform"
        reuse_or_convert(model, ConvertOptions(**base, **dict(fixed), layer_weights=weights), wanted, root, use)


def run(args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(args.threads)
    for model in args.models:
        done = results.setdefault(model, {})

        def use(key: str, path: Path) -> None:
            """Measure one checkpoint, then (without --keep) remove it."""
            variant, plan = key.split("/") if "/" in key else ("", key)
            record(args, results, model, key, lambda: {
                "variant": variant, "plan": plan, "options": VARIANTS.get(variant, {}),
                "loss": predicted_loss(json.loads((path / "config.json").read_text())),
                **measure(path, {}, 1.0, key)})
            if not args.keep:
                shutil.rmtree(path)

        checkpoints(model, args.variants, args.plans, set(done), use)


def report(args: argparse.Namespace, results: dict) -> None:
    lines = ["# The latent itself: what each factorization change buys", "",
             "Produced by `python scripts/factorization_ab.py` (see its docstring). Latent-only plans (16-bit, no "
             "quantization), bf16 on CPU; ctx-ppl: essays, C=1024 cached, next 128 scored, 4 windows; needle: 2048 "
             "tokens, 5 depths, asked after the context. `vs full`: against the full cache measured in the same run. "
             "`planner loss`: Σ over layers of the estimated key + value errors, each in its variant's own metric, "
             "so it compares plans within a variant, not across.", ""]
    for model, entries in results.items():
        full = entries.get("full")
        lines += [f"## {model}", "",
                  "| variant | options | plan | removed | ctx-ppl | vs full | needle | planner loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, e in sorted(entries.items(), key=lambda kv: (kv[1]["plan"], kv[0])):
            rel = f"{100 * (e['ctx_ppl'] / full['ctx_ppl'] - 1):+.1f}%" if full else ""
            options = ", ".join(f"{k}={v}" for k, v in e["options"].items()) if key != "full" else ""
            loss = f"{e['loss']:.3f}" if e.get("loss") else ""
            lines.append(f"| {e['variant'] if key != 'full' else 'full cache'} | {options} | {e['plan']} | "
                         f"{100 * e['removed']:.1f}% | {e['ctx_ppl']:.2f} | {rel} | "
                         f"{round(e['needle'] * len(e['needle_probes']))}/{len(e['needle_probes'])} | {loss} |")
        lines.append("")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def main() -> None:
    parser = parser_for(__doc__, "factorization")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    dispatch(parser.parse_args(), run, report)


if __name__ == "__main__":
    main()
