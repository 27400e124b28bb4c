"""The conversion pipeline: load → calibrate → similarity → factorize → budget → write → validate.

This module only wires the stages together; the math lives in factorize/budget/similarity and the file
I/O in checkpoint/.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .architectures import ArchFacts, layer_types, resolve, source_view
from .budget import Option, allocate, candidate_options, keep_option, plan_cost, uniform
from .calibrate import CalibrationResult, LayerStats, base_config, calibrate, resolve_devices
from .calibration_data import DEFAULT_CALIBRATION, fingerprint, read_texts, token_sequences
from .checkpoint.card import hub_base_model, render_card
from .checkpoint.format import (CARD_FILE, CONFIG_FILE, RECIPE_FILE, REPORT_FILE, RUNTIME_DIR, RUNTIME_FILES,
                                block_version, runtime_fields)
from .checkpoint.reader import SourceModel, open_model
from .checkpoint.writer import CheckpointWriter
from .errors import ModelSourceError, PlanError, UserInputError, ValidationError
from .factorize import Candidate, balance_transform, factorize, rank_grid, value_output_metric
from .kvsharer import SharingPlan, keep_plan, plan_sharing, refit_up_projections, shared_options, sharer_weights, \
    sharing_layers
from .memory import peak_rss_bytes, release_memory
from .progress import Reporter
from .recipe import ConvertOptions
from .resume import ActivationState, WorkDir
from .resume import fingerprint as resume_fingerprint
from .similarity import adjacent_pairs, latent_similarity
from .validate import validate_checkpoint
from .weighted import WeightedCandidate, up_at_rank, weighted_factorize



@dataclass
class Analysis:
    """Everything measured before writing: the plan, the candidates it was chosen from, similarities."""

    facts: ArchFacts
    plan: list[Option]
    candidates: dict[tuple[int, int], Candidate]
    pairs: list[dict]
    group_similarity: dict[tuple[int, int], float]
    calibration: dict
    final_hidden: torch.Tensor | None
    validation_tokens: torch.Tensor
    requested_ratio: float
    store: "CandidateStore"
    samples: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # analyze_source(keep_tokens=k)
    sharing: SharingPlan | None = None  # KVSharer methods: sharer -> source

    @property
    def elements(self) -> int:
        return plan_cost(self.plan)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.elements / self.facts.kv_elements_per_token


@dataclass
class ConversionResult:
    out_dir: Path | None
    analysis: Analysis
    report: dict = field(default_factory=dict)


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
                return ConversionResult(None, analysis)
            return _write_validated(source, analysis, out_dir, options, overwrite, command, reporter, start, work)
        finally:
            analysis.store.close()


def convert_sweep(model: str, options: ConvertOptions, variants: dict[str, ConvertOptions], out_root: Path, *,
                  reporter: Reporter | None = None, overwrite: bool = False) -> dict[str, ConversionResult]:
    """Calibrate and factorize `model` once with `options`, then write one checkpoint per variant under
    out_root/NAME. Variants may differ from `options` only in its sweep fields (group_size no larger)."""
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
                results[name] = _write_validated(source, replan(analysis, variant), out_root / name, variant,
                                                 overwrite, "", reporter, start)
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
# analysis: calibrate, factorize every span as soon as its layers are calibrated, allocate
# ---------------------------------------------------------------------------------------------------------
def analyze_source(source: SourceModel, options: ConvertOptions, reporter: Reporter,
                   keep_tokens: int = 0, work: WorkDir | None = None) -> Analysis:
    """Calibrate and factorize layer by layer. With a persistent `work` directory every finished layer is
    recorded there, and a rerun with the same inputs continues after the last one (see resume.py)."""
    facts = resolve(source.config)
    if options.group_size > facts.num_layers:
        raise UserInputError(f"--group-size {options.group_size} exceeds the model's {facts.num_layers} layers. "
                             f"To resolve, pass a value from 1 to {facts.num_layers}.")
    tokenizer = load_tokenizer(source)
    calib_path = Path(options.calib) if options.calib else DEFAULT_CALIBRATION
    tokens = token_sequences(read_texts(calib_path), tokenizer, options.samples, options.seq_len)
    del tokenizer  # ~150 MB for a large vocabulary; nothing later needs it
    held_out = max(1, round(options.samples * options.held_out))
    validation = min(2, held_out)
    calibration = {
        "source": str(calib_path) if options.calib else "bundled:calibration_default.jsonl",
        "samples": options.samples, "seq_len": options.seq_len, "held_out_samples": held_out,
        "sha256": fingerprint(tokens),
    }
    sharing = None
    if options.method != "commonkv":  # KVSharer's search first: the budget then counts its sharers as free
        sharing = plan_sharing(source, facts, tokens, held_out, validation, options, reporter)

    work = work or WorkDir.for_output(None)
    work.bind(resume_fingerprint(options.to_dict() | {"keep_tokens": keep_tokens}, source.path,
                                 sorted(set(source.weight_map.values())), source.config, fingerprint(tokens)),
              reporter.log)
    if options.method == "kvsharer":  # nothing to factorize: every layer but the sharers keeps its K/V
        plan = keep_plan(facts.num_layers, facts.d_kv, sharing.sharers)
        ratio = len(sharing.pairs) / facts.num_layers if options.share_layers is not None else options.ratio
        return Analysis(facts, plan, {}, [], {}, calibration, sharing.final_hidden,
                        tokens[-held_out:][:validation], ratio, CandidateStore(work), sharing=sharing)
    done, group = work.layers_done, options.group_size
    store = CandidateStore(work)
    candidates, group_sim = store.restore(done)
    everything: dict[int, LayerStats] = {l: LayerStats(l, {}, {}, **work.load(f"layers/{l}.pt")) for l in range(done)}
    window: deque[LayerStats] = deque(maxlen=group)  # Grams stay on disk: LayerStats.gram/cross read lazily
    for l in range(max(0, done - group + 1), done):
        cross = {split: list(range(max(0, l - group + 1), l)) if group > 1 else [] for split in ("fit", "held_out")}
        window.append(LayerStats(l, *work.grams(l, ["fit", "held_out"], cross)))
    transforms: dict[int, torch.Tensor] = {}
    weights: dict[int, torch.Tensor] = {}
    devices = resolve_devices(options.device)
    dev = devices[0]  # factorization runs on the first device; its results come back to the CPU
    result = CalibrationResult()
    stream = calibrate(source, facts, tokens, max_group=group, held_out=held_out, validation=validation,
                       reporter=reporter, result=result, keep_tokens=keep_tokens,
                       state=ActivationState(work, done), devices=devices)
    for stats in stream:
        stats.gram, stats.cross = work.save_grams(stats.layer, stats.gram, stats.cross)
        work.save(f"layers/{stats.layer}.pt", {"cos_prev": stats.cos_prev, "tokens": stats.tokens,
                                              "samples": stats.samples})
        window.append(stats)
        everything[stats.layer] = _summary(stats)
        live = {s.layer: s for s in window}
        transforms = {l: transforms[l] if l in transforms else _row_transform(source, facts, live[l], options)
                      for l in live}  # only the window's: these dicts must not grow with the model
        weights = {l: weights[l] if l in weights else (transforms[l] @ _kv_weight(source, l)).to(dev) for l in live}
        for size in range(1, min(options.group_size, stats.layer + 1) + 1):
            first = stats.layer - size + 1
            span = {l: weights[l] for l in range(first, stats.layer + 1)}
            full = size * 2 * facts.d_kv
            # a per-layer latent as wide as K and V together only pays when keeping is not allowed
            limit = min(full if (size == 1 and not options.allow_keep) else full - options.rank_step,
                        facts.hidden_size)
            if limit < 1:
                continue  # no latent of this span can be narrower than keeping it: not a candidate
            ranks = rank_grid(limit, options.rank_step) if limit >= options.rank_step else torch.tensor([limit])
            fit, held = _grams(live, "fit", dev), _grams(live, "held_out", dev)
            if size > 1 and options.merge == "weighted":
                cand = _to_device(weighted_factorize(span, fit, held, ranks), "cpu")
            else:
                cand = _to_device(factorize(span, first, fit, held, ranks, whiten=not options.plain_svd), "cpu")
            if size > 1:
                group_sim[(first, size)] = latent_similarity(cand, live)
            candidates[(first, size)] = store.put(_undo_transform(cand, transforms), group_sim.get((first, size)))
        work.layer_done(stats.layer, ActivationState.keep_from(stats.layer, group))
    pairs = adjacent_pairs(everything, {s: v for (s, n), v in group_sim.items() if n == 2})
    try:
        plan = allocate_plan(candidates, facts, options, sharing.sharers if sharing else set())
    except PlanError:  # bad input fails the same way on every rerun: nothing worth resuming
        work.close(remove=True)
        raise
    return Analysis(facts, plan, candidates, pairs, group_sim, calibration, result.final_hidden,
                    tokens[-held_out:][:validation], options.ratio, store,
                    samples={l: s.samples for l, s in everything.items() if s.samples}, sharing=sharing)


def allocate_plan(candidates: dict[tuple[int, int], Candidate], facts: ArchFacts, options: ConvertOptions,
                  sharers: set[int] = frozenset()) -> list[Option]:
    """The budget stage: spans up to options.group_size, at most (1 − ratio) of the full cache per token;
    KVSharer's sharers (if any) are kept layers that cost nothing."""
    budget = int((1.0 - options.ratio) * facts.kv_elements_per_token + 1e-9)
    candidates = {key: c for key, c in candidates.items() if key[1] <= options.group_size}
    if options.allocator == "uniform":
        return uniform(candidates, facts.num_layers, options.group_size, budget, facts.d_kv)
    opts = [keep_option(l, facts.d_kv) for l in range(facts.num_layers)] if options.allow_keep else []
    for cand in candidates.values():
        opts.extend(candidate_options(cand))
    return allocate(shared_options(opts, sharers) if sharers else opts, facts.num_layers, budget)


