"""CommonKV decoder with a real latent KV cache.

Self-contained (imports only torch and transformers): this file is copied into every converted
checkpoint and loaded with `trust_remote_code=True` where the commonkv package is not installed.

A converted layer does not project keys and values from its input. It computes (or reuses) a latent
`c = A_g x` of width r, shared by the layers of group g, and stores only that latent:

    keys   = RoPE(k_norm(B_k c + b_k))          reconstructed for every cached token
    values = softmax(q kᵀ) · C, then B_v per KV head   ("matrix fusion": attention runs over the latent)

In an `anchor` merged group only the anchor (first layer) stores its latent; the other layers read it and
allocate nothing. In a `weighted` merged group (the CommonKV paper's merge) every layer keeps its own latents
for the first S tokens (sinks) and the most recent ones, and older tokens are stored once for the group as
the calibrated weighted sum Σ_l w_l c^l (see `WeightedLayer`). The merge mode is fixed at conversion time:
the two modes use different factors.

Positions: keys are rotated at their cache slot index and queries at theirs, so scores depend only on slot
differences, which equal position differences for every real token (left padding included), because RoPE
scores are invariant to a common shift.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

try:  # the checkpoint copy imports its sibling; the package imports the module in its own folder
    from .configuration_commonkv import WEIGHTED_DEFAULTS, CheckpointError, CommonKVConfig, LayerRole
    from .eviction import keep_indices, window_scores
    from .quantization import CompressedKVLayer, CompressedLatentLayer
except ImportError:  # pragma: no cover - flat import when loaded as a plain module
    from configuration_commonkv import WEIGHTED_DEFAULTS, CheckpointError, CommonKVConfig, LayerRole
    from eviction import keep_indices, window_scores
    from quantization import CompressedKVLayer, CompressedLatentLayer


# transformers >= 5.2x names the cache argument `cache` (generate() passes it so) and deprecates
# `past_key_values`; older releases know only `past_key_values`. The model accepts both names.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as cache= or past_key_values=, not both.")
    return cache if cache is not None else past_key_values


# ----------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------
class LatentLayer(CacheLayerMixin):
    """Cache layer that stores one latent `[B, 1, T, r]` instead of keys and values."""

    is_sliding = False
    is_croppable = True
    _layer_type = "commonkv_latent"

    def __init__(self, **kwargs):
        super().__init__()
        self.latent: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.latent = key_states.new_empty((key_states.shape[0], 1, 0, key_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states=None, *args, **kwargs):
        """Append `[B, 1, t, r]` latents; returns the whole latent `[B, 1, T, r]` (second item unused)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        self.latent = torch.cat([self.latent, key_states], dim=-2)
        return self.latent, None

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent] if self.latent is not None else []

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.latent is None else self.latent.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        if self.latent is not None:
            self.latent = self.latent.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.latent is not None and self.latent.device != self.device:
            self.latent = self.latent.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.latent = None
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens; a negative value removes that many from the end (transformers')."""
        if self.latent is None:
            return
        keep = max_length if max_length >= 0 else self.get_seq_length() + max_length
        self.latent = self.latent[..., :max(keep, 0), :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.latent is not None:
            self.latent = self.latent.index_select(0, beam_idx.to(self.latent.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.latent is not None:
            self.latent = self.latent.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.latent is not None:
            self.latent = self.latent[indices, ...]


class WeightedGroup:
    """State shared by the layers of one weighted group: the merged latent and the block being merged."""

    def __init__(self, group: dict):
        self.layers = list(group["layers"])
        self.weights = dict(zip(self.layers, (float(w) for w in group["weights"])))
        self.sink, self.window, self.block = (int(group.get(k, v)) for k, v in WEIGHTED_DEFAULTS.items())
        self.merged: torch.Tensor | None = None  # [B, 1, T_m, r], owned by the anchor's cache layer
        self.pending: torch.Tensor | None = None  # Σ_l w_l c^l of the tokens being folded, during a forward

    def fold(self, layer: int, latents: torch.Tensor) -> None:
        """Add layer `layer`'s share of the folded tokens; the group's last layer appends the merged block."""
        part = latents * self.weights[layer]
        self.pending = part if self.pending is None else self.pending + part
        if layer == self.layers[-1]:
            self.merged = self.pending if self.merged is None else torch.cat([self.merged, self.pending], dim=-2)
            self.pending = None


class WeightedLayer(CacheLayerMixin):
    """One layer of a weighted group: its own sink and recent latents; the anchor's also owns the merged one.

    The layer attends over cat(sinks, merged, recent + new) in token order, so cache slots stay positions.
    After attending, once its recent part holds ≥ W + K tokens, whole blocks of K (all but the last W..W+K-1)
    are folded into the group's merged latent, so a long prefill attends with exact own latents.
    Sinks and fold points are cache slots, shared by the rows of a batch: a left-padded row counts its padding
    as tokens (its sinks may be padding), so it matches the same prompt run alone with the same padding.
    """

    is_sliding = False
    is_croppable = False
    _layer_type = "commonkv_weighted"

    def __init__(self, group: WeightedGroup | None = None, layer: int = 0, **kwargs):
        super().__init__()
        self.group, self.layer = group, layer
        self.owner = group is not None and layer == group.layers[0]
        self.sinks: torch.Tensor | None = None  # [B, 1, ≤S, r]
        self.recent: torch.Tensor | None = None  # [B, 1, n, r]
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.new_empty((key_states.shape[0], 1, 0, key_states.shape[-1]))
        self.sinks, self.recent = empty, empty
        if self.owner:
            self.group.merged = empty
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states=None, *args, **kwargs):
        """Add `[B, 1, t, r]` new latents (sinks first); returns the sequence `[B, 1, T, r]` to attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        take = min(self.group.sink - self.sinks.shape[-2], key_states.shape[-2])
        if take > 0:
            self.sinks = torch.cat([self.sinks, key_states[..., :take, :]], dim=-2)
        self.recent = torch.cat([self.recent, key_states[..., max(take, 0):, :]], dim=-2)
        self.length += key_states.shape[-2]
        return self.sequence(), None

    def sequence(self) -> torch.Tensor:
        return torch.cat([self.sinks, self.group.merged, self.recent], dim=-2)

    def fold(self) -> None:
        """After attending: move whole blocks of K old recent latents into the group's merged latent."""
        g = self.group
        held = self.recent.shape[-2]
        if held < g.window + g.block:
            return
        n = (held - g.window) // g.block * g.block
        g.fold(self.layer, self.recent[..., :n, :])
        self.recent = self.recent[..., n:, :].clone()  # a fresh storage: the folded part is freed

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.sinks, self.recent) if t is not None]
        if self.owner and self.group.merged is not None:
            out.append(self.group.merged)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def _apply(self, fn) -> None:
        self.sinks, self.recent = fn(self.sinks), fn(self.recent)
        if self.owner:
            self.group.merged = fn(self.group.merged)

    def offload(self):
        if self.is_initialized:
            self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.sinks.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.sinks = self.recent = None
        if self.owner:
            self.group.merged = None
        self.length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t[indices, ...])


