"""What an evaluation runs on: a loaded model, its tokenizer, and how its cache is built.

A target is a CommonKV checkpoint (loaded with the package runtime, optionally with run-time cache options
such as quantization or eviction), a stock Hugging Face model (the full-cache reference), or a stock model
with a baseline cache (`--baseline average`). Tasks only ever call `target.model(...)` with
`target.new_cache()` as its cache, so all three are measured by the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..checkpoint.format import group_elements
from ..checkpoint.reader import open_model
from ..errors import UserInputError
from .baselines import averaged_cache_factory

BASELINES = ("average",)


@dataclass
class EvalTarget:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cache_factory: Callable[[], Cache] | None = None
    meta: dict = field(default_factory=dict)

    def new_cache(self) -> Cache | None:
        """A fresh cache for one prefill (None: the model builds its own)."""
        return self.cache_factory() if self.cache_factory is not None else None

    @property
    def full_kv_bytes_per_token(self) -> int:
        """Bytes per token of the uncompressed source model's cache, at the model's dtype: the reference."""
        return self.meta["full_kv_elements_per_token"] * self.model.dtype.itemsize


def full_kv_elements_per_token(config) -> int:
    """Σ over layers of 2·n_kv_heads·head_dim for a stock config (sliding windows ignored: per token)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return group_elements("keep", text.num_hidden_layers, 0, kv_heads * head_dim)


def load_target(model: str, *, dtype: torch.dtype = torch.float32, device: str | None = None,
                kv_cache: dict | None = None, baseline: str | None = None, ratio: float | None = None,
                name: str | None = None) -> EvalTarget:
    """Load MODEL (directory or Hub id) for evaluation.

    `kv_cache` holds run-time cache options of a CommonKV checkpoint (`{"bits": 4}`, see KVCacheOptions);
    `baseline`/`ratio` wrap a stock model's cache in a baseline compression at that ratio.
    """
    kv_cache = {k: v for k, v in (kv_cache or {}).items() if v is not None}
    with open_model(model) as source:  # resolves Hub ids to a local snapshot; reads no tensors
        root, config = source.path, source.config
    commonkv = config.get("model_type") == "commonkv"
    if commonkv and baseline:
        raise UserInputError(f"{model} is already a CommonKV checkpoint; --baseline applies to a stock model. "
                             "To resolve, drop --baseline or pass the source model.")
    if kv_cache and not commonkv:
        raise UserInputError(f"run-time cache options {sorted(kv_cache)} need a CommonKV checkpoint, and {model} is a "
                             "stock model. To resolve, convert it first (`commonkv convert MODEL OUT --ratio 0` "
                             "keeps every layer and allows these options on the full cache).")
    if baseline is not None and baseline not in BASELINES:
        raise UserInputError(f"--baseline {baseline!r} is unknown. To resolve, pass one of {', '.join(BASELINES)}.")
    if ratio is not None and baseline is None:
        raise UserInputError("--ratio only applies with --baseline (a converted checkpoint has its ratio built in). "
                             "To resolve, add --baseline average or drop --ratio.")
    if baseline is not None and ratio is None:
        raise UserInputError("--baseline needs --ratio (the fraction of the cache to remove).")
    if commonkv:
        from ..runtime import load_checkpoint  # registers the commonkv config, which the tokenizer reads

        tokenizer = AutoTokenizer.from_pretrained(root)
        loaded = load_checkpoint(root, dtype=dtype, device=device, kv_cache=kv_cache)
        block = loaded.config.commonkv
        meta = {"kind": "commonkv", "ratio": block["ratio"], "groups": len(block["groups"]),
                "full_kv_elements_per_token": loaded.config.full_kv_elements_per_token(),
                "kv_elements_per_token": loaded.config.kv_elements_per_token(), "kv_cache": kv_cache}
    else:
        tokenizer = AutoTokenizer.from_pretrained(root)
        loaded = AutoModelForCausalLM.from_pretrained(root, dtype=dtype).eval()
        if device is not None:
            loaded = loaded.to(device)
        elements = full_kv_elements_per_token(loaded.config)
        meta = {"kind": "baseline" if baseline else "source", "full_kv_elements_per_token": elements,
                "kv_elements_per_token": elements}
    factory = None
    if baseline == "average":
        factory = averaged_cache_factory(loaded.config, ratio)
        groups = factory().groups
        removed = sum(len(g) - 1 for g in groups) * meta["full_kv_elements_per_token"] // loaded.config.num_hidden_layers
        meta.update(baseline="average", requested_ratio=ratio, average_groups=groups,
                    kv_elements_per_token=meta["full_kv_elements_per_token"] - removed)
    meta["path"] = str(root)
    meta["dtype"] = str(dtype).removeprefix("torch.")
    return EvalTarget(name or Path(str(model).rstrip("/")).name, loaded, tokenizer, factory, meta)