def replan(analysis: Analysis, options: ConvertOptions) -> Analysis:
    """The same analysis allocated for other budget options (ratio, allocator, a group size no larger than
    the analyzed one): calibration and factorization do not depend on them, so sweeps run them once."""
    facts, sharing = analysis.facts, analysis.sharing
    if sharing and options.method == "kvsharer":  # fewer sharers: a prefix of the same search
        sharing = sharing.prefix(sharing_layers(options.share_layers, options.ratio, facts.num_layers))
        ratio = len(sharing.pairs) / facts.num_layers if options.share_layers is not None else options.ratio
        return dataclasses.replace(analysis, plan=keep_plan(facts.num_layers, facts.d_kv, sharing.sharers),
                                   requested_ratio=ratio, sharing=sharing)
    sharers = sharing.sharers if sharing else set()
    return dataclasses.replace(analysis, plan=allocate_plan(analysis.candidates, facts, options, sharers),
                               requested_ratio=options.ratio)


def _grams(live: dict[int, LayerStats], split: str, device: torch.device | str = "cpu"):
    def gram(i: int, j: int) -> torch.Tensor:
        if i == j:
            return live[i].gram[split].to(device)
        return (live[i].cross[split][j] if j < i else live[j].cross[split][i].T).to(device)
    return gram


