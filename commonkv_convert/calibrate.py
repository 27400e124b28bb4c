"""Calibrate layer by layer: one decoder layer in memory at a time, only statistics kept.

Like llm-compressor's sequential pipeline: the hidden states of all calibration samples are pushed through
layer 0, then layer 1, ... Each layer is materialized from the source shards, run with transformers' own
implementation of the family (so the statistics are those of the real model), and freed. What is kept per
layer: the Gram X Xᵀ of its attention inputs on a fit split and a held-out split, the cross-Grams with the
inputs of the previous `max_group - 1` layers (the anchors a merged group could read from), and token-mean
cosine similarities with the previous layer (hidden states, raw keys, raw values).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)
from transformers.masking_utils import create_sliding_window_causal_mask

from .architectures import ArchFacts, SplitQKV, layer_types
from .checkpoint.reader import SourceModel
from .memory import frozen_heap, release_memory
from .progress import Reporter
from .quant_error import GROUP as QUANT_GROUP, kept_errors
from .runtime.modeling_commonkv import apply_rope, rope_at


@dataclass
class LayerStats:
    layer: int
    gram: dict[str, torch.Tensor]  # split ("fit" | "held_out") -> X_l X_lᵀ  [d, d] float64
    cross: dict[str, dict[int, torch.Tensor]]  # split -> {j: X_l X_jᵀ} for earlier layers j in the window
    cos_prev: dict[str, float] = field(default_factory=dict)  # hidden / key / value vs layer l-1
    tokens: dict[str, int] = field(default_factory=dict)
    # only with calibrate(keep_tokens=k): the same k tokens of every layer, for layer × layer maps (analyze.py):
    # "hidden" (residual stream), "input" (after the input norm), "key", "value" (raw projections)  [k, ·] fp32
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    # the held-out sequences' attention inputs [n, T, d] fp32, for quantization errors (quant_error.py); dropped
    # with the Grams when the layer leaves the window
    probe: torch.Tensor | None = None
    # this layer kept at each of QUANT_BITS: (key, value) relative held-out error (quant_error.kept_errors)
    quant_error: dict[int, tuple[float, float]] = field(default_factory=dict)
    # per key channel [d_kv]: the mean square of the queries that read it on the fit split, RoPE-averaged
    # (query_energy): the weight of that channel's error in the attention scores
    query_energy: torch.Tensor | None = None


@dataclass
class CalibrationResult:
    """Filled while `calibrate` is consumed: final hidden states of the validation sequences."""

    final_hidden: torch.Tensor | None = None


@dataclass
class Carry:
    """What calibrating layer k needs from the layers before it: a resumed run starts from a saved one.

    hidden: layer k's input [N, T, d]; previous: layer k−1's hidden/key/value (for similarities), None at
    k = 0; window: the attention inputs of the up to max_group − 1 layers before k (their cross-Grams)."""

    hidden: torch.Tensor
    previous: dict[str, torch.Tensor] | None = None
    window: list[torch.Tensor] = field(default_factory=list)


def base_config(config: dict):
    """The source model's transformers config object (sdpa attention), for running its layers exactly."""
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def embed(source: SourceModel, facts: ArchFacts, tokens: torch.Tensor) -> torch.Tensor:
    """Token embeddings [N, T, d] (fp32) as the family computes them (Gemma scales them by √d)."""
    weight = source.get_tensor("model.embed_tokens.weight", torch.float32)
    hidden = torch.nn.functional.embedding(tokens, weight)
    return hidden * torch.tensor(facts.hidden_size**0.5, dtype=weight.dtype) if facts.family.embed_scale else hidden


def final_norm(source: SourceModel, facts: ArchFacts) -> torch.nn.Module:
    norm = facts.transformers_class("RMSNorm")(facts.hidden_size, eps=source.config.get("rms_norm_eps", 1e-6))
    norm.weight.data.copy_(source.get_tensor("model.norm.weight", torch.float32))
    return norm


def layer_kwargs(cfg, facts: ArchFacts, seq_len: int) -> list[dict]:
    """Per layer, what the family's model hands its decoder layer for unpadded sequences of `seq_len` tokens: the
    mask (None: causal; a sliding-window layer's window) and the rotary cos/sin of its layer type."""
    x = torch.zeros(1, seq_len, facts.hidden_size)
    positions = torch.arange(seq_len).unsqueeze(0)
    rotary = facts.transformers_class("RotaryEmbedding")(config=cfg)
    types = layer_types(cfg)
    masks = {"full_attention": None}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(cfg, x, None, None, positions)
    ropes = {t: rope_at(rotary, x, positions, t) for t in set(types)}
    return [{"attention_mask": masks[t], "position_embeddings": ropes[t]} for t in types]


def kwargs_to(kwargs: dict, device: torch.device | str) -> dict:
    """A layer's keyword inputs (layer_kwargs) on `device`."""
    return {k: None if v is None else v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v)
            for k, v in kwargs.items()}


