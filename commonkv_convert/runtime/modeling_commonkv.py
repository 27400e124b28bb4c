"""CommonKV: a family's own transformers decoder whose attention stores a real latent KV cache.

Self-contained (imports only torch and transformers): this file is copied into every converted checkpoint and
loaded with `trust_remote_code=True` where the commonkv package is not installed.

The model is the base family's transformers model (`config.base_model_type`: LlamaModel, Gemma3TextModel,
MixtralModel, ...): its embeddings, norms, MLP/MoE, masks, sliding windows and rotary embedding run unchanged.
Only each layer's `self_attn` is replaced (`CommonKVAttention`) and the cache is a `CommonKVCache`. A converted
layer does not project keys and values from its input. It computes (or reuses) a latent `c = A_g x` of width r,
shared by the layers of group g, and stores only that latent:

    keys   = RoPE(k_norm(B_k c + b_k))          reconstructed for every cached token
    values = softmax(q kᵀ) · C, then B_v per KV head   ("matrix fusion": attention runs over the latent)

In an `anchor` merged group only the anchor (first layer) stores its latent; the other layers read it and
allocate nothing. In a `weighted` merged group (the CommonKV paper's merge) every layer keeps its own latents
for the first S tokens (sinks) and the most recent ones, and older tokens are stored once for the group as
the calibrated weighted sum Σ_l w_l c^l (see `WeightedLayer`). The merge mode is fixed at conversion time:
the two modes use different factors. A `latent_values` layer keeps its keys as the family computes them (so
nothing is rebuilt per step) and stores a latent of its values only, attended over as above. What a layer stores
and where it reads from is its cache layer's business
(`LatentLayer`, `ReaderLayer`, `WeightedLayer`, `BorrowLayer`, the quantized/evicted layers of `quantization.py`).

Positions: keys are rotated at their cache slot index and queries at theirs, so scores depend only on slot
differences, which equal position differences for every real token (left padding included), because RoPE
scores are invariant to a common shift. So `CommonKVForCausalLM` hands the base model slot positions, never the
caller's `position_ids`. After eviction a slot is no longer a position: see `CommonKVCache`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_MAPPING

try:  # the checkpoint copy imports its sibling; the package imports the module in its own folder
    from .configuration_commonkv import WEIGHTED_DEFAULTS, CheckpointError, CommonKVConfig, KVCacheOptions, LayerRole
    from .eviction import keep_indices, window_scores
    from .quantization import CompressedKVLayer, CompressedLatentLayer, Workspace
except ImportError:  # pragma: no cover - flat import when loaded as a plain module
    from configuration_commonkv import WEIGHTED_DEFAULTS, CheckpointError, CommonKVConfig, KVCacheOptions, LayerRole
    from eviction import keep_indices, window_scores
    from quantization import CompressedKVLayer, CompressedLatentLayer, Workspace


# transformers >= 5.2x names the cache argument `cache` (generate() passes it so) and deprecates
# `past_key_values`; older releases know only `past_key_values`. Every forward here accepts both names.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as cache= or past_key_values=, not both.")
    return cache if cache is not None else past_key_values


def _cache_arg(forward: Callable) -> str:
    """How a transformers forward names its cache argument in the installed release."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


# ----------------------------------------------------------------------------------------------------------
# Cache layers: what each decoder layer stores, and what it hands its attention to attend over
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
    After each forward (`CommonKVCache.finish`), once its recent part holds ≥ W + K tokens, whole blocks of K
    (all but the last W..W+K-1) are folded into the group's merged latent, so a long prefill attends with exact
    own latents.
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
        """After the forward: move whole blocks of K old recent latents into the group's merged latent."""
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


