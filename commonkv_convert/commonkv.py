"""CommonKV (arXiv 2508.16134) as a method object: spans of up to `group_size` adjacent layers share one
down-projection, and the budget picks per span keep / per-layer latent / merged latent and a rank.

`analyze` calibrates layer by layer and factorizes every span as soon as its last layer is calibrated, so
only a window of Grams is ever in memory; `plan` is the budget stage; `tensors` hands the writer the factors
the plan picked. The math is in factorize.py, weighted.py, similarity.py and budget.py.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .analysis import Analysis, CalibrationData
from .architectures import ArchFacts
from .budget import (
    FULL_BITS,
    Option,
    Pricing,
    allocate,
    candidate_options,
    keep_options,
    latent_values_options,
    uniform,
)
from .calibrate import CalibrationResult, LayerStats, resolve_devices
from .checkpoint.format import group_elements
from .checkpoint.reader import SourceModel
from .decode_cost import config_element_size, group_cost, rest_cost, shape_from_config
from .errors import PlanError, UserInputError
from .factorize import (
    Candidate,
    balance_transform,
    factorize,
    key_score_metric,
    rank_grid,
    value_output_metric,
)
from .kvsharer import SharingPlan, shared_options
from .progress import Reporter
from .quant_error import latent_errors
from .recipe import parse_bits
from .refit import refit
from .resume import CalibrationCache, CandidateStore, WorkDir
from .sensitivity import curves, factor_scales, probe
from .similarity import adjacent_pairs, latent_similarity
from .weighted import weighted_factorize


@dataclass(frozen=True)
class CommonKV:
    """The hyperparameters of a CommonKV conversion (the ConvertOptions fields of the same names)."""

    ratio: float
    group_size: int
    allocator: str
    allow_keep: bool
    rank_step: int
    plain_svd: bool
    balance: bool
    key_metric: str
    value_metric: str
    value_weight: float
    factor_weights: str
    merge: str
    sink: int
    window: int
    block: int
    bits: str
    context: int
    quant_group: int
    quant_sink: int
    quant_clip: bool
    residual: int
    max_decode_cost: float | None
    latent_values: bool
    latent_tail: bool
    layer_weights: str
    refit: str
    device: str

    def analyze(self, source: SourceModel, facts: ArchFacts, data: CalibrationData, work: WorkDir,
                reporter: Reporter, devices: list[torch.device], *, keep_tokens: int = 0,
                sharing: SharingPlan | None = None) -> Analysis:
        """Calibrate and factorize layer by layer, then plan. With a persistent `work` directory every finished
        layer is recorded there, and a rerun with the same inputs continues after the last one (resume.py)."""
        if self.group_size > facts.num_layers:
            raise UserInputError(f"--group-size {self.group_size} exceeds the model's {facts.num_layers} layers. "
                                 f"To resolve, pass a value from 1 to {facts.num_layers}.")
        prior = self._first_pass(source, facts, data, work, reporter, devices) if self.factor_weights == "kl" else {}
        scales = prior.get("scales", {})
        cache, store = CalibrationCache(work, self.group_size), CandidateStore(work)
        candidates, group_sim, value_candidates = store.restore(cache.start)
        everything = cache.finished()
        window: deque[LayerStats] = deque(cache.window(), maxlen=self.group_size)  # Grams stay on disk (lazy)
        transforms: dict[int, torch.Tensor] = {}
        weights: dict[int, torch.Tensor] = {}
        dev = devices[0]  # factorization runs on the first device; its results come back to the CPU
        result = CalibrationResult()
        for stats in cache.run(source, facts, data.tokens, held_out=data.held_out, validation=data.validation,
                               reporter=reporter, result=result, keep_tokens=keep_tokens, devices=devices,
                               quant_group=self.quant_group, quant_sink=self.quant_sink,
                               quant_clip=self.quant_clip):
            window.append(stats)
            everything[stats.layer] = _summary(stats)
            live = {s.layer: s for s in window}
            transforms = {l: transforms[l] if l in transforms else
                          self._row_transform(source, facts, l, live[l].gram["fit"], live[l].query_energy,
                                              scales.get(l))
                          for l in live}  # only the window's: these dicts must not grow with the model
            weights = {l: weights[l] if l in weights else (transforms[l] @ _kv_weight(source, l)).to(dev)
                       for l in live}
            for size in range(1, min(self.group_size, stats.layer + 1) + 1):
                first = stats.layer - size + 1
                cand = self._factorize_span(first, size, weights, live, facts, dev)
                if cand is None:
                    continue
                if size > 1:
                    group_sim[(first, size)] = latent_similarity(cand, live)
                candidates[(first, size)] = store.put(_undo_transform(cand, transforms), group_sim.get((first, size)))
            # the values alone, for --latent-values (cheap: one layer's d_kv rows); always, so a sweep may turn it on
            values = self._factorize_span(stats.layer, 1, weights, live, facts, dev, values_only=True)
            value_candidates[stats.layer] = store.put(_undo_transform(values, transforms), values_only=True)
        sensitivity = prior.get("sensitivity")  # --factor-weights kl measured it in its first pass
        if self.layer_weights == "kl" and sensitivity is None:  # the one stage whose cost grows with layers²
            per_layer = {l: candidates[(l, 1)] for l in range(facts.num_layers) if (l, 1) in candidates}
            sensitivity = probe(source, facts, data.tokens[-data.held_out:], per_layer, store, reporter, dev)
        analysis = Analysis(facts, data, [], self.ratio, store, result.final_hidden, candidates,
                            adjacent_pairs(everything, {s: v for (s, n), v in group_sim.items() if n == 2}),
                            group_sim, {l: s.samples for l, s in everything.items() if s.samples}, sharing,
                            {l: s.quant_error for l, s in everything.items()}, shape_from_config(source.config),
                            config_element_size(source.config), sensitivity, value_candidates)
        return self.plan(analysis)

    def _factorize_span(self, first: int, size: int, weights: dict[int, torch.Tensor], live: dict[int, LayerStats],
                        facts: ArchFacts, dev: torch.device, *, values_only: bool = False) -> Candidate | None:
        """Factors of layers first..first+size-1 at every rank of the grid, or None when no latent of the span
        is narrower than keeping it. `values_only`: a latent of the values alone (a `latent_values` layer keeps
        its keys), up to their full width: its key rows are zero, so the fit and the errors are the values'."""
        full = group_elements("keep", size, 0, facts.d_kv)
        # a per-layer latent as wide as K and V together only pays when keeping is not allowed
        limit = min(full if (size == 1 and not self.allow_keep) else full - self.rank_step, facts.hidden_size)
        if values_only:
            weights = {l: torch.cat([torch.zeros_like(w[:facts.d_kv]), w[facts.d_kv:]]) for l, w in weights.items()}
            limit = min(facts.d_kv, facts.hidden_size)
        if limit < 1:
            return None
        ranks = rank_grid(limit, self.rank_step) if limit >= self.rank_step else torch.tensor([limit])
        span = {l: weights[l] for l in range(first, first + size)}
        fit, held = _grams(live, "fit", dev), _grams(live, "held_out", dev)
        if size > 1 and self.merge == "weighted":
            return _to_device(weighted_factorize(span, fit, held, ranks), "cpu")
        cand = factorize(span, first, fit, held, ranks, whiten=not self.plain_svd)
        probes = {l: live[l].probe for l in span}
        if all(p is not None for p in probes.values()):  # the held-out activations: quantization errors
            latent = probes[first].to(dev, cand.down.dtype) @ cand.down.T
            targets = {l: probes[l].to(dev, w.dtype) @ w.T for l, w in span.items()}
            cand.quant_error = latent_errors(latent, cand.up, targets, ranks, facts.d_kv, self.quant_group,
                                             self.quant_sink, self.quant_clip)
        return _to_device(cand, "cpu")

    def _row_transform(self, source: SourceModel, facts: ArchFacts, layer: int, gram: torch.Tensor,
                       query_energy: torch.Tensor | None, scale: tuple[float, float] | None = None) -> torch.Tensor:
        """The balance transform of a layer's [W_k; W_v] rows (identity without --balance), from the Gram of its
        attention inputs and its queries' energy per key channel (calibrate.query_energy); `scale`: the (key,
        value) weights of --factor-weights kl on top, so the joint SVD spends rank where the KL is."""
        w = _kv_weight(source, layer)
        if not self.balance:
            transform = torch.eye(w.shape[0], dtype=w.dtype)
        else:
            metric = key = None
            if self.value_metric == "output":
                w_o = source.get_tensor(facts.layer_prefix(layer) + "self_attn.o_proj.weight", torch.float64)
                metric = value_output_metric(w_o, facts.num_kv_heads, facts.head_dim)
            if self.key_metric == "query":
                key = key_score_metric(query_energy)
            transform = balance_transform(w[: facts.d_kv], w[facts.d_kv:], metric, gram, self.value_weight, key)
        if scale is None:
            return transform
        rows = torch.tensor(scale, dtype=transform.dtype).sqrt().repeat_interleave(facts.d_kv)
        return rows[:, None] * transform

    FIRST_PASS = "factor_weights.pt"  # in the work directory: a resumed --factor-weights kl run skips the pass

    def _first_pass(self, source: SourceModel, facts: ArchFacts, data: CalibrationData, work: WorkDir,
                    reporter: Reporter, devices: list[torch.device]) -> dict:
        """--factor-weights kl: {"sensitivity", "scales"} from an analysis of per-layer latents with energy
        weights, planned at this ratio and precisions (in a temporary work directory): its layer sensitivities, and
        each layer's (key, value) weight, the slope of its KL curves at the errors that plan gave it."""
        if (work.root / self.FIRST_PASS).is_file():
            return work.load(self.FIRST_PASS)
        reporter.log("--factor-weights kl: a first pass over per-layer latents measures the layer sensitivities.")
        single = dataclasses.replace(self, group_size=1, factor_weights="energy", layer_weights="kl", refit="none",
                                     max_decode_cost=None, latent_values=False)
        temp = WorkDir.for_output(None)
        temp.bind("first pass", reporter.log)
        try:
            analysis = single.analyze(source, facts, data, temp, reporter, devices)
        finally:
            temp.close(remove=True)
        errors = {l: e for opt in analysis.plan for l, e in opt.errors.items()}
        out = {"sensitivity": analysis.sensitivity, "scales": factor_scales(curves(analysis.sensitivity), errors)}
        work.save(self.FIRST_PASS, out)
        return out

    def plan(self, analysis: Analysis) -> Analysis:
        """The budget stage: spans up to group_size at the allowed precisions, at most (1 − ratio) of the full
        cache's bits per token at 16 bits; KVSharer's sharers (if any) are kept layers that cost nothing.
        Calibration, factorization and the quantization errors do not depend on these fields (group_size no
        larger than the analyzed one), so sweeps re-plan one analysis."""
        facts = analysis.facts
        budget = int((1.0 - self.ratio) * facts.kv_elements_per_token + 1e-9) * FULL_BITS
        candidates = {key: c for key, c in analysis.candidates.items() if key[1] <= self.group_size}
        if self.allocator == "uniform":
            plan = uniform(candidates, facts.num_layers, self.group_size, budget, facts.d_kv)
        else:
            pricing = Pricing(parse_bits(self.bits), self.context, self.quant_group, self.residual, self.quant_sink)
            if self.layer_weights == "kl" and analysis.sensitivity is None:
                raise UserInputError("--layer-weights kl needs the layer sensitivities, which this analysis did not "
                                     "measure. To resolve, analyze with --layer-weights kl (a sweep's base options).")
            weights = curves(analysis.sensitivity) if self.layer_weights == "kl" else None
            opts = [o for l in range(facts.num_layers) for o in keep_options(
                l, facts.head_dim, facts.num_kv_heads, analysis.kept_quant_error.get(l, {}), pricing, weights)] \
                if self.allow_keep else []
            for cand in candidates.values():
                opts.extend(candidate_options(cand, weights, pricing, tails=self.latent_tail))
            sharing = analysis.sharing.pairs if analysis.sharing else {}
            if self.latent_values:  # not for a KVSharer source: its sharers attend over its rebuilt keys and values
                for l, cand in analysis.value_candidates.items():
                    if l not in sharing.values():
                        opts.extend(latent_values_options(cand, analysis.kept_quant_error.get(l, {}), facts.head_dim,
                                                          facts.num_kv_heads, pricing, weights))
            sharers = analysis.sharing.sharers if analysis.sharing else set()
            opts = shared_options(opts, sharers) if sharers else opts
            plan = allocate(opts, facts.num_layers, budget) if self.max_decode_cost is None else \
                self._within_decode_cost(opts, analysis, budget)
        return dataclasses.replace(analysis, plan=plan, requested_ratio=self.ratio)

    def _within_decode_cost(self, opts: list[Option], analysis: Analysis, budget: float) -> list[Option]:
        """The least-loss plan within the byte budget whose predicted decode step (decode_cost.py, one sequence,
        at --context tokens) is at most max_decode_cost times the full cache's.

        Step costs add over groups, so the constraint is priced into the loss with a multiplier λ (a Lagrangian
        relaxation of the dynamic program): λ = 0 is the unconstrained plan, and the smallest λ whose plan is
        fast enough is found by bisection. The plan is optimal for its own cost, not always for the limit."""
        shape, tokens, e, layers = analysis.decode_shape, self.context, analysis.element_size, analysis.facts.num_layers
        full = sum(group_cost(shape, {"layers": [l], "mode": "keep"}, tokens, element_size=e) for l in range(layers))
        rest = rest_cost(shape, element_size=e)
        limit = self.max_decode_cost * (full + rest) - rest  # what the groups' steps may cost together
        priced: dict[tuple, float] = {}
        costs = []
        for o in opts:
            key = (o.mode, o.size, o.rank, o.bits)
            if key not in priced:
                group = {"layers": o.layers, "mode": o.mode, "rank": o.rank, "merge": self.merge,
                         **({"bits": o.bits} if o.bits < FULL_BITS else {})}
                priced[key] = 0.0 if o.cost == 0 else group_cost(shape, group, tokens, element_size=e)
            costs.append(priced[key])

        def solve(lam: float) -> tuple[list[Option], float]:
            weighed = [dataclasses.replace(o, loss=o.loss + lam * c / full) for o, c in zip(opts, costs)]
            back = {id(w): o for w, o in zip(weighed, opts)}
            plan = [back[id(w)] for w in allocate(weighed, layers, budget)]
            return plan, sum(priced[(o.mode, o.size, o.rank, o.bits)] if o.cost else 0.0 for o in plan)

        plan, cost = solve(0.0)
        if cost <= limit:
            return plan
        lo, hi = 0.0, 1.0
        while solve(hi)[1] > limit:
            hi *= 8
            if hi > 1e9:
                raise PlanError(f"No plan within --ratio {self.ratio:g} decodes at --max-decode-cost "
                                f"{self.max_decode_cost:g} of the full cache's step; the fastest predicted is "
                                f"{(solve(hi)[1] + rest) / (full + rest):.2f}. To resolve, raise --max-decode-cost or "
                                "lower --ratio, or allow more --bits.")
        for _ in range(24):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if solve(mid)[1] <= limit else (mid, hi)
        return solve(hi)[0]

    def group_entry(self, opt: Option, analysis: Analysis) -> dict:
        """How the config block describes one group of the plan (what the runtime builds its cache from)."""
        group = {"layers": opt.layers, "mode": opt.mode}
        if opt.mode != "keep":
            group.update(rank=opt.rank, anchor=opt.start)
            if opt.mode == "merged":
                group["merge"] = self.merge
                if self.merge == "weighted":
                    cand = analysis.candidates[(opt.start, opt.size)]
                    group.update(weights=cand.weights_at(opt.rank), sink=self.sink, window=self.window,
                                 block=self.block)
        group["elements"] = opt.cost
        if opt.bits < FULL_BITS:
            group["bits"] = opt.bits
        if opt.tail is not None:
            group["tail"] = {"start": opt.tail[0], "bits": opt.tail[1]}
        if opt.mode != "keep" or opt.bits < FULL_BITS:
            group["est_error"] = {"key": round(sum(e[0] for e in opt.errors.values()) / opt.size, 6),
                                  "value": round(sum(e[1] for e in opt.errors.values()) / opt.size, 6)}
            group["est_loss"] = round(opt.loss, 6)  # what the planner minimized (weighted by --layer-weights)
        return group

    def skipped(self, analysis: Analysis) -> set[str]:
        """Source tensors the checkpoint leaves out: the projections a layer's latent replaces (k and v; a
        latent_values layer keeps its k_proj)."""
        return {ArchFacts.kv_name(l, w, p) for opt in analysis.plan if opt.mode != "keep" for l in opt.layers
                for w in _replaced(opt.mode) for p in ("weight", "bias")}

    def tensors(self, source: SourceModel, analysis: Analysis,
                reporter: Reporter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each latent group's down-projection (once) and its layers' up-projections: the analysis's factors,
        read from the candidate store one group at a time, or with --refit refitted now (before the writer
        opens: it only writes)."""
        refitted = None
        if self.refit != "none":
            facts = analysis.facts
            refitted = refit(source, facts, analysis.data.refit_tokens, analysis.plan, lambda l: _kv_weight(source, l),
                             lambda l, gram, energy: self._row_transform(source, facts, l, gram, energy),
                             mode=self.refit, reporter=reporter,
                             device=resolve_devices(self.device)[0])
        return self._group_tensors(source, analysis, refitted)

    def _group_tensors(self, source: SourceModel, analysis: Analysis,
                       refitted: dict | None) -> Iterator[tuple[str, torch.Tensor]]:
        for g, opt in enumerate(analysis.plan):
            if opt.mode != "keep":
                cand = analysis.value_candidates[opt.start] if opt.mode == "latent_values" else \
                    analysis.candidates[(opt.start, opt.size)]
                down, ups = refitted[g] if refitted is not None else analysis.store.factors(cand, opt.rank)
                yield f"model.kv_groups.{g}.down.weight", down
                for layer in opt.layers:
                    yield from up_projections(source, analysis.facts, layer, ups[layer], _replaced(opt.mode))


def _replaced(mode: str) -> str:
    """Which of a latent layer's projections its latent replaces: "kv", or "v" where it keeps its keys."""
    return "v" if mode == "latent_values" else "kv"


def up_projections(source: SourceModel, facts: ArchFacts, layer: int, up: torch.Tensor,
                   which_ones: str = "kv") -> Iterator[tuple[str, torch.Tensor]]:
    """A layer's k_up/v_up weights (from its [B_k; B_v]) and biases (the source's own, zero without), of the
    projections in `which_ones`."""
    prefix = facts.layer_prefix(layer) + "self_attn."
    for which, rows in (("k", slice(0, facts.d_kv)), ("v", slice(facts.d_kv, None))):
        if which not in which_ones:
            continue
        bias_name = ArchFacts.kv_name(layer, which, "bias")
        bias = source.get_tensor(bias_name) if source.has_tensor(bias_name) else torch.zeros(facts.d_kv)
        yield f"{prefix}{which}_up.weight", up[rows].contiguous()
        yield f"{prefix}{which}_up.bias", bias


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
                      samples=stats.samples, quant_error=stats.quant_error)


def _undo_transform(cand: Candidate, transforms: dict[int, torch.Tensor]) -> Candidate:
    """Map the up-projections back from the balanced row space to real keys and values."""
    cand.up = {l: torch.linalg.solve(transforms[l], b) for l, b in cand.up.items()}
    return cand


def _kv_weight(source: SourceModel, layer: int) -> torch.Tensor:
    """[W_k; W_v] (2·d_kv × d) in float64."""
    return torch.cat([source.get_tensor(ArchFacts.kv_name(layer, w), torch.float64) for w in "kv"])
