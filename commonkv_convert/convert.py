"""The conversion pipeline: load → analyze (the method: calibrate, factorize, plan) → write → validate.

This module only wires the stages together. The methods live in methods.py (CommonKV in commonkv.py, KVSharer
in kvsharer.py), their math in factorize/weighted/similarity/budget, and the file I/O in checkpoint/ and
resume.py. The writer only writes: every forward pass and fit happens before it opens.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .analysis import Analysis
from .architectures import ArchFacts, layer_types, source_view
from .calibrate import base_config
from .checkpoint.card import hub_base_model, render_card
from .checkpoint.format import (
    CARD_FILE,
    CONFIG_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    RUNTIME_DIR,
    RUNTIME_FILES,
    block_version,
    runtime_fields,
)
from .checkpoint.reader import SourceModel, open_model
from .checkpoint.writer import CheckpointWriter
from .errors import PlanError, UserInputError, ValidationError
from .memory import peak_rss_bytes, release_memory
from .methods import Method, analyze_source, method_for
from .progress import Reporter
from .recipe import ConvertOptions
from .resume import WorkDir
from .sensitivity import fit_curve
from .validate import validate_checkpoint


@dataclass
class ConversionResult:
    out_dir: Path | None
    analysis: Analysis
    report: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # dry runs: the config.json the checkpoint would have


def convert(model: str, out_dir: Path | None, options: ConvertOptions, *, reporter: Reporter | None = None,
            dry_run: bool = False, overwrite: bool = False, command: str = "") -> ConversionResult:
    """Convert `model` (local dir or Hub id) and write the checkpoint to `out_dir` (unless dry_run)."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    if not dry_run:
        if out_dir is None:
            raise UserInputError("No output directory given. To resolve, pass OUT_DIR or use --dry-run.")
        if out_dir.exists() and not overwrite:
            raise UserInputError(f"{out_dir} exists. To resolve, pass --overwrite or choose another output directory.")
    work = WorkDir.for_output(None if dry_run else out_dir)
    with open_model(model, revision=options.revision, allow_pickle=options.allow_pickle) as opened:
        source = source_view(opened)
        analysis = analyze_source(source, options, reporter, work=work)
        release_memory()
        try:
            if dry_run:
                return ConversionResult(None, analysis,
                                        config=checkpoint_config(source.config, config_block(source, analysis, options)))
            return _write_validated(source, analysis, out_dir, options, overwrite, command, reporter, start, work)
        finally:
            analysis.store.close()


def convert_sweep(model: str, options: ConvertOptions, variants: dict[str, ConvertOptions], out_root: Path, *,
                  reporter: Reporter | None = None, overwrite: bool = False,
                  plan_errors: dict[str, PlanError] | None = None,
                  on_written: Callable[[str, ConversionResult], None] | None = None) -> dict[str, ConversionResult]:
    """Calibrate and factorize `model` once with `options`, then write one checkpoint per variant under
    out_root/NAME. Variants may differ from `options` only in its sweep fields (group_size no larger). With
    `plan_errors`, a variant no plan meets (a speed limit, say) is recorded there and skipped, so the others
    keep the one analysis they share. `on_written` gets each checkpoint as soon as it is written, so a caller
    can use and remove it before the next one takes its disk (each holds a full copy of the other weights)."""
    reporter = reporter or Reporter()
    sweepable = ConvertOptions.sweep_fields()
    for name, variant in variants.items():
        differing = [f for f in variant.to_dict() if f not in sweepable
                     and variant.to_dict()[f] != options.to_dict()[f]]
        if differing or variant.group_size > options.group_size:
            raise UserInputError(f"sweep variant {name!r} changes {differing or ['group_size']}, which the shared "
                                 "analysis fixed. To resolve, vary only " + ", ".join(sweepable) +
                                 " (group_size no larger than the analyzed one), or convert it separately.")
    results = {}
    with open_model(model, revision=options.revision, allow_pickle=options.allow_pickle) as opened:
        source = source_view(opened)
        analysis = analyze_source(source, options, reporter)
        release_memory()
        try:
            for name, variant in variants.items():
                start = time.perf_counter()
                try:
                    planned = method_for(variant).plan(analysis)
                except PlanError as err:
                    if plan_errors is None:
                        raise
                    plan_errors[name] = err
                    continue
                results[name] = _write_validated(source, planned, out_root / name, variant, overwrite, "", reporter,
                                                 start)
                if on_written is not None:
                    on_written(name, results[name])
        finally:
            analysis.store.close()
    return results


