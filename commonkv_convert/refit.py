"""Refit the planned groups' factors once the plan is fixed (`--refit pooled | sequential | symmetric`).

The analysis fits every candidate span on the fit split and measures it on the held-out split, because the
planner needs honest errors to choose between them. Once the plan is chosen those tokens have done that job:

- `pooled` refits each chosen group at its planned rank on all calibration tokens, fit and held-out together,
  but the validation rows that the post-write check reads (CalibrationData.refit_tokens);
- `sequential` also feeds each group what the converted model would: the residual stream with every earlier
  group's keys and values replaced by their (refitted) latent reconstructions. The targets stay the source's
  own keys and values on the source's stream, so a group's factors learn to undo the drift of the groups
  before it as well as to compress their own layers: min Σ_l ‖W_l X_l − B_l A X̃_p‖², X̃_p the anchor's input
  on the compressed stream (the asymmetric form of GPTQ-style error-propagating calibration);
- `symmetric` feeds the same compressed stream but takes the targets from it too: min Σ_l ‖W_l X̃_l − B_l A X̃_p‖²,
  X̃_l each layer's input on the compressed stream (the group's later layers see it through the source's own
  attention: their latent is what is being fitted). A group then only compresses what it will really be fed,
  and does not try to undo the earlier groups' error with its own rank.

Like calibrate.py this runs layer by layer, one group's source layers in memory at a time. Quantization is not
simulated on the compressed stream: the drift it follows is that of truncation and merging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .architectures import ArchFacts
from .budget import Option
from .calibrate import LAYER_BATCH, base_config, embed, kwargs_to, layer_kwargs, load_layer, query_energy, run_layer
from .checkpoint.reader import SourceModel
from .factorize import factorize
from .memory import release_memory
from .progress import Reporter

Factors = tuple[torch.Tensor, dict[int, torch.Tensor]]  # (down [r, d], layer → up [2·d_kv, r])
# (layer, X_l X_lᵀ on all tokens, its query energy) → the row transform the SVD measures [W_k; W_v] in
RowTransform = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def refit(source: SourceModel, facts: ArchFacts, tokens: torch.Tensor, plan: list[Option],
          weight: Callable[[int], torch.Tensor], row_transform: RowTransform, *, mode: str,
          reporter: Reporter | None = None, device: torch.device | str = "cpu") -> dict[int, Factors]:
    """Group index in `plan` → its factors refitted at its planned rank on all of `tokens` [N, T], by `mode`
    (pooled, sequential or symmetric).

    `weight(l)`: the source's [W_k; W_v] of layer l (2·d_kv × d, float64)."""
    reporter = reporter or Reporter()
    cfg = base_config(source.config)
    inputs = [kwargs_to(kwargs, device) for kwargs in layer_kwargs(cfg, facts, tokens.shape[1])]
    rotary_dim = inputs[0]["position_embeddings"][0].shape[-1]
    clean = embed(source, facts, tokens).to(device)
    sequential = mode in ("sequential", "symmetric")
    drift = clean  # the compressed model's stream (sequential modes)
    out: dict[int, Factors] = {}
    with torch.inference_mode(), reporter.stage("Refitting", facts.num_layers) as bar:
        for g, opt in enumerate(plan):
            layers = {l: load_layer(source, facts, cfg, l).to(device) for l in opt.layers}
            if opt.mode == "keep":
                for l, layer in layers.items():
                    drift = run_layer(layer, drift, inputs[l]) if sequential else None
                    clean = run_layer(layer, clean, inputs[l])
                    bar.advance(f"layer {l}")
            else:
                anchor_input = facts.attention_input(layers[opt.start], drift if sequential else clean)
                flat_p = anchor_input.flatten(0, 1).double()
                grams = {_PREDICTOR: flat_p.T @ flat_p}
                weights, transforms = {}, {}
                own = drift if mode == "symmetric" else None  # the compressed stream through the source's layers
                for l, layer in layers.items():  # the targets' stream first, and its Grams
                    x = facts.attention_input(layer, clean if own is None else own)
                    flat = x.flatten(0, 1).double()
                    grams[l] = flat.T @ flat
                    grams[(l, _PREDICTOR)] = flat.T @ flat_p
                    energy = query_energy(facts.query_outputs(layer.self_attn, x), facts, rotary_dim)
                    transforms[l] = row_transform(l, grams[l].cpu(), energy.cpu()).to(device)
                    weights[l] = transforms[l] @ weight(l).to(device)
                    clean = run_layer(layer, clean, inputs[l])
                    if own is not None and l < opt.layers[-1]:
                        own = run_layer(layer, own, inputs[l])
                cand = factorize(weights, _PREDICTOR, _lookup(grams), _lookup(grams), torch.tensor([opt.rank]),
                                 anchor=opt.start)
                ups = {l: torch.linalg.solve(transforms[l], b) for l, b in cand.up.items()}
                out[g] = (cand.down.cpu(), {l: b.cpu() for l, b in ups.items()})
                if sequential:  # then the compressed stream through the group, reading the anchor's latent
                    latent = (flat_p @ cand.down.T).float().view(*anchor_input.shape[:2], -1)
                    for l, layer in layers.items():
                        drift = _run_latent(layer, facts, drift, inputs[l], latent, ups[l].float())
                for l in layers:
                    bar.advance(f"layer {l}")
            del layers
            release_memory()
    return out


