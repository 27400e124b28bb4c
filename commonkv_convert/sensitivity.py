"""Per-layer sensitivities: how far the model's output moves for a given estimated K/V error in one layer.

The planner adds relative K/V errors over layers. Weighing them equally assumes that an error in layer 0 costs
what the same error costs in the last layer, which nothing guarantees. Here, for each layer, its keys alone
(then its values alone) are replaced by the layer's own latent reconstruction at the ranks whose estimated
errors are nearest `PROBE_ERRORS`; held-out calibration sequences run through the rest of the source model, and
the KL divergence of the next-token distribution from the source's is measured. Each (layer, role) gets a
curve KL(e) = a·e + b·e² (a, b ≥ 0) through its probes (`fit_curve`), so the planner's loss becomes a predicted
KL: errors of several layers add to first order, and the e² term keeps a layer that tolerates a small error
from being pushed far past what was probed at the price a small error implies.

Like calibrate.py this runs layer by layer, one source decoder layer in memory at a time: each perturbed
stream starts at its layer from the source's hidden states and rides along, batched with the others. The
streams make it cost about (layers × probes) forwards of `SEQUENCES` sequences, quadratic in depth, so it runs
only when the plan uses it (--layer-weights kl).
"""

from __future__ import annotations

import torch

from .architectures import ArchFacts
from .calibrate import base_config, embed, final_norm, kwargs_to, layer_kwargs, load_layer, run_layer
from .checkpoint.reader import SourceModel
from .factorize import Candidate
from .memory import release_memory
from .progress import Reporter
from .refit import LatentKV
from .resume import CandidateStore

PROBE_ERRORS = (0.02, 0.2)  # estimated relative errors probed: about where plans at ratio 0.5 and 0.75 put layers
SEQUENCES = 2  # held-out sequences run (each probe costs a pass of them through every later layer)
SCORED_STRIDE = 2  # logits of every 2nd position are compared (the lm_head over a large vocabulary is costly)
ROLES = ("k", "v")

Curve = tuple[float, float]  # (a, b): predicted KL = a·e + b·e² at estimated error e
Probes = dict[int, dict[str, list[tuple[float, float]]]]  # layer → role → [(estimated error, measured KL)]


def probe_indices(errors: torch.Tensor) -> list[int]:
    """Indices of the ranks whose estimated errors are nearest PROBE_ERRORS (distinct)."""
    return sorted({int((errors - target).abs().argmin()) for target in PROBE_ERRORS})


def fit_curve(points: list[tuple[float, float]]) -> Curve:
    """a, b ≥ 0 of KL(e) = a·e + b·e² by least squares through the origin and the probes."""
    points = [(e, kl) for e, kl in points if e > 1e-8]
    if not points:
        return 0.0, 0.0
    basis = torch.tensor([[e, e * e] for e, _ in points], dtype=torch.float64)
    target = torch.tensor([kl for _, kl in points], dtype=torch.float64)
    if len(points) > 1:
        a, b = torch.linalg.lstsq(basis, target).solution.tolist()
        if a >= 0 and b >= 0:
            return a, b
    # one probe, or a curve that would bend down: the better of a line and a parabola alone
    fits = [((basis[:, j] @ target / (basis[:, j] @ basis[:, j])).clamp_min(0).item(), j) for j in (0, 1)]
    best = min(fits, key=lambda f: float((basis[:, f[1]] * f[0] - target).square().sum()))
    return (best[0], 0.0) if best[1] == 0 else (0.0, best[0])


def curves(probes: Probes) -> dict[int, tuple[Curve, Curve]]:
    """Layer → (key curve, value curve): what the planner weighs errors with."""
    return {layer: (fit_curve(roles["k"]), fit_curve(roles["v"])) for layer, roles in probes.items()}


FLOOR = 1e-3  # factor_scales: the least weight of a role, as a share of the mean, so no role's error is free


def factor_scales(curves: dict[int, tuple[Curve, Curve]],
                  errors: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
    """Layer → (key, value) weight of its rows in the joint SVD (--factor-weights kl): the slope a + 2b·e of each
    role's curve at the error e a first plan gave it (none: 0), over the mean slope.

    With equal weights the SVD minimizes the plain sum of relative K/V errors over a span; with these it minimizes
    the planner's predicted KL to first order around that plan, so a layer whose values move the output ten times
    more than its keys gets its rank spent on its values."""
    slopes = {l: tuple(a + 2 * b * e for (a, b), e in zip(pair, errors.get(l, (0.0, 0.0))))
              for l, pair in curves.items()}
    mean = sum(sum(s) for s in slopes.values()) / max(2 * len(slopes), 1)
    if not mean > 0:
        return {l: (1.0, 1.0) for l in slopes}
    return {l: tuple(max(s / mean, FLOOR) for s in pair) for l, pair in slopes.items()}


def probe(source: SourceModel, facts: ArchFacts, tokens: torch.Tensor, candidates: dict[int, Candidate],
          store: CandidateStore, reporter: Reporter | None = None, device: torch.device | str = "cpu") -> Probes:
    """Layer → role → [(estimated error, KL(source ‖ probed))] on the first SEQUENCES of `tokens` [n, T].

    `candidates`: each layer's per-layer factorization; a layer without one gets no entry (the planner weighs
    its errors by 1)."""
    reporter = reporter or Reporter()
    tokens = tokens[:SEQUENCES]
    cfg = base_config(source.config)
    inputs = [kwargs_to(kwargs, device) for kwargs in layer_kwargs(cfg, facts, tokens.shape[1])]
    n = tokens.shape[0]
    clean = embed(source, facts, tokens).to(device)
    streams: list[tuple[int, str, float]] = []  # (layer, role, estimated error) of each perturbed stream
    perturbed = clean[:0]
    stage = reporter.stage("Measuring layer sensitivities", facts.num_layers)
    with torch.inference_mode(), stage as bar:
        for i in range(facts.num_layers):
            layer = load_layer(source, facts, cfg, i).to(device)
            outputs = [run_layer(layer, perturbed, inputs[i])]
            cand = candidates.get(i)
            if cand is not None:
                for role in ROLES:
                    errors = (cand.err_k if role == "k" else cand.err_v)[i]
                    for idx in probe_indices(errors):
                        down, ups = store.factors(cand, int(cand.ranks[idx]))
                        with LatentKV(layer.self_attn, facts, ups[i], down, roles=(role,)):
                            outputs.append(run_layer(layer, clean, inputs[i]))
                        streams.append((i, role, float(errors[idx])))
            clean = run_layer(layer, clean, inputs[i])
            perturbed = torch.cat(outputs)
            del layer
            release_memory()
            bar.advance(f"layer {i}")
        head = _logprobs(source, facts, device)
        reference = head(clean)
        out: Probes = {}
        for s, (layer, role, error) in enumerate(streams):
            probed = head(perturbed[s * n:(s + 1) * n])
            kl = float((reference.exp() * (reference - probed)).sum(-1).mean())
            out.setdefault(layer, {"k": [], "v": []})[role].append((error, max(kl, 0.0)))
    return out


def _logprobs(source: SourceModel, facts: ArchFacts, device: torch.device | str):
    """hidden [n, T, d] → log-probabilities of every SCORED_STRIDE-th position, as the source computes them."""
    norm = final_norm(source, facts).to(device)
    name = "lm_head.weight" if source.has_tensor("lm_head.weight") else "model.embed_tokens.weight"  # tied
    weight = source.get_tensor(name, torch.float32).to(device)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(norm(hidden[:, ::SCORED_STRIDE]) @ weight.T, dim=-1)
    return head
