"""commonkv: compress the KV cache of Hugging Face decoder LLMs by cross-layer SVD sharing."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("commonkv")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
