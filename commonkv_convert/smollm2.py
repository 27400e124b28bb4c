"""SmolLM2-135M-Instruct, the demo's real model: its row of `real_models.REAL_MODELS` under the names the demo,
the tests and the scripts import (`smollm2_dir`, `HUB_ID`, `SUBDIR`, `WHEEL`)."""

from __future__ import annotations

from .real_models import REAL_MODELS, cache_root, package_dir, smollm2_dir

_SMOLLM2 = REAL_MODELS["smollm2"]
HUB_ID = _SMOLLM2.hub_id  # what the wheel's GGUF was made from; the card's base_model
GGUF = _SMOLLM2.gguf
SUBDIR = _SMOLLM2.subdir
WHEEL = _SMOLLM2.wheels

__all__ = ["GGUF", "HUB_ID", "SUBDIR", "WHEEL", "cache_root", "package_dir", "smollm2_dir"]
