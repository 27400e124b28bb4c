"""commonkv: compress the KV cache of Hugging Face decoder LLMs by cross-layer SVD sharing."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("commonkv")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "convert": ("commonkv_convert.convert", "convert"),
    "ConvertOptions": ("commonkv_convert.recipe", "ConvertOptions"),
    "load": ("commonkv_convert.runtime", "load_checkpoint"),
    "describe": ("commonkv_convert.inspection", "describe"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """Library API, imported on first use so `commonkv --version` does not pull in torch."""
    if name not in _LAZY:
        raise AttributeError(f"module 'commonkv_convert' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    # importing commonkv_convert.convert bound the submodule to the name `convert`: the function wins from now on
    globals()[name] = value
    return value