LAYER_BATCH = 8  # sequences per decoder-layer call: bounds the attention memory of a calibration forward


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict,
              batch_size: int = LAYER_BATCH) -> torch.Tensor:
    """The layer's output on `hidden` [N, T, d], `batch_size` sequences per call (bounds the attention memory)."""
    if hidden.shape[0] == 0:
        return hidden
    return torch.cat([layer(hidden[s:s + batch_size], **kwargs) for s in range(0, hidden.shape[0], batch_size)])


def resolve_devices(spec: str = "cpu") -> list[torch.device]:
    """Devices for `--device`: cpu; cuda (every visible GPU, layers placed round-robin); cuda:N; auto (the
    GPUs if any, else the CPU)."""
    from .errors import UserInputError

    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if spec == "cpu" or (spec == "auto" and not gpus):
        return [torch.device("cpu")]
    if spec in ("auto", "cuda") and gpus:
        return gpus
    if spec.startswith("cuda") and gpus:
        try:
            device = torch.device(spec)
        except RuntimeError:
            device = None
        if device is not None and (device.index or 0) < len(gpus):
            return [device]
    if spec.startswith("cuda"):
        raise UserInputError(f"--device {spec}: no such CUDA device is visible ({len(gpus)} GPUs). "
                             "To resolve, pass --device cpu or auto.")
    raise UserInputError(f"--device {spec!r} is unknown. To resolve, pass cpu, cuda, cuda:N or auto.")


def load_layer(source: SourceModel, facts: ArchFacts, cfg, layer: int) -> torch.nn.Module:
    """Materialize one source decoder layer (fp32) from the shards; nothing else of the model is loaded."""
    layer_cls = facts.transformers_class("DecoderLayer")
    with torch.device("meta"):
        module = layer_cls(cfg, layer)
    stored = source.stored if isinstance(source, SplitQKV) else source  # the layer takes its fused q/k/v as stored
    module.load_state_dict(module_state(stored, facts.layer_prefix(layer), facts.family.model_type),
                           assign=True, strict=True)
    return module.eval()


def module_state(shards, prefix: str, model_type: str) -> dict[str, torch.Tensor]:
    """The fp32 tensors stored under `prefix`, named as the family's modules name them (prefix removed).

    Checkpoints keep some weights in another layout than the modules (MoE experts one by one, fused on load):
    transformers' own conversion mapping for the family turns one into the other, as `from_pretrained` does."""
    state, merged = {}, {}
    for name, (target, converter, pattern) in _stored_names(shards, prefix, model_type).items():
        if converter is None:
            state[target] = shards.get_tensor(name, torch.float32)
        else:
            merged.setdefault(target, deepcopy(converter)).add_tensor(target, name, pattern,
                                                                      shards.get_tensor(name, torch.float32))
    for target, converter in merged.items():
        state.update(converter.convert(target))
    return {name[len(prefix):]: tensor for name, tensor in state.items()}


def module_names(shards, prefix: str, model_type: str) -> dict[str, str]:
    """Stored tensor name → the module tensor it becomes (as `module_state` names it), under `prefix`."""
    return {name: target[len(prefix):] for name, (target, _, _) in _stored_names(shards, prefix, model_type).items()}


def _stored_names(shards, prefix: str, model_type: str) -> dict[str, tuple]:
    """Stored name → (full module name, the converter that fuses it or None, its pattern) under `prefix`."""
    conversions = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    out = {}
    for name in shards.tensor_names():
        if name.startswith(prefix):
            target, pattern = rename_source_key(name, renamings, converters)
            out[name] = (target, by_pattern.get(pattern), pattern)
    return out


