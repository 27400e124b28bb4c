"""Per-family facts, as data: where the attention weights live, which biases and norms a family has.

Every supported family (Llama, Mistral, Qwen2, Qwen3) is a pre-norm decoder with RoPE, q/k/v/o projections
and a gated MLP; they differ only in the facts below. Adding a family means adding one `Family` entry.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from .checkpoint.format import group_elements
from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What differs between decoder families, from the converter's point of view."""

    model_type: str
    class_prefix: str  # transformers class names: {prefix}DecoderLayer, {prefix}RotaryEmbedding
    qkv_bias: bool | None  # None: read config.attention_bias
    o_bias: bool | None  # None: read config.attention_bias
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama", qkv_bias=None, o_bias=None, qk_norm=False),
        Family("mistral", "Mistral", qkv_bias=False, o_bias=False, qk_norm=False),
        Family("qwen2", "Qwen2", qkv_bias=True, o_bias=False, qk_norm=False),
        Family("qwen3", "Qwen3", qkv_bias=None, o_bias=None, qk_norm=True),
    )
}

def _cache_kwarg() -> str:
    """How the installed transformers names a decoder layer's cache argument: `cache` from 5.24 on
    (`past_key_values` deprecated), `past_key_values` before."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


CACHE_KWARG = _cache_kwarg()

LAYER = "model.layers.{i}."
ATTN = LAYER + "self_attn."


@dataclass(frozen=True)
class ArchFacts:
    """Resolved facts of one model: shapes, flags and tensor names."""

    family: Family
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool

    @property
    def d_kv(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_elements_per_token(self) -> int:
        """Elements a full K/V cache holds per token over all layers."""
        return group_elements("keep", self.num_layers, 0, self.d_kv)

    def runtime_block(self) -> dict:
        """The resolved flags the runtime reads from `commonkv.arch` (no family branches in the runtime)."""
        return {"qkv_bias": self.qkv_bias, "o_bias": self.o_bias, "qk_norm": self.qk_norm}

    @staticmethod
    def kv_name(layer: int, which: str, part: str = "weight") -> str:
        """`which` in {"k", "v"}: name of the source projection tensor of `layer`."""
        return ATTN.format(i=layer) + f"{which}_proj.{part}"

    @staticmethod
    def layer_prefix(layer: int) -> str:
        return LAYER.format(i=layer)

    def transformers_class(self, suffix: str):
        """The family's class in transformers, e.g. LlamaDecoderLayer, used to run the source layer exactly."""
        module = importlib.import_module(f"transformers.models.{self.family.model_type}.modeling_{self.family.model_type}")
        return getattr(module, self.family.class_prefix + suffix)


def layer_types(config) -> list[str]:
    """Per-layer attention type of a transformers config object, made explicit for the runtime.

    Qwen2/Qwen3 configs carry `layer_types`; Mistral has none and slides every layer when `sliding_window` is set.
    """
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def resolve(config: dict) -> ArchFacts:
    """Facts for a model config dict; raises a one-line UnsupportedModelError for anything else."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"Architecture {model_type!r} is not supported. Supported families: {supported}. "
            "To resolve, convert a model of one of these families."
        )
    num_heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    attention_bias = bool(config.get("attention_bias", False))
    return ArchFacts(
        family=family,
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or hidden // num_heads,
        qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=attention_bias if family.o_bias is None else family.o_bias,
        qk_norm=family.qk_norm,
    )
