"""`commonkv inspect`: what a model's KV cache costs per token, and how a converted one is laid out."""

from __future__ import annotations

from .architectures import resolve
from .checkpoint.reader import read_model_config

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def describe(model: str, *, revision: str | None = None) -> dict:
    """Facts for a plain or converted model, from config.json alone (no weights are read)."""
    config = read_model_config(model, revision=revision)
    converted = config.get("model_type") == "commonkv"
    facts = resolve({**config, "model_type": config["base_model_type"]} if converted else config)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    width = DTYPE_BYTES.get(dtype, 4)
    info = {
        "family": facts.family.model_type,
        "layers": facts.num_layers,
        "hidden_size": facts.hidden_size,
        "attention_heads": facts.num_heads,
        "kv_heads": facts.num_kv_heads,
        "head_dim": facts.head_dim,
        "attention": "MQA" if facts.num_kv_heads == 1 else ("GQA" if facts.num_kv_heads < facts.num_heads else "MHA"),
        "qkv_bias": facts.qkv_bias,
        "qk_norm": facts.qk_norm,
        "dtype": dtype,
        "full_kv_elements_per_token": facts.kv_elements_per_token,
        "full_kv_bytes_per_token": facts.kv_elements_per_token * width,
    }
    if converted:
        block = config["commonkv"]
        groups = [{"layers": g["layers"], "mode": g["mode"], "rank": g.get("rank"), "elements": _elements(g, facts)}
                  for g in block["groups"]]
        elements = sum(g["elements"] for g in groups)
        info.update(
            converted=True,
            base_model=block.get("base_model", {}).get("id"),
            kv_elements_per_token=elements,
            kv_bytes_per_token=elements * width,
            achieved_ratio=round(1 - elements / facts.kv_elements_per_token, 6),
            requested_ratio=block.get("ratio", {}).get("requested"),
            groups=groups,
        )
    return info


def _elements(group: dict, facts) -> int:
    if group["mode"] == "keep":
        return 2 * facts.d_kv * len(group["layers"])
    return group["rank"] * (1 if group["mode"] == "merged" else len(group["layers"]))
