"""The runtime that loads converted checkpoints; importing it registers the classes with the Auto API.

The two modules here are copied verbatim into every checkpoint, so they import only torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_commonkv import CheckpointError, CommonKVConfig
from .modeling_commonkv import CommonKVCache, CommonKVForCausalLM

AutoConfig.register("commonkv", CommonKVConfig, exist_ok=True)
AutoModelForCausalLM.register(CommonKVConfig, CommonKVForCausalLM, exist_ok=True)


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | str = "auto", device: str | None = None,
                    **kwargs) -> CommonKVForCausalLM:
    """Load a converted checkpoint with this package's runtime (no trust_remote_code needed).

    A damaged checkpoint raises ModelSourceError (the CLI's exit 3) with the runtime's one-line reason."""
    from ..errors import ModelSourceError

    try:
        model = CommonKVForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    except CheckpointError as err:
        raise ModelSourceError(f"{path}: {err}") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


__all__ = ["CommonKVConfig", "CommonKVForCausalLM", "CommonKVCache", "load_checkpoint"]
