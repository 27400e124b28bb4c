"""KVSharer (arXiv 2410.18517): some layers reuse an earlier layer's KV cache and store none of their own.

The search, on calibration sequences run through the source model layer by layer:

1. every layer's cached keys (as stored: after RoPE and any qk-norm) and values, averaged over samples and
   tokens; the Euclidean distance between every pair of layers' averages;
2. pairs ranked most *dissimilar* first (the paper's counter-intuitive finding; ``similar-first`` is the control);
3. walk the ranking: tentatively let the later layer of a pair attend over the earlier layer's cache, run the
   check sequences with every sharing accepted so far plus this one, and keep it only if the cosine similarity of
   the final hidden states (after the final norm) with the original model's stays above the threshold;
4. stop once the requested number of layers share.

A source is never a sharer and a sharer never a source, so every sharer reads a layer that stores its own cache
(no chains). Forward passes restart at the tentative sharer: the layers before it, their hidden states and
their caches are those of the sharings already accepted, kept from the previous accepted pass.

`refit_up_projections` serves the combination with CommonKV: a sharer whose source stores a latent gets its own
up-projections refit by least squares to that latent, B = argmin ‖W_s X_s − B A_p X_p‖ (the same correction
factorize.py makes for a merged group, for layers any distance apart).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .architectures import CACHE_KWARG, ArchFacts
from .budget import Option, keep_option
from .calibrate import base_config, embed, final_norm, layer_kwargs, load_layer
from .checkpoint.reader import SourceModel
from .errors import PlanError
from .factorize import damped_cholesky
from .progress import Reporter

if TYPE_CHECKING:
    from .analysis import Analysis

ORDERS = ("dissimilar-first", "similar-first")
LATENT_PATHS = ("refit", "source")
CHECK_SEQUENCES = 4  # calibration sequences whose final hidden states decide each tentative sharing
MEAN_SEQUENCES = 8  # calibration sequences the per-layer K/V means are taken over (a mean needs few)
LAYER_CACHE_BYTES = 4 * 2**30  # decoder layers kept in memory between search passes up to this size (fp32)


@dataclass
class SharingPlan:
    """The search's outcome: sharer -> source, and how it got there (for the report)."""

    pairs: dict[int, int]
    order: str
    threshold: float
    requested: int
    trials: list[dict] = field(default_factory=list)  # every pair tried: layers, distance, cosine, accepted
    final_hidden: torch.Tensor | None = None  # original model, normed, on the validation rows (see search_sharing)
    fit_tokens: torch.Tensor | None = None  # calibration sequences the refit of up-projections uses

    @property
    def sharers(self) -> set[int]:
        return set(self.pairs)

    def prefix(self, n: int) -> "SharingPlan":
        """The plan a search for n sharers finds: the walk for fewer is a prefix of the walk for more (it only
        stops earlier), so one search serves every smaller N."""
        if n > len(self.pairs):
            raise PlanError(f"The search found {len(self.pairs)} sharing layers; {n} were asked for. To resolve, "
                            "search for the largest N (ratio) first.")
        accepted = [t for t in self.trials if t["accepted"]]
        last = self.trials.index(accepted[n - 1]) + 1 if n else 0
        return dataclasses.replace(self, pairs=dict(list(self.pairs.items())[:n]), requested=n,
                                   trials=self.trials[:last])

    def config_entry(self, latent_path: str) -> dict:
        """The `sharing` key of the checkpoint's `commonkv` block (read by configuration_commonkv.layer_roles)."""
        return {"pairs": [[s, j] for s, j in sorted(self.pairs.items())], "latent_path": latent_path,
                "order": self.order, "threshold": self.threshold}

    def report(self) -> dict:
        return {"pairs": [[s, j] for s, j in sorted(self.pairs.items())], "order": self.order,
                "threshold": self.threshold, "requested": self.requested, "accepted": len(self.pairs),
                "tried": len(self.trials), "trials": self.trials}