def calibrate(
    source: SourceModel,
    facts: ArchFacts,
    tokens: torch.Tensor,
    *,
    max_group: int,
    held_out: int,
    validation: int,
    batch_size: int = LAYER_BATCH,
    reporter: Reporter | None = None,
    result: CalibrationResult | None = None,
    keep_tokens: int = 0,
    start: int = 0,
    carry: Carry | None = None,
    devices: list[torch.device] | None = None,
    quant_group: int = QUANT_GROUP,
    quant_sink: int = 0,
    quant_clip: bool = False,
) -> Iterator[tuple[LayerStats, Carry]]:
    """Yield (LayerStats, the Carry for the next layer) for layers start..L-1 in order. Pure: nothing is
    saved here (resume.CalibrationCache saves each Carry and continues from one).

    tokens: [N, T]; the last `held_out` sequences form the held-out split, and the first `validation` of
    those also get their final hidden states recorded in `result` for the post-write logit check.
    `keep_tokens` > 0 keeps that many evenly spaced tokens' activations per layer in `LayerStats.samples`.
    `start` = k > 0 continues at layer k from `carry`. `devices`: layer i runs on devices[i % len(devices)] (default: CPU);
    statistics always come back to the CPU. `quant_group`, `quant_sink`, `quant_clip`: the quantization layout
    kept layers' errors are measured at.
    """
    reporter = reporter or Reporter()
    result = result or CalibrationResult()
    cfg = base_config(source.config)
    n = tokens.shape[0]
    splits = {"fit": slice(0, n - held_out), "held_out": slice(n - held_out, n)}
    inputs = layer_kwargs(cfg, facts, tokens.shape[1])
    devices = devices or [torch.device("cpu")]
    carry = carry or Carry(embed(source, facts, tokens))
    hidden, previous = carry.hidden, carry.previous
    window: deque[torch.Tensor] = deque(carry.window, maxlen=max(max_group - 1, 1))  # previous attention inputs
    kept = torch.linspace(0, tokens.numel() - 1, min(keep_tokens, tokens.numel())).long() if keep_tokens else None

    stage = reporter.stage("Calibrating", facts.num_layers - start)
    with torch.inference_mode(), frozen_heap(), stage as bar:
        for i in range(start, facts.num_layers):
            device = devices[i % len(devices)]
            layer = load_layer(source, facts, cfg, i).to(device)
            hidden = hidden.to(device)
            x = facts.attention_input(layer, hidden)  # [N, T, d]
            stats = LayerStats(i, gram={}, cross={})
            first = i - len(window) if max_group > 1 else i
            for split, rows in splits.items():
                xs = x[rows].reshape(-1, x.shape[-1]).double()
                stats.gram[split] = (xs.T @ xs).cpu()
                stats.cross[split] = {
                    first + k: (xs.T @ prev[rows].to(device).reshape(-1, x.shape[-1]).double()).cpu()
                    for k, prev in enumerate(window)
                } if max_group > 1 else {}
                stats.tokens[split] = xs.shape[0]
            key, value = facts.kv_outputs(layer.self_attn, x)
            stats.query_energy = query_energy(facts.query_outputs(layer.self_attn, x[splits["fit"]]), facts,
                                              inputs[i]["position_embeddings"][0].shape[-1]).cpu()
            held = splits["held_out"]
            stats.probe = x[held].float().cpu()
            here = kwargs_to(inputs[i], device)
            stats.quant_error = kept_errors(_attended_keys(layer.self_attn, key[held], here["position_embeddings"],
                                                           facts.head_dim), _heads(value[held], facts.head_dim),
                                            quant_group, quant_sink, quant_clip)
            current = {"hidden": hidden, "key": key, "value": value}
            if previous is not None:
                stats.cos_prev = {k: _token_cosine(current[k], previous[k].to(device)) for k in current}
            previous = current
            if kept is not None:
                stats.samples = {k: v.flatten(0, -2)[kept].float().clone()
                                 for k, v in {**current, "input": x}.items()}
            if max_group > 1:
                window.append(x)
            hidden = run_layer(layer, hidden, here, batch_size)
            del layer
            release_memory()
            bar.advance(f"layer {i}")
            yield stats, Carry(hidden, current, list(window) if max_group > 1 else [])

        norm = final_norm(source, facts)
        first_held = n - held_out
        result.final_hidden = norm(hidden[first_held:first_held + validation].cpu()).clone()


def query_energy(query: torch.Tensor, facts: ArchFacts, rotary_dim: int) -> torch.Tensor:
    """Per key channel [d_kv], Σ over the query heads reading its KV head of E[q_c²] (queries [N, T, H·hd]).

    A key error e moves the score of query q by qᵀ R e, R the RoPE rotation between the two positions. Over
    many positions the rotation mixes the two channels of each rotary pair (c, c + rd/2, transformers'
    rotate_half), so both get their mean energy; channels past the rotary dim are not rotated. Cross-channel
    terms average out for distinct frequencies and are dropped: a diagonal metric."""
    energy = _heads(query.double(), facts.head_dim).square().mean(dim=(0, 2))  # [H, hd]
    half = rotary_dim // 2
    pair = (energy[:, :half] + energy[:, half:rotary_dim]) / 2
    energy = torch.cat([pair, pair, energy[:, rotary_dim:]], dim=-1)
    return energy.view(facts.num_kv_heads, -1, facts.head_dim).sum(1).flatten()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[N, T, h·hd] → [N, h, T, hd]."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _attended_keys(attn, key: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], head_dim: int) -> torch.Tensor:
    """Raw keys [N, T, d_kv] as the cache holds them: the family's k_norm (per head or over all heads, by its
    width), then RoPE at the sequence positions."""
    norm = getattr(attn, "k_norm", None)
    if norm is not None:
        key = norm(key.unflatten(-1, (-1, norm.weight.shape[-1]))).flatten(-2)
    return apply_rope(_heads(key, head_dim), *rope)


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of cos(a_t, b_t) — the per-token similarity the CommonKV paper plots."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean())