class CommonKVCache(Cache):
    """Per layer: keys/values (`keep`), one latent (`per_layer`, merged anchors) or nothing (merged others).

    With the runtime options of `config.kv_options()` the storing layers are quantized and/or evicted
    (`quantization.py`, `eviction.py`). After eviction a cache slot is no longer a position: `evicted` tokens are
    gone from every storing layer (all keep the same count), latent layers keep their context tokens' positions
    to rotate keys with, and new tokens continue at the true position `evicted + slot`.
    """

    def __init__(self, config: CommonKVConfig):
        self.roles = config.layer_roles()
        self.options = config.kv_options()
        self.evicted = 0  # tokens removed from every storing layer by eviction
        self.kept_mask: torch.Tensor | None = None  # [B, budget + window] padding mask of the kept prompt tokens
        self.scores: dict[int, torch.Tensor] | None = None  # storing layer → eviction scores, during a prefill
        self.padding: torch.Tensor | None = None
        groups = {g: WeightedGroup(group) for g, group in enumerate(config.commonkv["groups"])
                  if group["mode"] == "merged" and group.get("merge", "anchor") == "weighted"}
        layers = []
        for role in self.roles:
            if role.group in groups:
                layers.append(WeightedLayer(groups[role.group], role.layer))
            elif not role.stores:
                layers.append(DummyLayer())
            elif self.options is not None:
                o = self.options
                layers.append(CompressedLatentLayer(o.bits, o.group, o.residual, o.latent_axis) if role.latent
                              else CompressedKVLayer(o.bits, o.group, o.residual))
            elif role.latent:
                layers.append(LatentLayer())
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)
        # KVSharer: the keys/values a source layer attended over, held in this forward only, for the layers that
        # reuse them, until the last of those has run (for a kept source, references to its own cache)
        self.readers: dict[int, int] = {}  # source layer → its last sharer
        for role in self.roles:
            if role.borrow >= 0:
                self.readers[role.borrow] = max(self.readers.get(role.borrow, -1), role.layer)
        self.lent: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lend(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer_idx in self.readers:
            self.lent[layer_idx] = (key, value)

    def borrow(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values a KVSharer layer attends over: its source's, from this forward."""
        source = self.roles[layer_idx].borrow
        kv = self.lent[source]
        if self.readers[source] == layer_idx:
            del self.lent[source]
        return kv

    # ---- runtime compression: eviction scores during a long prefill, then evict and quantize after it ----
    def begin(self, q_len: int, attention_mask: torch.Tensor | None) -> None:
        """Start a forward of `q_len` tokens: a first prefill longer than budget + window is scored for eviction."""
        o = self.options
        prefill = o is not None and o.budget is not None and self.get_seq_length() == 0 and not self.evicted
        self.scores = {} if prefill and q_len > o.budget + o.window else None
        if self.scores is not None and attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("Eviction needs a 2-D attention mask (or None) on the prefill.")
        self.padding = attention_mask if self.scores is not None else None

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Add a reading layer's observation-window attention to the scores of the layer it reads."""
        if self.scores is None:
            return
        source = self.roles[layer_idx].source
        scores = window_scores(query, key, scaling, self.options.window, self.padding)
        self.scores[source] = scores if source not in self.scores else self.scores[source] + scores

    def finish(self) -> None:
        """End of a forward: evict after a scored prefill, then quantize what left the recent window."""
        if self.options is None:
            return
        if self.scores:
            o = self.options
            shared = keep_indices(sum(self.scores.values()), o.budget, o.window, o.pool, self.padding) \
                if o.scope == "model" else None
            for layer_idx, scores in self.scores.items():
                index = shared if shared is not None else keep_indices(scores, o.budget, o.window, o.pool, self.padding)
                self.layers[layer_idx].evict(index, o.budget, self.roles[layer_idx].latent)
            prompt = scores.shape[-1]
            self.evicted = prompt - o.budget - o.window
            mask = self.padding if self.padding is not None else torch.ones_like(scores, dtype=torch.bool)
            self.kept_mask = mask.bool().gather(1, index)  # padding kept is the leftmost, the same in every layer
        self.scores = self.padding = None
        for layer in self.layers:
            if isinstance(layer, (CompressedLatentLayer, CompressedKVLayer)):
                layer.compress()

    def slot_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A caller's 2-D mask over true positions → over cache slots (after eviction)."""
        if not self.evicted or attention_mask is None:
            return attention_mask
        if attention_mask.dim() != 2:
            raise ValueError("After eviction only a 2-D attention mask (or None) can be passed.")
        kept = self.kept_mask.to(attention_mask.dtype)
        return torch.cat([kept, attention_mask[:, self.evicted + kept.shape[1]:]], dim=1)

    def key_rope(self, layer_idx: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the keys a latent layer rebuilds: the table itself, or gathered at the kept positions."""
        source = self.layers[self.roles[layer_idx].source]
        if not self.evicted:
            return cos, sin
        held = source.get_seq_length()
        tail = torch.arange(self.evicted + source.positions.shape[1], self.evicted + held, device=cos.device)
        positions = torch.cat([source.positions.long(), tail.expand(source.positions.shape[0], -1)], dim=1)
        return cos[0][positions], sin[0][positions]

    def latent(self, layer_idx: int) -> torch.Tensor:
        """The latent a layer attends over: its own, or its merged group's anchor's (already updated)."""
        source = self.layers[self.roles[layer_idx].source]
        if isinstance(source, WeightedLayer):
            return source.sequence()
        if source.latent is None:
            raise RuntimeError(f"layer {layer_idx} reads the latent of layer {self.roles[layer_idx].source}, "
                               "which has not run yet in this forward pass.")
        return source.latent

    def nbytes(self) -> int:
        """Bytes held by the cache, counted once per unique storage (what the memory really holds)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            tensors = layer.tensors() if hasattr(layer, "tensors") else [layer.keys, layer.values]
            for t in tensors:
                if t is not None and t.numel():
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------
class CommonKVRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class CommonKVMLP(nn.Module):
    def __init__(self, config: CommonKVConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class KVGroup(nn.Module):
    """The down-projection A_g (r × d) shared by the layers of one group."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, h, T, hd]; cos/sin: [B or 1, T, hd]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, h_kv, T, e] → [B, h_kv·n_rep, T, e], each KV head repeated for the query heads that read it."""
    if n_rep == 1:
        return x
    b, h, t, e = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, e).reshape(b, h * n_rep, t, e)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention that accepts a value width different from the key width (latent values)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class CommonKVAttention(nn.Module):
    def __init__(self, config: CommonKVConfig, role: LayerRole):
        super().__init__()
        arch = config.arch
        self.config = config
        self.role = role
        self.layer_idx = role.layer
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.sliding_window = (
            config.sliding_window if config.layer_types[role.layer] == "sliding_attention" else None
        )
        d, d_kv = config.hidden_size, self.num_kv_heads * self.head_dim
        qkv_bias = arch.get("qkv_bias", config.attention_bias)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=arch.get("o_bias", config.attention_bias))
        if role.latent:
            self.k_up = nn.Linear(role.rank, d_kv, bias=True)
            self.v_up = nn.Linear(role.rank, d_kv, bias=True)
        elif role.stores:  # (a KVSharer layer that borrows its source's keys and values has no projections)
            self.k_proj = nn.Linear(d, d_kv, bias=qkv_bias)
            self.v_proj = nn.Linear(d, d_kv, bias=qkv_bias)
        if arch.get("qk_norm", False):
            self.q_norm = CommonKVRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            if role.borrow < 0:
                self.k_norm = CommonKVRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, name, None)
        return norm(x) if norm is not None else x

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, q, d], after the input norm
        rope: tuple[torch.Tensor, torch.Tensor],  # cos/sin [B|1, T, hd] for every slot 0..T-1
        attention_mask: torch.Tensor | None,
        cache: CommonKVCache,
        down: nn.Module | None,
    ) -> torch.Tensor:
        b, q_len, _ = hidden_states.shape
        cos, sin = rope
        query = self._norm("q_norm", self.q_proj(hidden_states).view(b, q_len, -1, self.head_dim)).transpose(1, 2)
        query = apply_rope(query, cos[:, -q_len:], sin[:, -q_len:])

        if self.role.latent:
            layer_cache = cache.layers[self.layer_idx]
            if self.role.stores:
                layer_cache.update(down(hidden_states).unsqueeze(1))
            latent = cache.latent(self.layer_idx)  # [B, 1, T, r]
            key = self.k_up(latent).view(b, -1, self.num_kv_heads, self.head_dim)
            key = apply_rope(self._norm("k_norm", key).transpose(1, 2), *cache.key_rope(self.layer_idx, cos, sin))
            cache.observe(self.layer_idx, query, key, self.scaling)
            lends = self.layer_idx in cache.readers  # KVSharer `source` path: sharers reuse these keys/values
            if self._use_fused(q_len, latent.shape[-1]) and not lends:
                out = self._fused_output(query, key, latent, attention_mask)
            else:
                value = self.v_up(latent).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
                cache.lend(self.layer_idx, key, value)
                out = self.o_proj(self._attend(query, key, value, attention_mask)[0].reshape(b, q_len, -1))
            if isinstance(layer_cache, WeightedLayer):
                layer_cache.fold()  # after attending: this forward used the layer's own latents
            return out
        elif self.role.stores:
            shape = (b, q_len, -1, self.head_dim)
            key = self._norm("k_norm", self.k_proj(hidden_states).view(shape)).transpose(1, 2)
            key = apply_rope(key, cos[:, -q_len:], sin[:, -q_len:])
            value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            key, value = cache.layers[self.layer_idx].update(key, value)
            cache.lend(self.layer_idx, key, value)
            cache.observe(self.layer_idx, query, key, self.scaling)
        else:  # KVSharer: attend over the source layer's keys and values as it attended over them
            key, value = cache.borrow(self.layer_idx)
            cache.observe(self.layer_idx, query, key, self.scaling)

        out, _ = self._attend(query, key, value, attention_mask)
        return self.o_proj(out.reshape(b, q_len, -1))

    def _use_fused(self, q_len: int, rank: int) -> bool:
        """value_path "auto": attend over the latent only where it is cheaper than rebuilding the values.

        Fused costs q·T·H·r for the attention-value product; explicit costs T·r·d_kv to rebuild V plus q·T·H·hd.
        So decode (q = 1) fuses and a long prefill does not (its output would be H·r wide per token).
        """
        path = self.config.commonkv.get("value_path", "auto")
        if path != "auto":
            return path == "fused"
        return q_len * self.num_heads * (rank - self.head_dim) < rank * self.num_kv_heads * self.head_dim

    def _attend(self, query, key, value, attention_mask):
        impl = self.config._attn_implementation
        if impl == "eager" or value.shape[-1] != key.shape[-1] and impl != "sdpa":
            fn: Callable = eager_attention
        else:
            fn = ALL_ATTENTION_FUNCTIONS[impl]
        return fn(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0,
                  sliding_window=self.sliding_window)

    def _fused_output(self, query, key, latent, attention_mask) -> torch.Tensor:
        """softmax(q kᵀ)·C in latent space, then each query head's KV-head slice of B_v, then o_proj."""
        b, _, q_len, _ = query.shape
        value = latent.expand(-1, self.num_kv_heads, -1, -1)  # a view: no copy of the latent
        out, _ = self._attend(query, key, value, attention_mask)  # [B, q, H, r]
        out = out.reshape(b, q_len, self.num_kv_heads, self.num_key_value_groups, -1)
        w = self.v_up.weight.view(self.num_kv_heads, self.head_dim, -1)  # [h_kv, hd, r]
        out = torch.einsum("bqjnr,jdr->bqjnd", out, w) + self.v_up.bias.view(1, 1, self.num_kv_heads, 1, -1)
        return self.o_proj(out.reshape(b, q_len, -1))