# ---------------------------------------------------------------------------------------------------------
# the source model, run layer by layer with a cache hook
# ---------------------------------------------------------------------------------------------------------
class _ShareHook:
    """Stands in for the cache of a full-sequence forward: a storing layer's K/V are recorded, a sharer is
    handed its source's (transformers' attention calls `update` and attends over what it returns)."""

    def __init__(self, pairs: dict[int, int], kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.pairs, self.kv = pairs, kv

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        source = self.pairs.get(layer_idx)
        if source is None:
            self.kv[layer_idx] = (key, value)
            return key, value
        return self.kv[source]


class _Runner:
    """Decoder layers of the source model (kept in memory while they fit in LAYER_CACHE_BYTES) and the pieces
    around them, to run hidden states from any layer to the final norm with a sharing map applied."""

    def __init__(self, source: SourceModel, facts: ArchFacts, seq_len: int):
        self.source, self.facts = source, facts
        self.cfg = base_config(source.config)
        self.inputs = layer_kwargs(self.cfg, facts, seq_len)  # per layer: mask and rotary cos/sin
        self.norm = final_norm(source, facts)
        self._layers: dict[int, torch.nn.Module] = {}
        self._bytes = 0

    def layer(self, i: int) -> torch.nn.Module:
        if i in self._layers:
            return self._layers[i]
        module = load_layer(self.source, self.facts, self.cfg, i)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        if self._bytes + size <= LAYER_CACHE_BYTES:
            self._layers[i], self._bytes = module, self._bytes + size
        return module

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed(self.source, self.facts, tokens)

    def run(self, i: int, hidden: torch.Tensor, hook: _ShareHook) -> torch.Tensor:
        return self.layer(i)(hidden, **self.inputs[i], **{CACHE_KWARG: hook})


@dataclass
class _State:
    """Hidden states entering each layer, cached K/V of each storing layer, final hidden: one sharing map."""

    inputs: dict[int, torch.Tensor]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    final: torch.Tensor


@torch.inference_mode()
def _run_from(runner: _Runner, start: int, pairs: dict[int, int], state: _State) -> _State:
    """Re-run layers start..L-1 with `pairs`; layers before `start` are taken from `state` unchanged."""
    inputs = dict(state.inputs)
    kv = {l: v for l, v in state.kv.items() if l < start}
    hook = _ShareHook(pairs, kv)
    hidden = state.inputs[start]
    for i in range(start, runner.facts.num_layers):
        inputs[i] = hidden
        hidden = runner.run(i, hidden, hook)
    return _State(inputs, kv, runner.norm(hidden))


# ---------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------
def layer_means(runner: _Runner, tokens: torch.Tensor, check: int, extra: torch.Tensor | None = None,
                batch_size: int = 8, reporter: Reporter | None = None) -> tuple[torch.Tensor, _State, torch.Tensor | None]:
    """One pass of the original model over `tokens` [N, T] and then `extra` [M, T].

    Returns the per-layer mean of [keys; values] as cached over the samples and tokens of `tokens`
    ([L, 2·d_kv]), the state of the first `check` sequences (what the search restarts from) and the normed
    final hidden states of `extra` (the reference the converter's validation compares logits with).
    """
    reporter = reporter or Reporter()
    facts = runner.facts
    n = tokens.shape[0]
    rows = tokens if extra is None else torch.cat([tokens, extra])
    sums = torch.zeros(facts.num_layers, 2 * facts.d_kv, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    finals = []
    with torch.inference_mode(), reporter.stage("KVSharer: layer caches", -(-rows.shape[0] // batch_size)) as bar:
        for s in range(0, rows.shape[0], batch_size):
            hidden = runner.embed(rows[s:s + batch_size])
            counted = max(0, min(n - s, hidden.shape[0]))  # rows of this batch that belong to `tokens`
            batch_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            hook = _ShareHook({}, batch_kv)
            for i in range(facts.num_layers):
                if s == 0:
                    inputs[i] = hidden[:check]
                hidden = runner.run(i, hidden, hook)
                key, value = batch_kv.pop(i)  # [b, h_kv, T, hd]
                if s == 0:
                    kv[i] = (key[:check], value[:check])
                if counted:
                    sums[i] += torch.cat([_flat(key[:counted]), _flat(value[:counted])], dim=-1).double().sum(0)
            final = runner.norm(hidden)
            if s == 0:
                reference_final = final[:check]
            finals.append(final[counted:])
            bar.advance()
    means = (sums / tokens.numel()).float()
    extra_final = torch.cat(finals) if extra is not None else None
    return means, _State(inputs, kv, reference_final), extra_final


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[b, h, T, hd] → [b·T, h·hd]: one row per token, heads side by side (as the projection writes them)."""
    return x.transpose(1, 2).flatten(2).flatten(0, 1)


def rank_pairs(means: torch.Tensor, order: str) -> list[tuple[float, int, int]]:
    """(distance, earlier, later) for every pair of layers, most dissimilar first (or most similar first).

    Ties break on the layer indices, so the ranking, and the search, are deterministic."""
    dist = torch.cdist(means.double(), means.double())
    n = means.shape[0]
    pairs = [(float(dist[i, j]), i, j) for i in range(n) for j in range(i + 1, n)]
    if order == "dissimilar-first":
        return sorted(pairs, key=lambda p: (-p[0], p[1], p[2]))
    return sorted(pairs, key=lambda p: (p[0], p[1], p[2]))


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of cos(a_t, b_t)."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean())


def walk(ranked: list[tuple[float, int, int]], share_layers: int, threshold: float,
         score, sharers_ok: set[int] | None = None, sources_ok: set[int] | None = None,
         reporter: Reporter | None = None) -> tuple[dict[int, int], list[dict]]:
    """The greedy walk over ranked pairs; `score(pairs, sharer)` is the cosine of the model sharing `pairs`.

    Pure control flow (the forward passes live in `score`), so the rules are testable on their own: a layer that
    shares never becomes a source and a source never shares; a pair is kept only if its cosine > threshold.
    """
    reporter = reporter or Reporter()
    pairs: dict[int, int] = {}
    trials: list[dict] = []
    with reporter.stage("KVSharer: search", share_layers) as bar:
        for distance, source, sharer in ranked:
            if len(pairs) >= share_layers:
                break
            if sharer in pairs or sharer in pairs.values() or source in pairs:
                continue
            if (sharers_ok is not None and sharer not in sharers_ok) or (sources_ok is not None and source not in sources_ok):
                continue
            trial = {**pairs, sharer: source}
            cosine = score(trial, sharer)
            accepted = cosine > threshold
            trials.append({"layer": sharer, "source": source, "distance": round(distance, 6),
                           "cosine": round(cosine, 6), "accepted": accepted})
            if accepted:
                pairs = trial
                bar.advance(f"layer {sharer} reads layer {source}")
    return pairs, trials


def search_sharing(source: SourceModel, facts: ArchFacts, tokens: torch.Tensor, *, share_layers: int,
                   threshold: float, order: str = "dissimilar-first",
                   check: int = CHECK_SEQUENCES, validation: torch.Tensor | None = None,
                   sharers_ok: set[int] | None = None, sources_ok: set[int] | None = None,
                   reporter: Reporter | None = None) -> SharingPlan:
    """Run KVSharer's search: layer means over calibration `tokens` [N, T], the first `check` sequences decide.

    `validation` rows, if given, are run through the original model in the same pass: their normed final
    hidden states come back in `SharingPlan.final_hidden`."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    runner = _Runner(source, facts, tokens.shape[1])
    means, reference, final = layer_means(runner, tokens, min(check, tokens.shape[0]), validation,
                                          reporter=reporter)
    current, last = {"pairs": {}, "state": reference}, {}

    def score(trial: dict[int, int], sharer: int) -> float:
        base = {s: j for s, j in trial.items() if s != sharer}
        if last and last["pairs"] == base:  # the previous trial was accepted: restart from its state
            current.update(last)
        state = _run_from(runner, sharer, trial, current["state"])
        last.update(pairs=trial, state=state)
        return token_cosine(state.final, reference.final)

    pairs, trials = walk(rank_pairs(means, order), share_layers, threshold, score, sharers_ok, sources_ok, reporter)
    return SharingPlan(pairs, order, threshold, share_layers, trials, final)


# ---------------------------------------------------------------------------------------------------------
# planning with sharers, and the combination with CommonKV
# ---------------------------------------------------------------------------------------------------------
def shared_options(options: list[Option], sharers: set[int]) -> list[Option]:
    """Budget options with sharers taken out: a sharing layer is a kept layer that stores nothing (cost 0), and
    no latent option may cover it (its cache is its source's)."""
    kept = [o for o in options if not sharers.intersection(o.layers)]
    return kept + [Option(layer, 1, "keep", 0, 0, 0.0, {layer: (0.0, 0.0)}) for layer in sorted(sharers)]


def refit_up_projections(source: SourceModel, facts: ArchFacts, tokens: torch.Tensor,
                         needs: dict[int, tuple[int, torch.Tensor]], batch_size: int = 8,
                         reporter: Reporter | None = None) -> dict[int, torch.Tensor]:
    """Up-projections of sharers that read a latent: `needs` maps sharer s -> (predictor p, down A_p [r, d]),
    where p is the layer whose latent the source stores. Returns s -> B_s [2·d_kv, r] minimizing
    ‖W_s X_s − B_s A_p X_p‖² over `tokens` (the fit split), W_s = [W_k; W_v] of the sharer (biases stay its own).
    """
    if not needs:
        return {}
    reporter = reporter or Reporter()
    runner = _Runner(source, facts, tokens.shape[1])
    weights = {s: torch.cat([source.get_tensor(ArchFacts.kv_name(s, w), torch.float64) for w in "kv"])
               for s in needs}
    downs = {p: down.double() for p, down in needs.values()}
    num = {s: 0.0 for s in needs}  # Σ (W_s x_s) z_pᵀ
    den = {p: 0.0 for p in downs}  # Σ z_p z_pᵀ
    last = max(needs)
    with torch.inference_mode(), reporter.stage("KVSharer: refit", (tokens.shape[0] + batch_size - 1) // batch_size) as bar:
        for b in range(0, tokens.shape[0], batch_size):
            hidden = runner.embed(tokens[b:b + batch_size])
            latents: dict[int, torch.Tensor] = {}
            for i in range(last + 1):
                layer = runner.layer(i)
                x = runner.facts.attention_input(layer, hidden).flatten(0, 1).double()
                if i in downs:
                    latents[i] = x @ downs[i].T
                    den[i] = den[i] + latents[i].T @ latents[i]
                if i in needs:
                    num[i] = num[i] + (x @ weights[i].T).T @ latents[needs[i][0]]
                hidden = layer(hidden, **runner.inputs[i])
            bar.advance()
    out = {}
    for s, (p, _) in needs.items():
        chol = damped_cholesky(den[p], 1e-8)
        out[s] = torch.cholesky_solve(num[s].T, chol).T.float()  # B = N (Z Zᵀ)⁻¹
    return out


@dataclass(frozen=True)
class KVSharer:
    """The hyperparameters of KVSharer (the ConvertOptions fields of the same names). `share_layers` None:
    round(ratio · layers) sharers; `share_latent`: how a sharer reads a latent source when combined with
    CommonKV (its own refit up-projections, or the source's)."""

    ratio: float
    share_layers: int | None
    share_threshold: float
    share_order: str
    share_latent: str

    def count(self, num_layers: int) -> int:
        """N sharers: share_layers, else round(ratio · L); at most L − 1 (one layer must store)."""
        n = round(self.ratio * num_layers) if self.share_layers is None else self.share_layers
        if not 0 < n < num_layers:
            raise PlanError(f"KVSharer would share {n} of {num_layers} layers; between 1 and {num_layers - 1} can. "
                            "To resolve, pass --share-layers N (or --ratio R with R·layers in that range).")
        return n

    def search(self, source: SourceModel, facts: ArchFacts, data, reporter: Reporter | None = None) -> SharingPlan:
        """The search on `data` (analysis.CalibrationData): layer means from the first MEAN_SEQUENCES fit
        sequences, decisions from the first CHECK_SEQUENCES; the validation rows' reference hidden states come
        from the same pass."""
        plan = search_sharing(source, facts, data.fit[:MEAN_SEQUENCES], share_layers=self.count(facts.num_layers),
                              threshold=self.share_threshold, order=self.share_order,
                              validation=data.validation_tokens, reporter=reporter)
        if len(plan.pairs) < plan.requested:
            raise PlanError(
                f"KVSharer found only {len(plan.pairs)} of the {plan.requested} requested sharing layers whose final "
                f"hidden states keep cosine > {plan.threshold} ({len(plan.trials)} pairs tried, {facts.num_layers} "
                "layers). To resolve, lower --threshold or --share-layers.")
        plan.fit_tokens = data.fit
        return plan

    def analyze(self, source: SourceModel, facts: ArchFacts, data, work, reporter: Reporter, devices,
                *, keep_tokens: int = 0) -> "Analysis":
        """KVSharer alone: the search; every layer but the sharers keeps its K/V. `devices` and `keep_tokens`
        (samples for `commonkv analyze`) belong to the latent methods' calibration: the search runs on the CPU
        and keeps no samples."""
        from .analysis import Analysis
        from .resume import CandidateStore

        sharing = self.search(source, facts, data, reporter)
        return self.plan(Analysis(facts, data, [], self.ratio, CandidateStore(work), sharing.final_hidden,
                                  sharing=sharing))

    def plan(self, analysis: "Analysis") -> "Analysis":
        """Every layer keeps its K/V, the sharers at no cost; fewer sharers than searched for (a sweep) are a
        prefix of the same search."""
        facts = analysis.facts
        n, sharing = self.count(facts.num_layers), analysis.sharing
        sharing = sharing if n == len(sharing.pairs) else sharing.prefix(n)
        plan = sorted(shared_options([keep_option(l, facts.d_kv) for l in range(facts.num_layers)],
                                     sharing.sharers), key=lambda o: o.start)
        ratio = len(sharing.pairs) / facts.num_layers if self.share_layers is not None else self.ratio
        return dataclasses.replace(analysis, plan=plan, requested_ratio=ratio, sharing=sharing)

    @staticmethod
    def group_entry(opt: Option, analysis: "Analysis") -> dict:
        return {"layers": opt.layers, "mode": opt.mode, "elements": opt.cost}

    def skipped(self, analysis: "Analysis") -> set[str]:
        """Every sharer's k/v projections, and its k_norm unless it rebuilds keys with refit up-projections."""
        refit = self.refit_targets(analysis)
        skip = set()
        for s in analysis.sharing.pairs:
            prefix = f"model.layers.{s}.self_attn."
            skip.update(prefix + f"{w}_proj.{p}" for w in "kv" for p in ("weight", "bias"))
            if s not in refit:
                skip.add(prefix + "k_norm.weight")
        return skip

    def refit_targets(self, analysis: "Analysis") -> dict[int, int]:
        """Sharers that get refit up-projections → the layer whose latent their source's cache holds (per_layer:
        the source itself; merged, anchor mode: the group's anchor)."""
        option_of = {layer: opt for opt in analysis.plan for layer in opt.layers}
        if self.share_latent != "refit":
            return {}
        return {s: option_of[j].start for s, j in analysis.sharing.pairs.items() if option_of[j].mode != "keep"}

    def tensors(self, source: SourceModel, analysis: "Analysis",
                reporter: Reporter | None = None) -> list[tuple[str, torch.Tensor]]:
        """The refit up-projections of sharers reading a latent (forward passes over the fit sequences, run
        now, before the writer opens)."""
        from .commonkv import up_projections

        refit = self.refit_targets(analysis)
        option_of = {layer: opt for opt in analysis.plan for layer in opt.layers}
        downs = {p: analysis.store.factors(analysis.candidates[(p, option_of[p].size)], option_of[p].rank)[0]
                 for p in set(refit.values())}
        ups = refit_up_projections(source, analysis.facts, analysis.sharing.fit_tokens,
                                   {s: (p, downs[p]) for s, p in refit.items()}, reporter=reporter)
        return [item for s, up in ups.items() for item in up_projections(source, analysis.facts, s, up)]
