"""The checkpoint format, in one place: file names, the runtime files every checkpoint ships, the config
block's version, the cache elements a group stores per token (`group_elements`), and the structural check
of a safetensors shard that `push` runs before uploading.

The block's schema itself is checked by the runtime (`CommonKVConfig.check_block`), because a checkpoint
loaded without this package must refuse a damaged block just the same.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..runtime.cache_options import KVCacheOptions
from ..runtime.configuration_commonkv import TESTED_TRANSFORMERS, group_elements

__all__ = ["group_elements"]  # the per-token formula lives with the runtime (a checkpoint must count alone)

RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"
# Every module of the runtime package but its __init__ (which registers the classes with the Auto API):
# the modeling file imports its siblings, so a checkpoint missing one cannot load.
RUNTIME_FILES = tuple(sorted(p.name for p in RUNTIME_DIR.glob("*.py") if p.name != "__init__.py"))

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"
REPORT_FILE = "commonkv_report.json"
EVAL_FILE = "commonkv_eval.json"
RECIPE_FILE = "commonkv_recipe.yaml"
CARD_FILE = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def block_version(groups: list[dict], has_sharing: bool, quantization: dict | None = None) -> int:
    """format_version a block is written with: the oldest that can describe it (2 adds the sharing map, 3 a group's
    `bits`, 4 the `latent_values` mode, 5 a `quantization` layout other than the runtime's defaults, 6 its `sink`,
    7 a group's `tail`, 8 the layout's `clip`),
    so a runtime that predates a feature refuses the checkpoint instead of ignoring the feature or calling it
    damaged."""
    layout = KVCacheOptions.from_entry(quantization)
    if layout.clip:
        return 8
    if any("tail" in g for g in groups):
        return 7
    if layout.sink:
        return 6
    if layout != KVCacheOptions():
        return 5
    if any(g["mode"] == "latent_values" for g in groups):
        return 4
    return 3 if any("bits" in g for g in groups) else 2 if has_sharing else 1


def bits_label(group: dict) -> str:
    """A group's precision as the card, inspect and the plan table show it: "4", "4, 2 from 96" (latent channels
    96.. at 2 bits) or "-" (the model dtype)."""
    if "bits" not in group:
        return "-"
    tail = group.get("tail")
    return f"{group['bits']}, {tail['bits']} from {tail['start']}" if tail else str(group["bits"])


def runtime_fields() -> dict:
    """What the block records about the runtime shipped beside it."""
    return {"transformers_tested": list(TESTED_TRANSFORMERS)}


def shard_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded (header unreadable, or the file shorter or longer than its
    tensors say), or None. Reads the header only: a truncated shard is caught without reading the weights."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return "header longer than the file"
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        return f"unreadable header ({type(err).__name__})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    ends = [t["data_offsets"][1] for name, t in header.items()
            if name != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{size} bytes where its header describes {expected} (truncated or damaged)"
    return None


def shard_tensors(path: Path) -> set[str]:
    """Tensor names in a safetensors header (the file must have passed `shard_problem`)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return {name for name in json.loads(f.read(length)) if name != "__metadata__"}
