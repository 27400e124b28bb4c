"""Per-family facts, as data: where the attention weights live, which biases and norms a family has.

Every supported family is a decoder with RoPE and q/k/v/o projections; the runtime runs the family's own
transformers model (its MLP or MoE, norms, masks and rotary embedding) and replaces only the attention, so the
converter needs only the facts below. Adding a family means adding one `Family` entry.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checkpoint.format import group_elements
from .errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers.cache_utils import Cache
    from transformers.utils import ModelOutput


@dataclass(frozen=True)
class Family:
    """What differs between decoder families, from the converter's point of view."""

    model_type: str
    class_prefix: str  # transformers class names: {prefix}DecoderLayer, {prefix}RotaryEmbedding
    qkv_bias: bool | None  # None: read config.attention_bias
    o_bias: bool | None  # None: read config.attention_bias
    qk_norm: bool  # RMSNorm on q and k before RoPE: per head (Qwen3, Gemma-3) or over all heads (OLMo-2)
    fused_qkv: str | None = None  # one projection holding [q; k; v] rows (Phi-3), split by the converter
    embed_scale: bool = False  # embeddings multiplied by √hidden_size (Gemma)
    input_norm: str | None = "input_layernorm"  # the norm before attention; None: it reads the residual (OLMo-2)
    module: str | None = None  # transformers.models.<module>, when it is not the model_type

    @property
    def module_name(self) -> str:
        return self.module or self.model_type


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama", qkv_bias=None, o_bias=None, qk_norm=False),
        Family("mistral", "Mistral", qkv_bias=False, o_bias=False, qk_norm=False),
        Family("qwen2", "Qwen2", qkv_bias=True, o_bias=False, qk_norm=False),
        Family("qwen3", "Qwen3", qkv_bias=None, o_bias=None, qk_norm=True),
        Family("mixtral", "Mixtral", qkv_bias=False, o_bias=False, qk_norm=False),
        Family("qwen3_moe", "Qwen3Moe", qkv_bias=None, o_bias=None, qk_norm=True),
        Family("gemma3_text", "Gemma3", qkv_bias=None, o_bias=None, qk_norm=True, embed_scale=True, module="gemma3"),
        Family("phi3", "Phi3", qkv_bias=False, o_bias=False, qk_norm=False, fused_qkv="qkv_proj"),
        Family("olmo2", "Olmo2", qkv_bias=None, o_bias=None, qk_norm=True, input_norm=None),
    )
}

def _cache_kwarg() -> str:
    """How the installed transformers names a decoder layer's cache argument: `cache` from 5.24 on
    (`past_key_values` deprecated), `past_key_values` before."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


CACHE_KWARG = _cache_kwarg()


def cache_of(output: ModelOutput) -> Cache | None:
    """The cache a forward or `generate` returned, read under the installed release's name (the old
    `past_key_values` property warns from 5.24 on)."""
    return getattr(output, CACHE_KWARG)

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

    def qkv_rows(self, which: str) -> slice:
        """Rows of `which` in {"q", "k", "v"} in a fused [q; k; v] projection."""
        q = self.num_heads * self.head_dim
        return {"q": slice(0, q), "k": slice(q, q + self.d_kv), "v": slice(q + self.d_kv, q + 2 * self.d_kv)}[which]

    def attention_input(self, layer, hidden):
        """What a family decoder layer's attention reads: the residual stream after its input norm, if any."""
        return getattr(layer, self.family.input_norm)(hidden) if self.family.input_norm else hidden

    def kv_outputs(self, attn, x):
        """Raw keys and values [..., d_kv] of a family attention module on its input x."""
        if self.family.fused_qkv:
            qkv = getattr(attn, self.family.fused_qkv)(x)
            return qkv[..., self.qkv_rows("k")], qkv[..., self.qkv_rows("v")]
        return attn.k_proj(x), attn.v_proj(x)

    def query_outputs(self, attn, x):
        """Queries [..., H·hd] of a family attention module on its input x, after its q_norm (before RoPE)."""
        fused = self.family.fused_qkv
        q = getattr(attn, fused)(x)[..., self.qkv_rows("q")] if fused else attn.q_proj(x)
        norm = getattr(attn, "q_norm", None)
        return q if norm is None else norm(q.unflatten(-1, (-1, norm.weight.shape[-1]))).flatten(-2)

    @staticmethod
    def layer_prefix(layer: int) -> str:
        return LAYER.format(i=layer)

    def transformers_class(self, suffix: str):
        """The family's class in transformers, e.g. LlamaDecoderLayer, used to run the source layer exactly."""
        name = self.family.module_name
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
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


class SplitQKV:
    """A source whose fused q/k/v projection (Phi-3's `qkv_proj`) reads as separate `q_proj`/`k_proj`/`v_proj`
    tensors, so factorization and the writer treat every family alike (the checkpoint's attention has separate
    projections). The fused tensor stays readable under its own name for the family's decoder layer."""

    def __init__(self, source, facts: ArchFacts):
        self.stored, self._facts = source, facts
        fused = f".self_attn.{facts.family.fused_qkv}."
        self._split = {name.replace(fused, f".self_attn.{w}_proj."): (name, w)
                       for name in source.tensor_names() if fused in name for w in "qkv"}

    def __getattr__(self, name: str):
        return getattr(self.stored, name)

    def tensor_names(self) -> list[str]:
        fused = {name for name, _ in self._split.values()}
        return [n for n in self.stored.tensor_names() if n not in fused] + list(self._split)

    def has_tensor(self, name: str) -> bool:
        return name in self._split or self.stored.has_tensor(name)

    def get_tensor(self, name: str, dtype=None):
        if name not in self._split:
            return self.stored.get_tensor(name, dtype)
        fused, which = self._split[name]
        return self.stored.get_tensor(fused, dtype)[self._facts.qkv_rows(which)].clone()


def source_view(source):
    """The source as the converter reads it: fused q/k/v projections split (see SplitQKV)."""
    facts = resolve(source.config)
    return SplitQKV(source, facts) if facts.family.fused_qkv else source
