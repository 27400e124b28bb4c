"""Shared test helpers: run a conversion, and check every output the same way."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open

from commonkv_convert.convert import convert
from commonkv_convert.recipe import ConvertOptions

TINY_CALIB = dict(samples=8, seq_len=64)
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module: the benchmark drivers are files, not part of the package. Their sibling scripts
    are importable while it loads, as when it runs from scripts/."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def convert_tiny(src: Path, out: Path, **options) -> Path:
    """Convert a tiny model with a small calibration set (bundled prompts, byte tokenizer)."""
    opts = ConvertOptions(**{**TINY_CALIB, **options})
    convert(str(src), out, opts, overwrite=True)
    return out


def checkpoint_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_checkpoint(path: Path) -> dict:
    """Assert the structure every converted checkpoint must have; returns its config."""
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "commonkv"
    assert config["architectures"] == ["CommonKVForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert "quantization_config" not in config
    for name in ("configuration_commonkv.py", "modeling_commonkv.py", "commonkv_recipe.yaml",
                 "commonkv_report.json", "README.md"):
        assert (path / name).is_file(), name
    assert not list(path.parent.glob(f".{path.name}.tmp-*")), "temporary directory left behind"
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "kv-cache-compression" in card and "library_name: transformers" in card
    shapes = checkpoint_tensors(path)
    for name, _ in shapes.items():
        assert "k_proj" not in name or _layer_mode(config, name) in ("keep", "latent_values"), name
        assert "v_proj" not in name or _layer_mode(config, name) == "keep", name
    for g, group in enumerate(config["commonkv"]["groups"]):
        if group["mode"] == "keep":
            assert f"model.kv_groups.{g}.down.weight" not in shapes
            continue
        assert shapes[f"model.kv_groups.{g}.down.weight"] == (group["rank"], config["hidden_size"])
        up = "v_up" if group["mode"] == "latent_values" else "k_up"  # latent_values layers keep their k_proj
        for layer in group["layers"]:
            assert shapes[f"model.layers.{layer}.self_attn.{up}.weight"][1] == group["rank"]
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                assert torch.isfinite(f.get_tensor(name).float()).all(), name
    return config


def _layer_mode(config: dict, name: str) -> str:
    layer = int(name.split(".")[2])
    return next(g["mode"] for g in config["commonkv"]["groups"] if layer in g["layers"])


def left_padded(prompts: list[torch.Tensor], pad: int = 257) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a left-padded batch, as generate() expects for decoder-only models."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask
