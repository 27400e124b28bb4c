"""Configuration of a CommonKV checkpoint.

Self-contained (imports only transformers): this file is copied into every converted checkpoint so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without the commonkv package.

The config keeps every field of the base model at the top level (so tools that read `hidden_size` or
`num_hidden_layers` keep working) and adds a `commonkv` block that describes the compressed KV cache.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields, replace

import transformers
from transformers import AutoConfig, PretrainedConfig

from .cache_options import GROUP_BITS, LAYOUT_FIELDS, POSITION_BYTES, KVCacheOptions

# 2 adds the optional `sharing` map (KVSharer), 3 a group's `bits` (a runtime that read up to 2 would cache such a
# group unquantized, not as planned), 4 the `latent_values` mode, 5 a `quantization` layout (group size, recent
# window) other than KVCacheOptions' defaults, 6 a layout's `sink` (first tokens kept exact), 7 a group's `tail` (its
# latent's trailing channels at fewer bits), 8 a layout's `clip` (ranges by least squared error); the converter writes the oldest version that describes a plan
FORMAT_VERSION = 8
# The transformers releases this runtime's test suite ran on (oldest, newest); the converter records them in the
# block, and loading under a release outside them warns once. Keep in step with pyproject.toml and .ci/run.
TESTED_TRANSFORMERS = ("5.23.0", "5.25.0")
# keep: K and V as they are; per_layer / merged: keys and values rebuilt from a latent (its own / its group's);
# latent_values: keys as they are, values as a per-layer latent attended in latent space (no key rebuild per step)
MODES = ("keep", "per_layer", "merged", "latent_values")
MERGE_MODES = ("anchor", "weighted")
SHARING_PATHS = ("refit", "source")  # how a sharer reads a latent source: own refit up-projections, or the source's
WEIGHTED_DEFAULTS = {"sink": 4, "window": 32, "block": 16}  # S, W, K of a weighted group
# Fields of this config that are not the base model's (everything else is handed to the base family's config)
OWN_FIELDS = ("commonkv", "base_model_type", "model_type", "architectures", "auto_map", "transformers_version",
              "kv_cache")
_RENAMED = {"kv_window", "kv_evict_scope"}  # flat names before kv_cache was one entry


def group_elements(mode: str, layers: int, rank: int, d_kv: int) -> int:
    """Cache elements one group of `layers` layers stores per token: K and V of each (`keep`, d_kv = KV heads ×
    head dim), a latent of each (`per_layer`), one latent for all (`merged`) or the keys and a value latent of
    each (`latent_values`). The one per-token formula: the planner, the config, inspect, validation, eval and the
    card all count with it."""
    if mode == "keep":
        return 2 * d_kv * layers
    if mode == "latent_values":
        return (d_kv + rank) * layers
    return rank if mode == "merged" else rank * layers


class CheckpointError(ValueError):
    """A checkpoint that must not load: a missing, malformed or too new config block, or weights missing."""


@dataclass(frozen=True)
class LayerRole:
    """What one decoder layer stores in the cache and where its keys/values come from."""

    layer: int
    mode: str  # one of MODES, or shared (a KVSharer layer reading a latent source's latent)
    group: int  # index into commonkv["groups"]
    rank: int  # latent width r (0 for keep)
    source: int  # layer whose cache entry this layer reads (itself unless a non-anchor merged layer or a sharer)
    merge: str = ""  # anchor | weighted for a merged layer, "" otherwise
    borrow: int = -1  # KVSharer: the layer whose keys/values this layer attends over as they are (-1: none)

    @property
    def stores(self) -> bool:
        return self.source == self.layer

    @property
    def latent(self) -> bool:
        """Its keys and values are rebuilt from a latent (`latent_values` layers keep their keys: not latent)."""
        return self.mode not in ("keep", "latent_values")

    @property
    def value_latent(self) -> bool:
        """It caches its keys as they are and a latent its values are attended in."""
        return self.mode == "latent_values"


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
        kv_cache: dict | None = None,
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
        # None only for a bare CommonKVConfig() (transformers builds one to diff against); a model refuses it
        self.commonkv = commonkv
        # Runtime cache options (quantization, eviction): not part of the conversion, set at load time.
        self.kv_cache = dict(kv_cache) if kv_cache else None
        flat = sorted(k for k in kwargs if k in {f"kv_{f.name}" for f in fields(KVCacheOptions)} | _RENAMED)
        if flat:
            raise ValueError(f"{flat} are not options; the run-time cache options are one entry: pass e.g. "
                             "kv_cache={'bits': 4, 'budget': 128} (keys: "
                             + ", ".join(f.name for f in fields(KVCacheOptions)) + ").")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def base_config(self) -> PretrainedConfig:
        """The base family's own config, from the base fields kept at the top level: the runtime builds the
        family's transformers decoder from it."""
        fields = {k: v for k, v in self.to_dict().items() if k not in OWN_FIELDS}
        return AutoConfig.for_model(self.base_model_type, **fields)

    # ---- the plan, as the runtime and the tools read it -------------------------------------------------
    def check_block(self) -> None:
        """Refuse a missing, malformed or too new `commonkv` block with one line: built from it, a model would
        get random K/V projections where the checkpoint has latent factors."""
        block = self.commonkv
        fix = "The checkpoint config is damaged or not a CommonKV conversion. To resolve, convert the model again."
        if not isinstance(block, dict):
            raise CheckpointError(f"config.json has model_type 'commonkv' but no commonkv block. {fix}")
        version = block.get("format_version", 1)
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"commonkv.format_version {version!r} is not a positive integer. {fix}")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"This checkpoint has commonkv format_version {version}; this runtime reads up to "
                             f"{FORMAT_VERSION}. To resolve, upgrade the commonkv package or load with "
                             "trust_remote_code=True (the checkpoint ships its own runtime).")
        groups = block.get("groups")
        if not isinstance(groups, list) or not groups:
            raise CheckpointError(f"commonkv.groups is missing or empty. {fix}")
        seen: list[int] = []
        for g, group in enumerate(groups):
            layers = group.get("layers") if isinstance(group, dict) else None
            mode = group.get("mode") if isinstance(group, dict) else None
            rank = group.get("rank") if isinstance(group, dict) else None
            merge = group.get("merge", "anchor") if isinstance(group, dict) else None
            ok = (isinstance(layers, list) and layers and all(isinstance(i, int) for i in layers) and mode in MODES
                  and (mode == "keep" or isinstance(rank, int) and rank > 0)
                  and (mode != "merged" or merge in MERGE_MODES)
                  and (mode != "latent_values" or len(layers) == 1)
                  and (merge != "weighted" or mode != "merged" or len(group.get("weights", [])) == len(layers)))
            if not ok:
                raise CheckpointError(f"commonkv.groups[{g}] is malformed ({str(group)[:80]}). {fix}")
            self._check_bits(g, group)
            self._check_tail(g, group)
            seen += layers
        layout = block.get("quantization", {})
        try:
            if not isinstance(layout, dict) or set(layout) - set(LAYOUT_FIELDS):
                raise ValueError(f"only {', '.join(LAYOUT_FIELDS)} may be given.")
            KVCacheOptions(**layout)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"commonkv.quantization {str(layout)[:80]} is malformed: {err} {fix}") from None
        if sorted(seen) != list(range(self.num_hidden_layers)):
            raise CheckpointError(f"commonkv.groups cover layers {sorted(seen)[:8]}…, not each of the "
                             f"{self.num_hidden_layers} layers once. {fix}")

    @staticmethod
    def _check_bits(g: int, group: dict) -> None:
        """A group's `bits`, where present: 8, 4 or 2, and not on a weighted merge group (quantization cannot hold
        a latent that is folded in blocks)."""
        if "bits" not in group:
            return
        bits = group["bits"]
        if not (isinstance(bits, int) and bits in GROUP_BITS):
            raise CheckpointError(f"commonkv.groups[{g}] has bits={bits!r}; a group is stored at 8, 4 or 2 bits, "
                                  "or without a bits entry (unquantized). To resolve, correct or remove it in "
                                  "config.json, or convert the model again.")
        if group["mode"] == "merged" and group.get("merge", "anchor") == "weighted":
            raise CheckpointError(f"commonkv.groups[{g}] is a weighted merge group with bits={bits}; weighted "
                                  "groups cannot be quantized. To resolve, remove its bits entry or convert with "
                                  "--merge anchor.")

    @staticmethod
    def _check_tail(g: int, group: dict) -> None:
        """A group's `tail`, where present: {"start": s, "bits": b}, the latent's channels s.. stored at b bits, fewer
        than the group's `bits` (those of channels ..s-1), on an anchor-merged or per-layer latent of rank above s."""
        if "tail" not in group:
            return
        tail, bits = group["tail"], group.get("bits")
        start = tail.get("start") if isinstance(tail, dict) else None
        tail_bits = tail.get("bits") if isinstance(tail, dict) else None
        if not (isinstance(tail, dict) and set(tail) == {"start", "bits"} and isinstance(start, int)
                and group["mode"] in ("per_layer", "merged") and group.get("merge", "anchor") == "anchor"
                and 0 < start < group["rank"] and bits in GROUP_BITS and tail_bits in GROUP_BITS and tail_bits < bits):
            raise CheckpointError(f"commonkv.groups[{g}] has tail={tail!r}; a tail is {{'start': s, 'bits': b}} on a "
                                  "per-layer or anchor-merged latent with bits, 0 < s < its rank and b below its bits. "
                                  "To resolve, correct or remove it in config.json, or convert the model again.")

    def warn_untested_transformers(self) -> None:
        """Warn once when the installed transformers is outside the releases this runtime was tested with."""
        low, high = (self.commonkv or {}).get("transformers_tested", TESTED_TRANSFORMERS)
        if not _release(low) <= _release(transformers.__version__) <= _release(high):
            warnings.warn(f"This CommonKV runtime was tested with transformers {low} to {high}; "
                          f"{transformers.__version__} is installed. If generation misbehaves, install a tested "
                          f"release (pip install 'transformers>={low},<={high}').", stacklevel=3)

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
        return self._shared_roles(roles)  # type: ignore[arg-type]

    def sharing_pairs(self) -> dict[int, int]:
        """KVSharer's map, sharer → source (both layer indices); empty without one."""
        self.check_block()
        return {int(s): int(j) for s, j in self.commonkv.get("sharing", {}).get("pairs", [])}

    def _shared_roles(self, roles: list[LayerRole]) -> list[LayerRole]:
        """A sharer stores nothing and attends over its source's cache: a kept source's keys and values as they
        are; a latent source's latent through its own refit up-projections (`refit`), or the keys and values the
        source rebuilt from it (`source`)."""
        pairs = self.sharing_pairs()
        path = self.commonkv.get("sharing", {}).get("latent_path", "refit")
        groups = self.commonkv["groups"]
        for s, j in pairs.items():
            src, own = roles[j], roles[s]
            if (not 0 <= j < s < len(roles) or j in pairs or s in pairs.values() or own.mode != "keep"
                    or len(groups[own.group]["layers"]) != 1 or src.merge == "weighted" or src.value_latent
                    or path not in SHARING_PATHS):
                raise ValueError(f"commonkv.sharing pair [{s}, {j}] is invalid (a sharer must be a later kept layer "
                                 "alone in its group and read a non-sharing, non-weighted, non-latent_values layer); "
                                 "the config is corrupt.")
            if src.latent and path == "refit":
                roles[s] = LayerRole(s, "shared", src.group, src.rank, src.source)
            else:
                roles[s] = LayerRole(s, "keep", own.group, 0, src.source, borrow=j)
        return roles

    def group_elements_per_token(self) -> list[int]:
        """Cache elements each group stores per token; for weighted groups the asymptotic figure (r per token
        for the group: the per-layer sinks and recent window are a constant, see `cache_elements`)."""
        sharers = set(self.sharing_pairs())
        d_kv = self.num_key_value_heads * self.head_dim
        # KVSharer: a group of sharers reads another layer's cache and stores nothing
        return [0 if sharers.issuperset(g["layers"]) else
                group_elements(g["mode"], len(g["layers"]), int(g.get("rank", 0)), d_kv)
                for g in self.commonkv["groups"]]

    def kv_elements_per_token(self) -> int:
        """Cache elements stored per token over all layers (see `group_elements_per_token`)."""
        return sum(self.group_elements_per_token())

    def cache_elements(self, tokens: int) -> int:
        """Cache elements one sequence of `tokens` tokens holds (the analytic figure cache bytes must equal)."""
        return sum(self.group_cache_elements(tokens))

    def group_cache_elements(self, tokens: int) -> list[int]:
        """Cache elements each group holds after `tokens` tokens of one sequence.

        A weighted group of G layers at rank r holds per layer its sinks (the first S tokens) and its recent
        tokens, and once for the group the merged latents of everything in between. Recent tokens are folded
        into the merged latent in whole blocks of K once at least W + K of them are held, so the recent part
        holds n tokens while n < W and W + (n − W) mod K after (n = tokens past the sinks): the same whatever
        the chunking of prefill and decode.
        """
        out = []
        for group, per_token in zip(self.commonkv["groups"], self.group_elements_per_token()):
            if per_token and group["mode"] == "merged" and group.get("merge", "anchor") == "weighted":
                sinks, recent, merged = weighted_split(tokens, group)
                out.append(int(group["rank"]) * (len(group["layers"]) * (sinks + recent) + merged))
            else:
                out.append(per_token * tokens)
        return out

    def kv_options(self) -> KVCacheOptions | None:
        """The load-time cache options (`kv_cache`), validated; None when they neither quantize nor evict. What a
        layer stores, with the checkpoint's per-group bits, is `layer_options`'."""
        options = self._kv_entry()
        return options if options.active else None

    def layer_options(self, role: LayerRole) -> KVCacheOptions | None:
        """How the cache layer of `role` stores its tokens; None where it stores them as they are, or nothing.

        The one place a layer's precision is decided, so the cache (`CommonKVCache`) and its byte count
        (`cache_bytes`) cannot disagree: the load-time `kv_cache` bits override every group's (16: unquantized),
        else the group's `bits`, else unquantized. Eviction and the latent axis are the load-time entry's; the
        quantization group and the residual window its, else the block's `quantization` layout. The result's bits
        are 8, 4, 2 or None (unquantized).
        """
        if not role.stores:
            return None
        options = self._kv_entry()
        bits = options.bits if options.bits is not None else self.commonkv["groups"][role.group].get("bits")
        options = replace(options, bits=None if bits == 16 else bits)
        return options if options.active else None

    def layer_tail(self, role: LayerRole) -> tuple[int, int] | None:
        """(first channel, bits) of the lower-precision tail of `role`'s latent; None where it has none or the
        load-time `kv_cache` bits store every group at one precision."""
        tail = self.commonkv["groups"][role.group].get("tail")
        if tail is None or not role.stores or not role.latent or self._kv_entry().bits is not None:
            return None
        return tail["start"], tail["bits"]

    def quantization_layout(self) -> dict:
        """The block's `quantization` entry: the group size, recent window and sink its quantized groups were
        planned at (the runtime defaults where absent). A load-time `kv_cache` entry may override each."""
        return dict((self.commonkv or {}).get("quantization", {}))

    def _kv_entry(self) -> KVCacheOptions:
        """The load-time `kv_cache` entry over the block's quantization layout (defaults where absent either way),
        refused where the plan cannot honour it."""
        options = KVCacheOptions.from_entry({**self.quantization_layout(), **(self.kv_cache or {})})
        weighted = any(g["mode"] == "merged" and g.get("merge", "anchor") == "weighted" for g in self.commonkv["groups"])
        if options.active and weighted:
            raise ValueError("kv_cache bits/budget do not support weighted merge groups (their merged latent is folded "
                             "in blocks). To resolve, convert with --merge anchor or load without them.")
        if options.budget is not None and "sliding_attention" in self.layer_types:
            raise ValueError("kv_cache budget does not support sliding-window layers. To resolve, load without it.")
        return options

    def cache_bytes(self, tokens: int, element_size: int, *, prompt: int | None = None, batch: int = 1) -> int:
        """Bytes the cache holds after `tokens` tokens (the first `prompt` in one prefill, default all), each layer
        stored as `layer_options` says: the analytic figure `CommonKVCache.nbytes()` must equal."""
        options = self.kv_options()
        held = tokens if options is None else options.kept_tokens(tokens, tokens if prompt is None else prompt)
        plain = self.group_cache_elements(tokens)  # groups whose layers store their tokens as they are
        total = 0
        for role in self.layer_roles():
            o = self.layer_options(role)
            if o is None:
                continue
            plain[role.group] = 0  # the storing layers of a group share its options: counted stream by stream
            if role.latent:
                start, tail_bits = self.layer_tail(role) or (role.rank, o.bits)
                total += o.stream_bytes(held, start, 1, o.latent_axis, element_size)
                if start < role.rank:
                    total += replace(o, bits=tail_bits).stream_bytes(held, role.rank - start, 1, o.latent_axis,
                                                                     element_size)
                total += o.budget * POSITION_BYTES if held < tokens else 0
            elif role.value_latent:
                total += o.stream_bytes(held, self.head_dim, self.num_key_value_heads, "channel", element_size)
                total += o.stream_bytes(held, role.rank, 1, o.latent_axis, element_size)
            else:
                total += o.stream_bytes(held, self.head_dim, self.num_key_value_heads, "channel", element_size)
                total += o.stream_bytes(held, self.head_dim, self.num_key_value_heads, "token", element_size)
        return (total + sum(plain) * element_size) * batch

    def full_kv_elements_per_token(self) -> int:
        return group_elements("keep", self.num_hidden_layers, 0, self.num_key_value_heads * self.head_dim)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string: the leading digits of each part ("0rc1" → 0)."""
    parts = [re.match(r"\d*", part).group() for part in version.split(".")[:3]]
    return tuple(int(p or 0) for p in parts + ["0"] * (3 - len(parts)))


def weighted_split(tokens: int, group: dict) -> tuple[int, int, int]:
    """(sinks, recent, merged) token counts of a weighted group after `tokens` tokens."""
    sink, window, block = (int(group.get(k, v)) for k, v in WEIGHTED_DEFAULTS.items())
    sinks = min(tokens, sink)
    rest = tokens - sinks
    recent = rest if rest < window else window + (rest - window) % block
    return sinks, recent, rest - recent


__all__ = ["group_elements", "CheckpointError", "CommonKVConfig", "LayerRole", "KVCacheOptions", "FORMAT_VERSION", "TESTED_TRANSFORMERS", "MODES", "MERGE_MODES", "SHARING_PATHS",
           "weighted_split"]
