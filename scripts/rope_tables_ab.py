"""A/B of one runtime change: RoPE tables shared by the latent layers of a forward (`CommonKVCache.key_rope`)
against recomputed in every latent layer (the runtime before it), SmolLM2 at ratio 0.5, batch 1, 2k and 8k.

    python scripts/rope_tables_ab.py    # needs the checkpoints scripts/speed_benchmark.py caches (~2 min)

Source, shared and per-layer are timed in turn, 3 rounds of 3 steps each on a random-filled cache; medians.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_benchmark as sb

from commonkv_convert.real_models import cache_root
from commonkv_convert.runtime import modeling_commonkv as ckv


def per_layer(self, layer_idx, rotary, x, layer_type):
    """The runtime before key_rope: every latent layer computes the tables at all T positions itself."""
    return ckv.rope_at(rotary, x, self.key_positions(layer_idx, x.device), layer_type)


def main() -> None:
    torch.set_num_threads(2)
    root = cache_root()
    models = {"source": sb.load(root / "smollm2-135m-instruct")}
    models["shared"] = models["per_layer"] = sb.load(root / "smollm2-135m-instruct-commonkv-0.5")
    shared = ckv.CommonKVCache.key_rope
    for tokens in (2048, 8192):
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(3):
            for name, model in models.items():
                ckv.CommonKVCache.key_rope = per_layer if name == "per_layer" else shared
                cache = sb.fill_cache(model, 1, tokens)
                sb.decode_steps(model, cache, 1, 1)
                times[name] += sb.decode_steps(model, cache, 1, 3)
        ckv.CommonKVCache.key_rope = shared
        med = {name: statistics.median(t) for name, t in times.items()}
        print(tokens, {name: f"{1000 * t:.1f} ms" for name, t in med.items()},
              f"vs source: shared {med['source'] / med['shared']:.2f}x, per-layer {med['source'] / med['per_layer']:.2f}x")


if __name__ == "__main__":
    main()