def _to_device(cand: Candidate, device: torch.device | str) -> Candidate:
    """Every tensor of a candidate (also inside its per-layer dicts) moved to `device`."""
    for f in dataclasses.fields(cand):
        value = getattr(cand, f.name)
        if isinstance(value, torch.Tensor):
            setattr(cand, f.name, value.to(device))
        elif isinstance(value, dict):
            setattr(cand, f.name, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
    return cand


def _summary(stats: LayerStats) -> LayerStats:
    """Keep only the scalars of a layer once it leaves the window (Grams are d × d each)."""
    return LayerStats(stats.layer, gram={}, cross={}, cos_prev=stats.cos_prev, tokens=stats.tokens,
                      samples=stats.samples)


def _undo_transform(cand: Candidate, transforms: dict[int, torch.Tensor]) -> Candidate:
    """Map the up-projections back from the balanced row space to real keys and values."""
    cand.up = {l: torch.linalg.solve(transforms[l], b) for l, b in cand.up.items()}
    return cand


class CandidateStore:
    """Factors of every candidate span live on disk until the plan picks a few: memory stays O(window).

    A 30-layer model with group size 4 has ~110 candidates; in memory they would cost more than the model.
    """

    def __init__(self, work: WorkDir) -> None:
        self._work = work

    def put(self, cand: Candidate, similarity: float | None = None) -> Candidate:
        rel = f"candidates/{cand.layers[0]}-{len(cand.layers)}.pt"
        saved = {"down": cand.down.float(), "up": {l: b.float() for l, b in cand.up.items()},
                 "meta": {"layers": list(cand.layers), "predictor": cand.predictor, "ranks": cand.ranks,
                          "err_k": cand.err_k, "err_v": cand.err_v, "similarity": similarity}}
        if isinstance(cand, WeightedCandidate):  # its up-projections are U_l; B_l needs the Cholesky L_l too
            saved["chol"] = cand.chol
            saved["meta"]["merge_weights"] = cand.merge_weights
            cand.chol = {}
        self._work.save(rel, saved)
        cand.down, cand.up = None, {}
        cand.path = self._work.root / rel
        return cand

    def restore(self, layers_done: int) -> tuple[dict[tuple[int, int], Candidate], dict[tuple[int, int], float]]:
        """Candidates of spans ending before `layers_done`, in the order they were made, and their similarities."""
        keys = [tuple(map(int, f.stem.split("-"))) for f in (self._work.root / "candidates").glob("*-*.pt")]
        keys = sorted((k for k in keys if k[0] + k[1] <= layers_done), key=lambda k: (k[0] + k[1], k[1]))
        candidates, similarity = {}, {}
        for first, size in keys:
            path = self._work.root / f"candidates/{first}-{size}.pt"
            meta = torch.load(path, weights_only=True)["meta"]
            weighted = "merge_weights" in meta
            cls = WeightedCandidate if weighted else Candidate
            extra = {"merge_weights": meta["merge_weights"]} if weighted else {}
            candidates[(first, size)] = cls(tuple(meta["layers"]), meta["predictor"], None, {}, meta["ranks"],
                                            meta["err_k"], meta["err_v"], path=path, **extra)
            if meta["similarity"] is not None:
                similarity[(first, size)] = meta["similarity"]
        return candidates, similarity

    @staticmethod
    def factors(cand: Candidate, rank: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        saved = torch.load(cand.path, weights_only=True)
        if "chol" in saved:
            ups = {l: up_at_rank(u.double(), saved["chol"][l], rank).float() for l, u in saved["up"].items()}
            return saved["down"][:rank], ups
        return saved["down"][:rank], {l: b[:, :rank] for l, b in saved["up"].items()}

    def close(self) -> None:
        self._work.close(remove=False)  # a temporary work directory goes; a resumable one stays until done


def _row_transform(source: SourceModel, facts: ArchFacts, stats: LayerStats, options: ConvertOptions) -> torch.Tensor:
    w = _kv_weight(source, stats.layer)
    if not options.balance:
        return torch.eye(w.shape[0], dtype=w.dtype)
    metric = None
    if options.value_metric == "output":
        w_o = source.get_tensor(facts.layer_prefix(stats.layer) + "self_attn.o_proj.weight", torch.float64)
        metric = value_output_metric(w_o, facts.num_kv_heads, facts.head_dim)
    return balance_transform(w[: facts.d_kv], w[facts.d_kv:], metric, stats.gram["fit"], options.value_weight)


def _kv_weight(source: SourceModel, layer: int) -> torch.Tensor:
    """[W_k; W_v] (2·d_kv × d) in float64."""
    return torch.cat([source.get_tensor(ArchFacts.kv_name(layer, w), torch.float64) for w in "kv"])


def load_tokenizer(source: SourceModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelSourceError(f"{source.path} has no usable tokenizer ({str(err).splitlines()[0][:120]}). "
                               "To resolve, add the tokenizer files of the base model to the directory.") from None


# ---------------------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------------------
def config_block(source: SourceModel, analysis: Analysis, options: ConvertOptions) -> dict:
    facts = analysis.facts
    groups = []
    for opt in analysis.plan:
        group = {"layers": opt.layers, "mode": opt.mode}
        if opt.mode != "keep":
            group.update(rank=opt.rank, anchor=opt.start)
            if opt.mode == "merged":
                group["merge"] = options.merge
                if options.merge == "weighted":
                    cand = analysis.candidates[(opt.start, opt.size)]
                    group.update(weights=cand.weights_at(opt.rank),
                                 sink=options.sink, window=options.window, block=options.block)
        group["elements"] = opt.cost
        if opt.mode != "keep":
            group["est_error"] = {
                "key": round(sum(e[0] for e in opt.errors.values()) / opt.size, 6),
                "value": round(sum(e[1] for e in opt.errors.values()) / opt.size, 6),
            }
        groups.append(group)
    return {
        "format_version": block_version(analysis.sharing is not None),
        "tool_version": __version__,
        **runtime_fields(),
        "base_model": {"id": source.model_id, "revision": source.revision, "model_type": facts.family.model_type},
        "ratio": {"requested": analysis.requested_ratio, "achieved": round(analysis.achieved_ratio, 6),
                  **({"basis": "asymptotic per token: a weighted group stores r per token plus per-layer sinks "
                               "and recent latents, a constant"} if options.merge == "weighted" else {})},
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
    facts, plan = analysis.facts, analysis.plan
    replaced = {l for opt in plan if opt.mode != "keep" for l in opt.layers}
    dtype = source.get_tensor(ArchFacts.kv_name(0, "k")).dtype
    skip = {ArchFacts.kv_name(l, w, p) for l in replaced for w in "kv" for p in ("weight", "bias")}
    shared_ups = {}
    if analysis.sharing:  # KVSharer: sharers drop their projections; latent sources' readers get refit ones
        dropped, refit = sharer_weights(plan, analysis.sharing, options.share_latent)
        skip |= dropped
        option_of = {l: opt for opt in plan for l in opt.layers}
        downs = {p: analysis.store.factors(analysis.candidates[(p, option_of[p].size)], option_of[p].rank)[0]
                 for p in set(refit.values())}
        shared_ups = refit_up_projections(source, facts, analysis.sharing.fit_tokens,
                                          {s: (p, downs[p]) for s, p in refit.items()}, reporter=reporter)
    names = [n for n in source.tensor_names() if n not in skip]
    resumable = {}
    if work is not None and work.persistent:  # shards go to the work directory and are recorded as they close
        tmp = work.root / "out"
        resumable = dict(tmp_dir=tmp, shards_done=work.written_shards(tmp), on_shard=work.shard_written)
    with CheckpointWriter(out_dir, max_shard_size=options.max_shard_size, overwrite=overwrite, **resumable) as writer, \
            reporter.stage("Writing", len(names) + len(plan)) as bar:
        for name in names:
            if not writer.written(name):  # written before an interruption: not even read again
                writer.add_tensor(name, source.get_tensor(name))
            bar.advance()
        for g, opt in enumerate(plan):
            if opt.mode != "keep":
                cand = analysis.candidates[(opt.start, opt.size)]
                down, ups = analysis.store.factors(cand, opt.rank)
                writer.add_tensor(f"model.kv_groups.{g}.down.weight", down.to(dtype))
                for layer in opt.layers:
                    _add_up_projections(writer, source, facts, layer, ups[layer], dtype)
            bar.advance()
        for layer, up in shared_ups.items():
            _add_up_projections(writer, source, facts, layer, up, dtype)
        writer.write_json(CONFIG_FILE, checkpoint_config(source.config, block))
        for name in RUNTIME_FILES:
            writer.copy_file(RUNTIME_DIR / name, name)
        for path in source.tokenizer_files():
            writer.copy_file(path, path.name)
        writer.write_text(RECIPE_FILE, options.to_yaml())
        base_model = options.base_model or hub_base_model(source.model_id, source.config)
        writer.write_text(CARD_FILE, render_card(block, source.model_id, out_dir.name, command,
                                                 facts.kv_elements_per_token, analysis.elements,
                                                 base_model=base_model))
        return writer.finalize()


def _add_up_projections(writer: CheckpointWriter, source: SourceModel, facts: ArchFacts, layer: int,
                        up: torch.Tensor, dtype: torch.dtype) -> None:
    prefix = facts.layer_prefix(layer) + "self_attn."
    for which, rows in (("k", slice(0, facts.d_kv)), ("v", slice(facts.d_kv, None))):
        bias_name = ArchFacts.kv_name(layer, which, "bias")
        bias = source.get_tensor(bias_name) if source.has_tensor(bias_name) else torch.zeros(facts.d_kv)
        writer.add_tensor(f"{prefix}{which}_up.weight", up[rows].to(dtype).contiguous())
        writer.add_tensor(f"{prefix}{which}_up.bias", bias.to(dtype))


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
        **({"sharing": analysis.sharing.report()} if analysis.sharing else {}),
    }


def _write_report(out_dir: Path, report: dict) -> None:
    import json

    tmp = out_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.rename(out_dir / REPORT_FILE)


def discard(out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
