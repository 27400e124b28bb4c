"""Run-time cache options: quantization and eviction on top of a checkpoint's plan, and their byte formulas.

Self-contained (standard library only) and copied into every checkpoint with the other runtime files. The CLI
reads this file directly, without the runtime package (which imports torch), to generate its --kv-* flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

SCALE_BYTES = 2  # quantization mins and steps are stored as float16
POSITION_BYTES = 4  # positions of the tokens kept by eviction, int32
GROUP_BITS = (8, 4, 2)  # the precisions a checkpoint's group may be stored at (`bits` of a group entry)
# the fields a checkpoint's `quantization` entry may set: the layout its plan priced and measured quantized groups at
LAYOUT_FIELDS = ("group", "residual", "sink", "clip")


def _kv(default, help: str):
    """A run-time cache option: its default and the help the CLI shows for its --kv-* flag."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class KVCacheOptions:
    """Runtime compression of the cache on top of the checkpoint's plan (see `quantization.py`, `eviction.py`).

    Given at load time as one nested entry, `from_pretrained(dir, kv_cache={"bits": 4, "budget": 128})`; the
    field defaults below are the one table of defaults, and the CLI's --kv-* flags are generated from them.
    Quantization (KIVI-style) stores latents along `latent_axis`, keys per channel and values per token; a
    checkpoint may give each group its own `bits`, which `bits` here overrides (`CommonKVConfig.layer_options`).
    Eviction (SnapKV-style) scores the prompt with its last `observe` queries once, after the prefill.
    """

    bits: int | None = _kv(None, "Store the whole cache at 8, 4 or 2 bits (asymmetric codes, float16 scales) or 16 "
                                 "(unquantized), overriding the precision the checkpoint gives each group (default: "
                                 "the checkpoint's).")
    group: int = _kv(32, "bits: values per quantization group (a multiple of 4).")
    residual: int = _kv(32, "bits: most recent tokens kept unquantized.")
    sink: int = _kv(0, "bits: first tokens kept unquantized (attention sinks; fewer than group), left out of the "
                       "range of the group they open.")
    clip: bool = _kv(False, "bits: give each group the range, of its min-max range and a few shrunk about its middle, "
                            "that reads it back with the least squared error (2 bits: about half the error; costs "
                            "time when tokens are quantized, none when read).")
    latent_axis: str = _kv("channel", "bits: quantize latents per channel or per token.")
    budget: int | None = _kv(None, "After a prefill longer than budget + observe, keep per layer this many context "
                                   "tokens (those the last observe queries attend to most) plus the observe tokens.")
    observe: int = _kv(32, "budget: the observation window, recent tokens that score the context and are always kept.")
    pool: int = _kv(7, "budget: scores are max-pooled over this many neighbours (odd).")
    scope: str = _kv("layer", "budget: layer (each cached layer picks by its own readers' scores) or model (one pick "
                              "for every layer, by the scores summed over all: a token a few layers need is kept "
                              "everywhere).")

    def __post_init__(self):
        checks = [
            (self.bits in (None, 16, *GROUP_BITS), (f"kv_cache bits={self.bits} is not supported; pass 8, 4 or 2, 16 "
                                                    "(unquantized) or None (as the checkpoint says)")),
            (self.group > 0 and self.group % 4 == 0, f"kv_cache group={self.group} must be a positive multiple of 4"),
            (self.residual >= 0, f"kv_cache residual={self.residual} must be >= 0"),
            (0 <= self.sink < self.group, f"kv_cache sink={self.sink} must be in [0, group={self.group})"),
            (isinstance(self.clip, bool), f"kv_cache clip={self.clip!r} must be true or false"),
            (self.budget is None or self.budget > 0, f"kv_cache budget={self.budget} must be positive (or None)"),
            (self.observe > 0, f"kv_cache observe={self.observe} must be positive"),
            (self.pool > 0 and self.pool % 2 == 1, f"kv_cache pool={self.pool} must be a positive odd number"),
            (self.latent_axis in ("channel", "token"), f"kv_cache latent_axis={self.latent_axis!r}: pass channel or token"),
            (self.scope in ("layer", "model"), f"kv_cache scope={self.scope!r}: pass layer or model"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    @classmethod
    def from_entry(cls, entry: dict | None) -> KVCacheOptions:
        """The options of a `kv_cache` entry (missing keys take their defaults); unknown keys are refused."""
        entry = dict(entry or {})
        unknown = sorted(set(entry) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"kv_cache has unknown keys {unknown}; use only {[f.name for f in fields(cls)]}.")
        return cls(**entry)

    @property
    def active(self) -> bool:
        """Whether these options themselves quantize or evict (bits 16 and None do not; None leaves each group's
        precision to the checkpoint)."""
        return self.bits in GROUP_BITS or self.budget is not None

    def kept_tokens(self, tokens: int, prompt: int) -> int:
        """Tokens a layer holds after `tokens`, the first `prompt` of which came in one prefill."""
        if self.budget is None or prompt <= self.budget + self.observe:
            return tokens
        return tokens - (prompt - self.budget - self.observe)

    def quantized_tokens(self, held: int) -> int:
        """Of `held` tokens, how many are quantized: all but the most recent `residual` .. residual+group-1,
        in whole groups of `group` tokens (the same rule for both axes, whatever the chunking)."""
        if self.bits not in GROUP_BITS:
            return 0
        return max(0, held - self.residual) // self.group * self.group

    def stream_bytes(self, held: int, width: int, heads: int, axis: str, element_size: int) -> int:
        """Bytes of one cached stream [B=1, heads, held, width]: packed codes + float16 mins/steps + the recent part
        and, once their group is quantized, the `sink` first tokens in the model dtype."""
        q = self.quantized_tokens(held)
        if axis == "token":
            groups = -(-width // self.group)
            quantized = q * (groups * self.group * self.bits // 8 + 2 * SCALE_BYTES * groups) if q else 0
        else:
            quantized = q * -(-width * self.bits // 8) + (q // self.group) * width * 2 * SCALE_BYTES if q else 0
        exact = held - q + (self.sink if q else 0)
        return heads * (quantized + exact * width * element_size)


__all__ = ["GROUP_BITS", "KVCacheOptions", "LAYOUT_FIELDS", "POSITION_BYTES", "SCALE_BYTES"]