class CommonKVDecoderLayer(nn.Module):
    def __init__(self, config: CommonKVConfig, role: LayerRole):
        super().__init__()
        self.self_attn = CommonKVAttention(config, role)
        self.mlp = CommonKVMLP(config)
        self.input_layernorm = CommonKVRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = CommonKVRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, rope, attention_mask, cache, down) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), rope, attention_mask, cache, down)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
class CommonKVPreTrainedModel(PreTrainedModel):
    config_class = CommonKVConfig
    config: CommonKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["CommonKVDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, but a weight missing from the shards (or of the wrong shape) is an error: a
        randomly initialized up-projection would generate garbage without a word."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as err:  # transformers refuses tensors whose shape differs from the model's
            if "mismatched" not in str(err):
                raise
            raise CheckpointError("The checkpoint holds weights of the wrong shape for its config: it is damaged. "
                                  "To resolve, convert the model again.") from None
        missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise CheckpointError(f"The checkpoint lacks {len(missing)} weight(s) the runtime needs or holds them with the "
                             f"wrong shape ({shown}): it is damaged or incomplete. To resolve, convert the model again.")
        return (model, info) if want_info else model


class CommonKVModel(CommonKVPreTrainedModel):
    def __init__(self, config: CommonKVConfig):
        super().__init__(config)
        config.check_block()
        config.warn_untested_transformers()
        roles = config.layer_roles()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CommonKVDecoderLayer(config, role) for role in roles])
        self.kv_groups = nn.ModuleDict({
            str(g): KVGroup(config.hidden_size, int(group["rank"]))
            for g, group in enumerate(config.commonkv["groups"])
            if group["mode"] != "keep"
        })
        self.norm = CommonKVRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,  # ignored: see the module docstring on positions
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,  # attention-backend extras from generate(); not used by this model
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._cache_for(_one_cache(cache, past_key_values))

        past_len, q_len = cache.get_seq_length(), inputs_embeds.shape[1]
        cache.begin(q_len, attention_mask)
        slots = torch.arange(cache.evicted + past_len + q_len, device=inputs_embeds.device).unsqueeze(0)
        rope = self.rotary_emb(inputs_embeds, slots)  # every true position (slots + evicted tokens)
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "position_ids": slots[:, -q_len:],
                       "attention_mask": cache.slot_mask(attention_mask), _MASK_CACHE_ARG: cache}
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        for i, layer in enumerate(self.layers):
            role = layer.self_attn.role
            down = self.kv_groups[str(role.group)].down if role.latent else None
            mask = masks[self.config.layer_types[i]]
            hidden_states = layer(hidden_states, rope, mask, cache, down)
        cache.finish()
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       **{_OUTPUT_CACHE_FIELD: cache if use_cache else None})

    def _cache_for(self, past_key_values: Cache | None) -> CommonKVCache:
        """Our cache, also when generate() or a caller hands us an empty stock cache."""
        if isinstance(past_key_values, CommonKVCache):
            return past_key_values
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            return CommonKVCache(self.config)
        raise ValueError(
            "A CommonKV model needs its own CommonKVCache; a filled cache of another type cannot be continued. "
            "To resolve, pass past_key_values=None (or an empty cache) on the first call."
        )


class CommonKVForCausalLM(CommonKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CommonKVConfig):
        super().__init__(config)
        self.model = CommonKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("return_dict", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                             use_cache=use_cache)
        hidden_states, cache = outputs.last_hidden_state, getattr(outputs, _OUTPUT_CACHE_FIELD)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache})


__all__ = ["CommonKVForCausalLM", "CommonKVModel", "CommonKVCache", "LatentLayer", "WeightedLayer",
           "CommonKVPreTrainedModel"]
