"""Configuration of a CommonKV checkpoint.

Self-contained (imports only transformers): this file is copied into every converted checkpoint so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without the commonkv package.

The config keeps every field of the base model at the top level (so tools that read `hidden_size` or
`num_hidden_layers` keep working) and adds a `commonkv` block that describes the compressed KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

FORMAT_VERSION = 1
MODES = ("keep", "per_layer", "merged")
MERGE_MODES = ("anchor", "weighted")
WEIGHTED_DEFAULTS = {"sink": 4, "window": 32, "block": 16}  # S, W, K of a weighted group


@dataclass(frozen=True)
class LayerRole:
    """What one decoder layer stores in the cache and where its keys/values come from."""

    layer: int
    mode: str  # keep | per_layer | merged
    group: int  # index into commonkv["groups"]
    rank: int  # latent width r (0 for keep)
    source: int  # layer whose cache entry this layer reads (itself unless a non-anchor merged layer)
    merge: str = ""  # anchor | weighted for a merged layer, "" otherwise

    @property
    def stores(self) -> bool:
        return self.source == self.layer

    @property
    def latent(self) -> bool:
        return self.mode != "keep"


class CommonKVConfig(PretrainedConfig):
    model_type = "commonkv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        base_model_type: str = "llama",
        commonkv: dict | None = None,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        sliding_window: int | None = None,
        layer_types: list[str] | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.base_model_type = base_model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        self.layer_types = layer_types or ["full_attention"] * num_hidden_layers
        self.use_cache = use_cache
        self.commonkv = commonkv or default_block(num_hidden_layers)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # ---- the plan, as the runtime and the tools read it -------------------------------------------------
    @property
    def arch(self) -> dict:
        """Resolved per-family facts (biases, q/k norm) written by the converter."""
        return self.commonkv.get("arch", {})

    def layer_roles(self) -> list[LayerRole]:
        roles: list[LayerRole | None] = [None] * self.num_hidden_layers
        for g, group in enumerate(self.commonkv["groups"]):
            mode, layers = group["mode"], group["layers"]
            anchor = group.get("anchor", layers[0])
            merge = group.get("merge", "anchor") if mode == "merged" else ""
            for layer in layers:
                source = anchor if merge == "anchor" else layer  # weighted: every layer keeps its own latents
                roles[layer] = LayerRole(layer, mode, g, int(group.get("rank", 0)), source, merge)
        missing = [i for i, r in enumerate(roles) if r is None]
        if missing:
            raise ValueError(f"commonkv.groups does not cover layers {missing}; the checkpoint config is corrupt.")
        return roles  # type: ignore[return-value]

    def kv_elements_per_token(self) -> int:
        """Cache elements stored per token over all layers; for weighted groups the asymptotic figure (r per
        token for the group: the per-layer sinks and recent window are a constant, see `cache_elements`)."""
        full = 2 * self.num_key_value_heads * self.head_dim
        total = 0
        for group in self.commonkv["groups"]:
            if group["mode"] == "keep":
                total += full * len(group["layers"])
            elif group["mode"] == "merged":
                total += int(group["rank"])
            else:
                total += int(group["rank"]) * len(group["layers"])
        return total

    def cache_elements(self, tokens: int) -> int:
        """Cache elements one sequence of `tokens` tokens holds (the analytic figure cache bytes must equal).

        A weighted group of G layers at rank r holds per layer its sinks (the first S tokens) and its recent
        tokens, and once for the group the merged latents of everything in between. Recent tokens are folded
        into the merged latent in whole blocks of K once at least W + K of them are held, so the recent part
        holds n tokens while n < W and W + (n − W) mod K after (n = tokens past the sinks): the same whatever
        the chunking of prefill and decode.
        """
        total = 0
        for group in self.commonkv["groups"]:
            if group["mode"] == "merged" and group.get("merge", "anchor") == "weighted":
                sinks, recent, merged = weighted_split(tokens, group)
                total += int(group["rank"]) * (len(group["layers"]) * (sinks + recent) + merged)
            elif group["mode"] == "keep":
                total += 2 * self.num_key_value_heads * self.head_dim * len(group["layers"]) * tokens
            elif group["mode"] == "merged":
                total += int(group["rank"]) * tokens
            else:
                total += int(group["rank"]) * len(group["layers"]) * tokens
        return total

    def full_kv_elements_per_token(self) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * self.num_hidden_layers


def weighted_split(tokens: int, group: dict) -> tuple[int, int, int]:
    """(sinks, recent, merged) token counts of a weighted group after `tokens` tokens."""
    sink, window, block = (int(group.get(k, v)) for k, v in WEIGHTED_DEFAULTS.items())
    sinks = min(tokens, sink)
    rest = tokens - sinks
    recent = rest if rest < window else window + (rest - window) % block
    return sinks, recent, rest - recent


def default_block(num_layers: int) -> dict:
    """An uncompressed plan: every layer keeps its K/V (what a fresh config describes)."""
    return {
        "format_version": FORMAT_VERSION,
        "groups": [{"layers": [i], "mode": "keep"} for i in range(num_layers)],
        "merge_mode": "anchor",
        "value_path": "auto",
        "arch": {"qkv_bias": False, "o_bias": False, "qk_norm": False},
    }


__all__ = ["CommonKVConfig", "LayerRole", "FORMAT_VERSION", "MODES", "MERGE_MODES", "weighted_split"]