class ReaderLayer(DummyLayer):
    """Stores nothing; hands over another layer's latent: a merged group's non-anchor layer, or a KVSharer layer
    that reads a latent source through its own up-projections (`refit`). Bytes: 0."""

    def __init__(self, source: CacheLayerMixin, source_idx: int):
        super().__init__()
        self.source, self.source_idx = source, source_idx

    def update(self, key_states=None, value_states=None, *args, **kwargs):
        """Returns the source's whole latent `[B, 1, T, r]` (already updated in this forward)."""
        latent = self.source.latent
        if latent is None:
            raise RuntimeError(f"a layer reads the latent of layer {self.source_idx}, which has not run yet in this "
                               "forward pass.")
        return latent, None


class Handover:
    """The keys/values a KVSharer source attended over in this forward, held until its last sharer has read them
    (for a kept source, references to its own cache)."""

    def __init__(self, last_reader: int):
        self.last_reader = last_reader
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def take(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv
        if layer_idx == self.last_reader:
            self.kv = None
        return kv


class BorrowLayer(DummyLayer):
    """KVSharer: stores nothing; hands over the keys/values its source attended over, as they are. Bytes: 0."""

    def __init__(self, handover: Handover, layer_idx: int):
        super().__init__()
        self.handover, self.layer_idx = handover, layer_idx

    def update(self, key_states=None, value_states=None, *args, **kwargs):
        return self.handover.take(self.layer_idx)


class CommonKVCache(Cache):
    """Per layer: keys/values (`keep`), one latent (`per_layer`, merged anchors) or nothing (merged others, sharers).

    A storing layer is quantized and/or evicted as `config.layer_options` says (the checkpoint's per-group bits and
    the load-time `kv_cache` options; `quantization.py`, `eviction.py`). After eviction a cache slot is no longer a
    position: `evicted` tokens are gone from every storing layer (all keep the same count), latent layers keep their
    context tokens' positions to rotate keys with (`key_positions`), and new tokens continue at the true position
    `evicted + slot`.
    `CommonKVForCausalLM` calls `begin` and `finish` around each forward of the base model.
    """

    def __init__(self, config: CommonKVConfig):
        self.roles = config.layer_roles()
        self.options = config.kv_options()  # the load-time options: eviction is one decision for every layer
        self.evicted = 0  # tokens removed from every storing layer by eviction
        self.kept_mask: torch.Tensor | None = None  # [B, budget + window] padding mask of the kept prompt tokens
        self.scores: dict[int, torch.Tensor] | None = None  # storing layer → eviction scores, during a prefill
        self.padding: torch.Tensor | None = None
        self.rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # this forward's, see `key_rope`
        self.workspace = Workspace()  # this forward's dequantized streams
        last_reader: dict[int, int] = {}  # KVSharer source layer → its last sharer
        for role in self.roles:
            if role.borrow >= 0:
                last_reader[role.borrow] = max(last_reader.get(role.borrow, -1), role.layer)
        self.handovers = {source: Handover(last) for source, last in last_reader.items()}
        groups = {g: WeightedGroup(group) for g, group in enumerate(config.commonkv["groups"])
                  if group["mode"] == "merged" and group.get("merge", "anchor") == "weighted"}
        layers: list = []
        for role in self.roles:
            layers.append(self._layer(role, config.layer_options(role), config.layer_tail(role), groups, layers))
        super().__init__(layers=layers)

    def _layer(self, role: LayerRole, o: KVCacheOptions | None, tail: tuple[int, int] | None,
               groups: dict[int, WeightedGroup], earlier: list):
        """The cache layer of one decoder layer, stored as `o` and its latent's `tail` say (earlier: those of the
        layers before it)."""
        if role.group in groups:
            return WeightedLayer(groups[role.group], role.layer)
        if role.borrow >= 0:
            return BorrowLayer(self.handovers[role.borrow], role.layer)
        if not role.stores:
            return ReaderLayer(earlier[role.source], role.source)
        if o is not None:
            if role.latent:
                return CompressedLatentLayer(o.bits, o.group, o.residual, o.latent_axis, self.workspace, o.sink, tail,
                                             o.clip)
            if role.value_latent:  # keys per channel, the value latent as a latent layer stores one
                return CompressedKVLayer(o.bits, o.group, o.residual, self.workspace, value_axis=o.latent_axis,
                                         sink=o.sink, clip=o.clip)
            lends = role.layer in self.handovers  # its keys/values are read after later layers have dequantized
            return CompressedKVLayer(o.bits, o.group, o.residual, None if lends else self.workspace, sink=o.sink,
                                     clip=o.clip)
        return LatentLayer() if role.latent else DynamicLayer()  # DynamicLayer: keys, and values or a value latent

    # ---- around each forward: eviction scores during a long prefill, then evict, fold and quantize after it ----
    def begin(self, q_len: int, attention_mask: torch.Tensor | None) -> None:
        """Start a forward of `q_len` tokens: a first prefill longer than budget + observe is scored for eviction."""
        o = self.options
        prefill = o is not None and o.budget is not None and self.get_seq_length() == 0 and not self.evicted
        self.scores = {} if prefill and q_len > o.budget + o.observe else None
        if self.scores is not None and attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("Eviction needs a 2-D attention mask (or None) on the prefill.")
        self.padding = attention_mask if self.scores is not None else None

    def attending(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float) -> None:
        """What a layer is about to attend over (query, keys and values, RoPE applied): its observation-window
        attention is added to the eviction scores of the layer it reads, and a KVSharer source holds its keys and
        values for the layers that reuse them."""
        if layer_idx in self.handovers:
            self.handovers[layer_idx].kv = (key, value)
        if self.scores is None:
            return
        source = self.roles[layer_idx].source
        scores = window_scores(query, key, scaling, self.options.observe, self.padding)
        self.scores[source] = scores if source not in self.scores else self.scores[source] + scores

    def finish(self) -> None:
        """End of a forward: evict after a scored prefill, fold weighted groups, quantize what left the window."""
        if self.scores:
            self._evict()
        self.scores = self.padding = None
        self.rope_tables = {}
        self.workspace.clear()
        for layer in self.layers:
            if isinstance(layer, WeightedLayer):
                layer.fold()  # after the whole forward: every layer attended with its own latents
            elif isinstance(layer, (CompressedLatentLayer, CompressedKVLayer)):
                layer.compress()

    def _evict(self) -> None:
        o = self.options
        shared = keep_indices(sum(self.scores.values()), o.budget, o.observe, o.pool, self.padding) \
            if o.scope == "model" else None
        for layer_idx, scores in self.scores.items():
            index = shared if shared is not None else keep_indices(scores, o.budget, o.observe, o.pool, self.padding)
            self.layers[layer_idx].evict(index, o.budget, self.roles[layer_idx].latent)
        self.evicted = scores.shape[-1] - o.budget - o.observe
        mask = self.padding if self.padding is not None else torch.ones_like(scores, dtype=torch.bool)
        self.kept_mask = mask.bool().gather(1, index)  # padding kept is the leftmost, the same in every layer

    # ---- positions ------------------------------------------------------------------------------------------
    def slot_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A caller's 2-D mask over true positions → over cache slots (after eviction)."""
        if not self.evicted or attention_mask is None:
            return attention_mask
        if attention_mask.dim() != 2:
            raise ValueError("After eviction only a 2-D attention mask (or None) can be passed.")
        kept = self.kept_mask.to(attention_mask.dtype)
        return torch.cat([kept, attention_mask[:, self.evicted + kept.shape[1]:]], dim=1)

    def query_positions(self, q_len: int, device: torch.device) -> torch.Tensor:
        """True positions [1, q] of the tokens a forward adds: slots, shifted by the evicted tokens."""
        start = self.evicted + self.get_seq_length()
        return torch.arange(start, start + q_len, device=device).unsqueeze(0)

    def key_positions(self, layer_idx: int, device: torch.device) -> torch.Tensor:
        """True positions [B|1, T] of the keys a latent layer rebuilds: its slots, or the kept positions followed by
        the tokens added since the eviction."""
        source = self.layers[self.roles[layer_idx].source]
        held = source.get_seq_length()
        if not self.evicted:
            return torch.arange(held, device=device).unsqueeze(0)
        kept = source.positions.long()
        tail = torch.arange(self.evicted + kept.shape[1], self.evicted + held, device=device)
        return torch.cat([kept, tail.expand(kept.shape[0], -1)], dim=1)

    def key_rope(self, layer_idx: int, rotary: nn.Module, x: torch.Tensor,
                 layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at the positions of the keys a latent layer rebuilds (`key_positions`). The tables depend only
        on the positions, so within one forward the latent layers reading the same ones share one computation
        (before eviction: every latent layer of a layer type) instead of each redoing T positions per step."""
        source = self.roles[layer_idx].source
        key = (layer_type, source if self.evicted else None, self.layers[source].get_seq_length(), x.dtype, x.device)
        if key not in self.rope_tables:
            self.rope_tables[key] = rope_at(rotary, x, self.key_positions(layer_idx, x.device), layer_type)
        return self.rope_tables[key]

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
# Attention
# ----------------------------------------------------------------------------------------------------------
class KVGroup(nn.Module):
    """The down-projection A_g (r × d) shared by the layers of one group."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, h, T, hd]; cos/sin: [B or 1, T, rd]. The first rd ≤ hd features rotate (partial rotary, as Phi-3).

    x·cos + rotate_half(x)·sin (rotate_half(x) = [−x₂, x₁]), written as one product and two in-place half-width updates: a decode step
    rotates every rebuilt key of every latent layer, and the textbook form makes five passes over them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    half = rd // 2
    out = x * cos if rd == x.shape[-1] else torch.cat([x[..., :rd] * cos, x[..., rd:]], dim=-1)
    out[..., :half].addcmul_(x[..., half:rd], sin[..., :half], value=-1)
    out[..., half:rd].addcmul_(x[..., :half], sin[..., half:])
    return out


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """softmax(q kᵀ)·V as two batched products: [B, H, q, hd] queries, [B, h_kv, T, hd] keys, values [B, h_kv, T, n]
    or one latent [B, 1, T, r] that every head reads → [B, q, H, n].

    All query heads of a KV head (or, for a latent, all H·q rows) meet their values in one product per sequence,
    so a latent is read once, not once per head as a general attention function reads (expanded) values. For
    decode on a CPU it also beats SDPA over per-head values (one token against 2k–8k cached ones, SmolLM2 and
    Qwen2.5-0.5B head shapes, 2 threads: 1.2–2.7× faster). `mask` is transformers' attention mask, boolean (True
    attends) or additive, [B|1, 1, q, ≥T]; None means causal.
    """
    b, heads, q_len, hd = query.shape
    kv_heads, tokens, value_heads = key.shape[1], key.shape[2], value.shape[1]
    scores = (query * scaling).reshape(b, kv_heads, heads // kv_heads * q_len, hd) @ key.transpose(-1, -2)
    scores = scores.view(b, kv_heads, heads // kv_heads, q_len, tokens)
    if mask is None and q_len > 1:  # the new tokens are the last q: query i sees keys up to T - q + i
        mask = torch.ones(1, 1, q_len, tokens, dtype=torch.bool, device=query.device).tril(tokens - q_len)
    if mask is not None:
        mask = mask[..., :tokens].unsqueeze(1)  # [B|1, 1, 1, q, T]: broadcast over KV heads and their query heads
        # the dtype's minimum, not -inf: a padding query that may attend nothing averages, as eager attention does
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = probs.view(b, value_heads, heads * q_len // value_heads, tokens) @ value  # rows: KV head, its heads, q
    return out.view(b, heads, q_len, -1).transpose(1, 2)


def rope_at(rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor,
            layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of a family's rotary embedding at `positions` [B|1, T]; families with one rope per layer type
    (Gemma-3: local and global) take the layer's type."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(x, positions, layer_type)
    return rotary(x, positions)


class CommonKVAttention(nn.Module):
    """A family's attention with K/V from the cache plan; q/o projections, q/k norms, scaling and the attention
    function are the family's own (taken over from the attention module it replaces).

    Submodules by role: `k_up`/`v_up` (latent layers: B_k, B_v with the source biases), `k_proj`/`v_proj` (kept
    layers), `k_proj`/`v_up` (latent_values layers), neither (KVSharer layers that attend over their source's keys
    and values).
    """

    def __init__(self, config: CommonKVConfig, role: LayerRole, family: nn.Module, model: nn.Module,
                 lends: bool = False):
        super().__init__()
        self.role, self.layer_idx = role, role.layer
        self.config = family.config  # the base config: attention implementation, as the family's attention reads it
        self.plan = config.commonkv  # read at run time: `value_path` may be switched on a loaded model
        self.head_dim, self.scaling, self.is_causal = family.head_dim, family.scaling, True
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.layer_type = config.layer_types[role.layer]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.eager = inspect.getmodule(type(family)).eager_attention_forward  # the family's reference attention
        self.lends = lends  # KVSharer layers attend over this layer's keys and values: rebuild them explicitly
        d, d_kv, bias = config.hidden_size, self.num_kv_heads * self.head_dim, config.arch.get("qkv_bias", False)
        # fused-qkv families (Phi-3) get their q/k/v split by the converter
        d_q = self.num_heads * self.head_dim
        self.q_proj = family.q_proj if hasattr(family, "q_proj") else nn.Linear(d, d_q, bias=bias)
        self.o_proj = family.o_proj
        self.q_norm = getattr(family, "q_norm", None)
        self.k_norm = getattr(family, "k_norm", None) if role.borrow < 0 else None
        if role.latent:
            self.k_up, self.v_up = nn.Linear(role.rank, d_kv, bias=True), nn.Linear(role.rank, d_kv, bias=True)
        elif role.value_latent:
            self.k_proj = family.k_proj if hasattr(family, "k_proj") else nn.Linear(d, d_kv, bias=bias)
            self.v_up = nn.Linear(role.rank, d_kv, bias=True)
        elif role.stores:
            self.k_proj = family.k_proj if hasattr(family, "k_proj") else nn.Linear(d, d_kv, bias=bias)
            self.v_proj = family.v_proj if hasattr(family, "v_proj") else nn.Linear(d, d_kv, bias=bias)
        # The model this layer belongs to, not a submodule: its rotary embedding (keys at cache positions) and, for a
        # layer that stores a latent, its group's down-projection (model.kv_groups.{g}).
        object.__setattr__(self, "model", model)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, q, d], after the input norm
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos/sin [B|1, q, rd] at the new tokens' positions
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = _one_cache(cache, past_key_values)
        if not isinstance(cache, CommonKVCache):
            raise TypeError("CommonKVAttention reads its keys and values from a CommonKVCache; call "
                            "CommonKVForCausalLM, which supplies one.")
        query = apply_rope(self._heads(self.q_proj(hidden_states), self.q_norm), *position_embeddings)
        if self.role.latent:
            key, value, fused = self._latent_kv(hidden_states, cache)
        elif self.role.value_latent:
            key, value, fused = self._latent_values_kv(hidden_states, position_embeddings, cache)
        else:
            key, value, fused = self._kept_kv(hidden_states, position_embeddings, cache)
        cache.attending(self.layer_idx, query, key, value, self.scaling)
        if fused:  # value = the latent [B, 1, T, r]: attend in latent space, then B_v per KV head
            out = self._up_project_values(self._attend_latent(query, key, value, attention_mask, **kwargs))
        else:
            out = self._attend(query, key, value, attention_mask, **kwargs)  # [B, q, H, hd]
        return self.o_proj(out.flatten(2)), None

    def _heads(self, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """[B, T, h·hd] → [B, h, T, hd], normed as the family norms q/k: per head, or over all heads (OLMo-2),
        whichever width its norm has."""
        if norm is not None:
            x = norm(x.unflatten(-1, (-1, norm.weight.shape[-1]))).flatten(-2)
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _kept_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: CommonKVCache):
        """Keys/values as the family computes them; a KVSharer layer (no projections) gets its source's."""
        key = value = None
        if hasattr(self, "k_proj"):
            key = apply_rope(self._heads(self.k_proj(x), self.k_norm), *rope)
            value = self._heads(self.v_proj(x), None)
        key, value = cache.update(key, value, self.layer_idx)
        return key, value, False

    def _latent_kv(self, x: torch.Tensor, cache: CommonKVCache):
        """c = A_g x where this layer stores it; keys rebuilt from the whole latent and rotated at their positions;
        values rebuilt, or the latent itself where attending in latent space is cheaper (fused)."""
        new = self.model.kv_groups[str(self.role.group)].down(x).unsqueeze(1) if self.role.stores else None
        latent, _ = cache.update(new, None, self.layer_idx)  # [B, 1, T, r]: own, the anchor's, or the sequence
        cos, sin = cache.key_rope(self.layer_idx, self.model.rotary_emb, latent, self.layer_type)
        key = apply_rope(self._heads(self.k_up(latent.squeeze(1)), self.k_norm), cos, sin)
        if self._use_fused(x.shape[1], latent.shape[-1]) and not self.lends:
            return key, latent, True
        return key, self._heads(self.v_up(latent.squeeze(1)), None), False

    def _latent_values_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: CommonKVCache):
        """Keys as the family computes them, cached rotated (no rebuild at later steps); the value latent
        c = A_g x cached beside them and attended over as a latent layer's (or its values rebuilt where that is
        cheaper: a long prefill)."""
        key = apply_rope(self._heads(self.k_proj(x), self.k_norm), *rope)
        latent = self.model.kv_groups[str(self.role.group)].down(x).unsqueeze(1)  # [B, 1, t, r]
        key, latent = cache.update(key, latent, self.layer_idx)
        if self._use_fused(x.shape[1], latent.shape[-1]):
            return key, latent, True
        return key, self._heads(self.v_up(latent.squeeze(1)), None), False

    def _use_fused(self, q_len: int, rank: int) -> bool:
        """value_path "auto": attend over the latent only where it is cheaper than rebuilding the values.

        Fused costs q·T·H·r for the attention-value product; explicit costs T·r·d_kv to rebuild V plus q·T·H·hd.
        So decode (q = 1) fuses and a long prefill does not (its output would be H·r wide per token).
        """
        path = self.plan.get("value_path", "auto")
        if path != "auto":
            return path == "fused"
        return q_len * self.num_heads * (rank - self.head_dim) < rank * self.num_kv_heads * self.head_dim

    def _matmul_attention_applies(self, attention_mask) -> bool:
        """Not for flex attention's block masks, nor for families that cap their logits (Gemma-2)."""
        capped = getattr(self.config, "attn_logit_softcapping", None) is not None
        return not capped and (attention_mask is None or isinstance(attention_mask, torch.Tensor))

    def _attend(self, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
        """The registered attention function (SDPA by default); a one-token decode step on a CPU takes
        `matmul_attention`, which is faster there. On CUDA the registered function (fused kernels) stays."""
        if query.shape[2] == 1 and query.device.type == "cpu" and self._matmul_attention_applies(attention_mask):
            return matmul_attention(query, key, value, attention_mask, self.scaling)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        return fn(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0,
                  sliding_window=self.sliding_window, **kwargs)[0]

    def _attend_latent(self, query, key, latent, attention_mask, **kwargs) -> torch.Tensor:
        """Attention over the latent [B, 1, T, r]: `matmul_attention`, or, where it does not apply, the family's
        eager attention over the latent as values of every KV head (a view, no copy)."""
        if self._matmul_attention_applies(attention_mask):
            return matmul_attention(query, key, latent, attention_mask, self.scaling)
        values = latent.expand(-1, self.num_kv_heads, -1, -1)
        return self.eager(self, query, key, values, attention_mask, scaling=self.scaling, dropout=0.0,
                          sliding_window=self.sliding_window, **kwargs)[0]

    def _up_project_values(self, out: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ)·C [B, q, H, r] → each query head's KV-head slice of B_v (+ b_v): [B, q, H, hd]."""
        b, q_len = out.shape[:2]
        out = out.reshape(b, q_len, self.num_kv_heads, self.num_key_value_groups, -1)
        w = self.v_up.weight.view(self.num_kv_heads, self.head_dim, -1)  # [h_kv, hd, r]
        out = torch.einsum("bqjnr,jdr->bqjnd", out, w) + self.v_up.bias.view(1, 1, self.num_kv_heads, 1, -1)
        return out.reshape(b, q_len, self.num_heads, self.head_dim)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def build_decoder(config: CommonKVConfig) -> PreTrainedModel:
    """The base family's transformers model (e.g. LlamaModel) with every `self_attn` replaced and the shared
    down-projections added as `kv_groups`; everything else is the family's own code."""
    base = config.base_config()
    base._attn_implementation = config._attn_implementation
    model = MODEL_MAPPING[type(base)](base)
    model.kv_groups = nn.ModuleDict({
        str(g): KVGroup(config.hidden_size, int(group["rank"]))
        for g, group in enumerate(config.commonkv["groups"]) if group["mode"] != "keep"
    })
    roles = config.layer_roles()
    sources = {r.borrow for r in roles}
    for layer, role in zip(model.layers, roles):
        layer.self_attn = CommonKVAttention(config, role, layer.self_attn, model, lends=role.layer in sources)
    return model


class CommonKVPreTrainedModel(PreTrainedModel):
    config_class = CommonKVConfig
    config: CommonKVConfig
    base_model_prefix = "model"
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """The base family's initialization (its norms, scaled embeddings and rotary buffers differ)."""
        self.model._init_weights(module)

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


class CommonKVForCausalLM(CommonKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CommonKVConfig):
        super().__init__(config)
        config.check_block()
        config.warn_untested_transformers()
        self.model = build_decoder(config)
        self.model_cache_arg = _cache_arg(type(self.model).forward)
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
        position_ids: torch.LongTensor | None = None,  # ignored: see the module docstring on positions
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,  # attention-backend extras from generate(); not used by this model
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._cache_for(_one_cache(cache, past_key_values))
        tokens = input_ids if input_ids is not None else inputs_embeds
        cache.begin(tokens.shape[1], attention_mask)
        hidden_states = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=True,
                                   attention_mask=cache.slot_mask(attention_mask),
                                   position_ids=cache.query_positions(tokens.shape[1], tokens.device),
                                   **{self.model_cache_arg: cache}).last_hidden_state
        cache.finish()
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache if use_cache else None})

    def _cache_for(self, cache: Cache | None) -> CommonKVCache:
        """Our cache, also when generate() or a caller hands us an empty stock cache."""
        if isinstance(cache, CommonKVCache):
            return cache
        if cache is None or cache.get_seq_length() == 0:
            return CommonKVCache(self.config)
        raise ValueError(
            "A CommonKV model needs its own CommonKVCache; a filled cache of another type cannot be continued. "
            "To resolve, pass past_key_values=None (or an empty cache) on the first call."
        )


__all__ = ["CommonKVForCausalLM", "CommonKVCache", "CommonKVAttention", "LatentLayer", "ReaderLayer",
           "WeightedLayer", "BorrowLayer", "CommonKVPreTrainedModel", "build_decoder"]
