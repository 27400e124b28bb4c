"""A/B of the runtime's decode-speed changes: the runtime as it is against the runtime with one change undone,
SmolLM2 at ratio 0.5 (or CHECKPOINT), batch 1, 2k and 8k context.

    python scripts/runtime_ab.py                  # every change (~4 min); needs the checkpoints that
                                                  # scripts/speed_benchmark.py caches
    python scripts/runtime_ab.py --undo rope      # one change

Changes, each undone by restoring what the runtime did before it:
- `rope`: the RoPE tables at the rebuilt keys' positions are computed once per forward for all latent layers that
  read the same positions (`CommonKVCache.key_rope`); before, every latent layer computed them.
- `rope-apply`: `apply_rope` is one product and two in-place half-width updates; before, the textbook
  x·cos + rotate_half(x)·sin (five passes over the keys).
- `latent-attention`: decode attends over the latent with `matmul_attention`, which reads it once for all heads;
  before, the attention function (SDPA) got the latent expanded as every KV head's values.
- `decode-attention`: on a CPU, a kept layer's one-token decode step attends with `matmul_attention` too; before,
  with the registered attention function (SDPA), as the source does.
- `dequantize`: quantized streams convert their codes into a buffer that the layers of a forward share, then scale
  and shift it in place; before, arithmetic on unpacked uint8 codes into memory fresh from the allocator.

The source, the runtime and each undone variant are timed in turn, 3 rounds of 3 steps each on a random-filled
cache (`speed_benchmark.fill_cache`); medians, and each as a ratio against the source measured in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_benchmark as sb

from commonkv_convert.real_models import cache_root
from commonkv_convert.runtime import modeling_commonkv as ckv
from commonkv_convert.runtime import quantization


def per_layer_rope(self, layer_idx, rotary, x, layer_type):
    return ckv.rope_at(rotary, x, self.key_positions(layer_idx, x.device), layer_type)


def sdpa_over_expanded_latent(self, query, key, latent, attention_mask, **kwargs):
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
    return fn(self, query, key, latent.expand(-1, self.num_kv_heads, -1, -1), attention_mask, scaling=self.scaling,
              dropout=0.0, sliding_window=self.sliding_window, **kwargs)[0]


def registered_attention(self, query, key, value, attention_mask, **kwargs):
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
    return fn(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0,
              sliding_window=self.sliding_window, **kwargs)[0]


def uint8_dequantize(data, lo, step, bits, group, axis, width, dtype, out=None):
    codes = quantization.unpack(data, bits)
    if axis == "token":
        codes = codes.unflatten(-1, (-1, group))
        scale, shift, padded = step.float().unsqueeze(-1), lo.float().unsqueeze(-1), codes.shape[-2] * group > width
    else:
        codes = codes[..., :width].unflatten(-2, (-1, group))
        scale, shift, padded = step.float().unsqueeze(-2), lo.float().unsqueeze(-2), False
    if padded:
        values = (codes * scale + shift).flatten(-2)[..., :width].to(dtype)
        return values if out is None else out.copy_(values)
    if out is None:
        out = torch.empty((*data.shape[:-1], width), dtype=dtype, device=data.device)
    view = out.unflatten(-1, (-1, group)) if axis == "token" else out.unflatten(-2, (-1, group))
    torch.mul(codes, scale, out=view)
    view.add_(shift)
    return out


def fresh_take(self, slot, shape, like):
    return like.new_empty(shape)


def textbook_rope(x, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    rot = x[..., :rd]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if rd == x.shape[-1] else torch.cat([rotated, x[..., rd:]], dim=-1)


UNDO: dict[str, tuple[tuple[object, str, Callable], ...]] = {
    "rope": ((ckv.CommonKVCache, "key_rope", per_layer_rope),),
    "latent-attention": ((ckv.CommonKVAttention, "_attend_latent", sdpa_over_expanded_latent),),
    "decode-attention": ((ckv.CommonKVAttention, "_attend", registered_attention),),
    "rope-apply": ((ckv, "apply_rope", textbook_rope),),
    "dequantize": ((quantization, "dequantize", uint8_dequantize), (quantization.Workspace, "take", fresh_take)),
}


@contextmanager
def undone(change: str | None):
    """The runtime with `change` undone (None: as it is)."""
    if change is None:
        yield
        return
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in UNDO[change]]
    for owner, name, before in UNDO[change]:
        setattr(owner, name, before)
    try:
        yield
    finally:
        for owner, name, now in saved:
            setattr(owner, name, now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--undo", nargs="+", choices=list(UNDO), default=list(UNDO))
    parser.add_argument("--checkpoint", type=Path, default=cache_root() / "smollm2-135m-instruct-commonkv-0.5")
    parser.add_argument("--source", type=Path, default=cache_root() / "smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    args = parser.parse_args()
    torch.set_num_threads(2)
    source, converted = sb.load(args.source), sb.load(args.checkpoint)
    variants = {"source": (source, None), "runtime": (converted, None)}
    variants |= {f"without {change}": (converted, change) for change in args.undo}
    for tokens in args.tokens:
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(3):
            for name, (model, change) in variants.items():
                with undone(change):
                    cache = sb.fill_cache(model, 1, tokens)
                    sb.decode_steps(model, cache, 1, 1)
                    times[name] += sb.decode_steps(model, cache, 1, 3)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{tokens} tokens: " + ", ".join(f"{name} {1000 * t:.1f} ms ({med['source'] / t:.2f}x)"
                                                for name, t in med.items()), flush=True)


if __name__ == "__main__":
    main()