def _write_validated(source: SourceModel, analysis: Analysis, out_dir: Path, options: ConvertOptions,
                     overwrite: bool, command: str, reporter: Reporter, start: float,
                     work: WorkDir | None = None) -> ConversionResult:
    """Write the checkpoint, validate it (removing it if that fails), and write the report last; the work
    directory of a resumable conversion goes only once the report is in place."""
    block = config_block(source, analysis, options)
    written = write_checkpoint(source, analysis, block, out_dir, options, overwrite, command, reporter, work)
    report = build_report(analysis, block)
    if options.validate:
        try:
            report["validation"] = validate_checkpoint(written, analysis.validation_tokens, analysis.final_hidden,
                                                       reporter)
        except BaseException:  # an unvalidated checkpoint must not be left looking complete
            discard(written)
            raise
        failure = validation_failure(report["validation"], options.max_kl)
        if failure:
            discard(written)
            if work is not None:
                work.close(remove=True)  # the same inputs would fail the same way: nothing worth resuming
            raise ValidationError(f"The output was removed: {failure}.")
    report["wall_time_s"] = round(time.perf_counter() - start, 2)
    report["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    _write_report(written, report)
    if work is not None:
        work.close(remove=True)
    return ConversionResult(written, analysis, report)


# ---------------------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------------------
def config_block(source: SourceModel, analysis: Analysis, options: ConvertOptions) -> dict:
    facts, method = analysis.facts, method_for(options)
    groups = [method.group_entry(opt, analysis) for opt in analysis.plan]
    quantized = any("bits" in g for g in groups)
    # the layout the quantized groups were priced and measured at; the runtime stores them so
    layout = ({"group": options.quant_group, "residual": options.residual,
               **({"sink": options.quant_sink} if options.quant_sink else {}),
               **({"clip": True} if options.quant_clip else {})} if quantized else None)
    return {
        "format_version": block_version(groups, analysis.sharing is not None, layout),
        "tool_version": __version__,
        **runtime_fields(),
        "base_model": {"id": source.model_id, "revision": source.revision, "model_type": facts.family.model_type},
        "ratio": {"requested": analysis.requested_ratio, "achieved": round(analysis.achieved_ratio, 6),
                  **({"basis": "asymptotic per token: a weighted group stores r per token plus per-layer sinks "
                               "and recent latents, a constant"} if options.merge == "weighted" else {}),
                  # bytes against the full cache at 16 bits; quantized groups' recent window amortized here
                  **({"context": options.context} if quantized else {})},
        **({"quantization": layout} if layout else {}),
        "groups": groups,
        "merge_mode": options.merge,  # fixed at conversion: anchor and weighted factors differ
        "value_path": "auto",  # fused (latent-space values) where cheaper, explicit otherwise
        "arch": facts.runtime_block(),
        "calibration": analysis.calibration,
        "options": options.to_dict(),
        **({"sharing": analysis.sharing.config_entry(options.share_latent)} if analysis.sharing else {}),
    }


def checkpoint_config(source_config: dict, block: dict) -> dict:
    config = {k: v for k, v in source_config.items() if k not in ("architectures", "auto_map", "quantization_config")}
    config.update(
        model_type="commonkv",
        architectures=["CommonKVForCausalLM"],
        base_model_type=source_config["model_type"],
        auto_map={
            "AutoConfig": "configuration_commonkv.CommonKVConfig",
            "AutoModelForCausalLM": "modeling_commonkv.CommonKVForCausalLM",
        },
        layer_types=layer_types(base_config(source_config)),
        commonkv=block,
    )
    return config


def write_checkpoint(source: SourceModel, analysis: Analysis, block: dict, out_dir: Path, options: ConvertOptions,
                     overwrite: bool, command: str, reporter: Reporter, work: WorkDir | None = None) -> Path:
    """The source's tensors but those the method replaces, then the method's own, the config, the runtime, the
    tokenizer, the recipe and the card. Nothing is computed here beyond a dtype cast."""
    method: Method = method_for(options)
    dtype = source.get_tensor(ArchFacts.kv_name(0, "k")).dtype
    skip = method.skipped(analysis)
    added = method.tensors(source, analysis, reporter)
    names = [n for n in source.tensor_names() if n not in skip]
    resumable = {}
    if work is not None and work.persistent:  # shards go to the work directory and are recorded as they close
        tmp = work.root / "out"
        resumable = dict(tmp_dir=tmp, shards_done=work.written_shards(tmp), on_shard=work.shard_written)
    with CheckpointWriter(out_dir, max_shard_size=options.max_shard_size, overwrite=overwrite, **resumable) as writer, \
            reporter.stage("Writing", len(names)) as bar:
        for name in names:
            if not writer.written(name):  # written before an interruption: not even read again
                writer.add_tensor(name, source.get_tensor(name))
            bar.advance()
        for name, tensor in added:
            writer.add_tensor(name, tensor.to(dtype))
        writer.write_json(CONFIG_FILE, checkpoint_config(source.config, block))
        for name in RUNTIME_FILES:
            writer.copy_file(RUNTIME_DIR / name, name)
        for path in source.tokenizer_files():
            writer.copy_file(path, path.name)
        writer.write_text(RECIPE_FILE, options.to_yaml())
        base_model = options.base_model or hub_base_model(source.model_id, source.config)
        writer.write_text(CARD_FILE, render_card(block, source.model_id, out_dir.name, command,
                                                 analysis.facts.kv_elements_per_token, analysis.elements,
                                                 base_model=base_model,
                                                 model_config=checkpoint_config(source.config, block)))
        return writer.finalize()


# ---------------------------------------------------------------------------------------------------------
# validate and report
# ---------------------------------------------------------------------------------------------------------
def validation_failure(validation: dict, max_kl: float) -> str | None:
    """Why a validation result fails the gate (and record the gate in it), or None when it passes."""
    validation["max_kl"] = max_kl
    failure = None
    if not validation["bytes_match"]:
        failure = (f"The converted cache holds {validation['cache_bytes']} bytes but the plan says "
                   f"{validation['cache_bytes_expected']}. To resolve, report this bug with the command you ran")
    elif "kl_source_to_converted" not in validation:
        failure = "The logits were not compared with the source's. To resolve, report this bug with the command you ran"
    elif validation["kl_source_to_converted"] > max_kl:
        failure = (f"The converted model's next-token distributions differ from the source's by KL "
                   f"{validation['kl_source_to_converted']:.3g} > --max-kl {max_kl:g} (top-1 agreement "
                   f"{validation['top1_agreement']:.2f}). To resolve, convert at a lower --ratio, or pass a larger "
                   "--max-kl to keep it anyway")
    validation["passed"] = failure is None
    return failure


def sensitivity_report(probes: dict | None) -> dict:
    """Layer → key/value → its probes [(estimated error, KL)] and the curve (a, b) fitted to them; {} if none."""
    out = {}
    for layer, roles in sorted((probes or {}).items()):
        out[str(layer)] = {name: {"probes": [[round(e, 6), round(kl, 6)] for e, kl in roles[role]],
                                  "curve": [round(c, 6) for c in fit_curve(roles[role])]}
                           for role, name in (("k", "key"), ("v", "value"))}
    return out


def build_report(analysis: Analysis, block: dict) -> dict:
    return {
        "tool_version": __version__,
        "base_model": block["base_model"],
        "ratio": block["ratio"],
        "kv_elements_per_token": {"full": analysis.facts.kv_elements_per_token, "converted": analysis.elements},
        "groups": block["groups"],
        "similarity": {
            "adjacent": analysis.pairs,
            "groups": [{"layers": list(range(s, s + n)), "latent": round(v, 4)}
                       for (s, n), v in sorted(analysis.group_similarity.items())
                       if any(o.start == s and o.size == n for o in analysis.plan)],
        },
        "calibration": analysis.calibration,
        "sensitivity": sensitivity_report(analysis.sensitivity),
        **({"sharing": analysis.sharing.report()} if analysis.sharing else {}),
    }


def _write_report(out_dir: Path, report: dict) -> None:
    import json

    tmp = out_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.rename(out_dir / REPORT_FILE)


def discard(out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