_PREDICTOR = -1  # the Gram index of the anchor's input on the compressed stream


def _lookup(grams: dict) -> Callable[[int, int], torch.Tensor]:
    """factorize's Gram callable over the group's Grams: (l, l), (l, predictor), (predictor, predictor)."""
    def gram(i: int, j: int) -> torch.Tensor:
        if i == j:
            return grams[i]
        return grams[(i, j)] if (i, j) in grams else grams[(j, i)].T
    return gram


def _run_latent(layer: torch.nn.Module, facts: ArchFacts, hidden: torch.Tensor, kwargs: dict,
                latent: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The layer's output with its keys and values read from `latent` [N, T, r] through `up`, batch by batch."""
    override = LatentKV(layer.self_attn, facts, up)
    outputs = []
    with override:
        for s in range(0, hidden.shape[0], LAYER_BATCH):
            override.latent = latent[s:s + LAYER_BATCH]
            outputs.append(layer(hidden[s:s + LAYER_BATCH], **kwargs))
    return torch.cat(outputs)


class LatentKV:
    """Within the block, the layer's key and/or value projections output their latent reconstruction
    B z (+ the source's bias) instead of W x, as the converted model computes them. z is `latent` where set
    (a merged group reads its anchor's latent), else A x of the projection's own input (`down` given)."""

    def __init__(self, attn, facts: ArchFacts, up: torch.Tensor, down: torch.Tensor | None = None,
                 roles: tuple[str, ...] = ("k", "v")) -> None:
        fused = facts.family.fused_qkv
        dtype = next(attn.parameters())  # the dtype and device the layer runs in
        self.down, self.latent = None if down is None else down.to(dtype), None
        self.parts = []  # (module, its output rows, up rows, bias rows or None)
        for role in roles:
            module = getattr(attn, fused) if fused else getattr(attn, f"{role}_proj")
            rows = facts.qkv_rows(role) if fused else slice(None)
            own = slice(0, facts.d_kv) if role == "k" else slice(facts.d_kv, None)
            bias = None if module.bias is None else module.bias[rows]
            self.parts.append((module, rows, up[own].to(dtype), bias))

    def __enter__(self) -> LatentKV:
        self.handles = [module.register_forward_hook(self._hook(rows, up, bias))
                        for module, rows, up, bias in self.parts]
        return self

    def _hook(self, rows: slice, up: torch.Tensor, bias: torch.Tensor | None):
        def hook(module, args, output):
            z = self.latent if self.latent is not None else args[0] @ self.down.T
            output = output.clone()
            output[..., rows] = z @ up.T if bias is None else z @ up.T + bias
            return output
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
