"""Baselines that compress a stock model's KV cache at run time, for comparisons at equal memory.

`AveragedKVCache` is the naive cross-layer merge (MiniCache without its SLERP and retention tokens): groups
of adjacent layers store one K/V, the mean of the group's layers' K/V at each position. The first layer of a
group writes its K/V; every later layer of the group folds its own K/V for the new positions into that
storage (running mean) and attends over the result. Deeper layers are merged first, as MiniCache does,
because their caches are the most alike.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..errors import UserInputError


def average_groups(num_layers: int, ratio: float) -> list[list[int]]:
    """Groups of adjacent layers, deepest first, whose averaging removes at least `ratio` of the cache.

    A group of G layers removes G−1 layers' worth. Groups have the smallest size G with 1 − 1/G ≥ ratio
    (fewer, larger groups where the layers run out), are as even as possible, and sit at the deep end.
    """
    if not 0.0 <= ratio < 1.0:
        raise UserInputError(f"ratio {ratio} is outside [0, 1). To resolve, pass e.g. 0.5.")
    need = math.ceil(ratio * num_layers - 1e-9)  # layers' worth of cache to remove
    if need == 0:
        return []
    if need >= num_layers:
        raise UserInputError(f"averaging cannot remove {ratio:g} of a {num_layers}-layer cache (one layer must "
                             "stay). To resolve, pass a lower --ratio.")
    size = max(2, math.ceil(1.0 / (1.0 - ratio) - 1e-9))
    count = min(math.ceil(need / (size - 1)), num_layers - need)
    sizes = [(need + count) // count + (i < (need + count) % count) for i in range(count)]
    groups, end = [], num_layers
    for width in sizes:
        groups.append(list(range(end - width, end)))
        end -= width
    return groups[::-1]


class _AveragedLayer(CacheLayerMixin):
    """A later layer of an averaged group: folds its K/V into the group's storage and allocates nothing."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: DynamicLayer, contributors: int) -> None:
        super().__init__()
        self.owner, self.contributors = owner, contributors  # layers already in the mean before this one

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.is_initialized = True
        n, q = self.contributors, key_states.shape[-2]
        keys, values = self.owner.keys, self.owner.values
        keys[..., -q:, :].mul_(n / (n + 1)).add_(key_states, alpha=1 / (n + 1))
        values[..., -q:, :].mul_(n / (n + 1)).add_(value_states, alpha=1 / (n + 1))
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an averaged cache cannot be cropped: the merge is not reversible")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass  # the owner reorders the shared storage

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass


class AveragedKVCache(Cache):
    """A transformers Cache for stock models in which each group of `groups` shares one averaged K/V."""

    def __init__(self, num_layers: int, groups: list[list[int]]) -> None:
        layers: list[CacheLayerMixin] = [DynamicLayer() for _ in range(num_layers)]
        for group in groups:
            owner = layers[group[0]]
            for n, layer in enumerate(group[1:], start=1):
                layers[layer] = _AveragedLayer(owner, n)
        self.groups = groups
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes over unique storages: the later layers of a group hold nothing of their own."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(layer, DynamicLayer) and t is not None and t.numel():
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())


def averaged_cache_factory(config, ratio: float):
    """A zero-argument factory of fresh AveragedKVCache objects for a stock model's config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
        raise UserInputError("the averaged-cache baseline supports full-attention models only (this one has "
                             "sliding-window layers). To resolve, evaluate it without --baseline.")
    groups = average_groups(text.num_hidden_layers, ratio)
    return lambda: AveragedKVCache(text.num_hidden_layers, groups)
