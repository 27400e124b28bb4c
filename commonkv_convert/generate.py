"""`commonkv generate`: load a converted checkpoint and stream a greedy completion."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .architectures import cache_of
from .checkpoint.reader import read_model_config
from .errors import UserInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserInputError(f"--device {device!r} is unknown. To resolve, pass cpu, cuda or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA device is available. To resolve, pass --device cpu.")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r} is unknown. To resolve, pass one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def stream_generate(path: Path, prompt: str, *, max_new_tokens: int, device: str, dtype: str, chat: bool,
                    write: Callable[[str], object], kv_cache: dict | None = None) -> dict:
    """Greedy generation, each token written as it is produced; returns speed and cache size.

    `kv_cache`: run-time cache options (`{"bits": 4, "budget": 128}`, see KVCacheOptions)."""
    from transformers import AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    from .runtime import load_checkpoint

    config = read_model_config(str(path))
    if config.get("model_type") != "commonkv":
        raise UserInputError(f"{path} is not a CommonKV checkpoint. To resolve, convert it first with `commonkv convert`.")
    dev = pick_device(device)
    hf_logging.disable_progress_bar()  # keep the terminal for the generated text
    model = load_checkpoint(path, dtype=pick_dtype(dtype, dev), device=dev, kv_cache=kv_cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(dev)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text)

    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            streamer=_Streamer(tokenizer, skip_prompt=True), return_dict_in_generate=True,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    new_tokens = output.sequences.shape[1] - inputs["input_ids"].shape[1]
    total = output.sequences.shape[1] - 1  # the last token is never fed back, so never cached
    width = torch.empty(0, dtype=model.dtype).element_size()
    return {
        "new_tokens": int(new_tokens),
        "tokens_per_s": new_tokens / elapsed if elapsed > 0 else float("nan"),
        "cache_bytes": cache_of(output).nbytes(),
        "full_cache_bytes": model.config.full_kv_elements_per_token() * total * width,
    }
