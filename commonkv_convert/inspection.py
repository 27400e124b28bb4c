"""`commonkv inspect`: what a model's KV cache costs per token, and how a converted one is laid out."""

from __future__ import annotations

from .architectures import resolve
from .budget import FULL_BITS, Pricing
from .checkpoint.reader import read_model_config
from .decode_cost import CPU_MACS_PER_BYTE, DTYPE_BYTES, config_predictions


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
        ckv = _converted_config(model, config)
        block = ckv.commonkv
        sharers = ckv.sharing_pairs()
        groups = [{"layers": g["layers"], "mode": "shared" if sharers.keys() >= set(g["layers"]) else g["mode"],
                   "rank": g.get("rank"), "elements": n, **{k: g[k] for k in ("bits", "tail") if k in g},
                   **({"reads": sharers[g["layers"][0]]} if sharers.keys() >= set(g["layers"]) else {})}
                  for g, n in zip(block["groups"], ckv.group_elements_per_token())]
        elements = ckv.kv_elements_per_token()
        pricing = Pricing.of_block(block)
        price = {id(g): _price(g, pricing, facts) for g in groups}
        info.update(
            converted=True,
            base_model=block.get("base_model", {}).get("id"),
            kv_elements_per_token=elements,
            kv_bytes_per_token=round(sum(g["elements"] * (price[id(g)] / 8 if "bits" in g else width)
                                         for g in groups), 3),
            # against the full cache at 16 bits, as the planner states it
            achieved_ratio=round(1 - sum(g["elements"] * price[id(g)] for g in groups)
                                 / (facts.kv_elements_per_token * FULL_BITS), 6),
            requested_ratio=block.get("ratio", {}).get("requested"),
            groups=groups,
            **decode_costs(config),
        )
    return info


def _price(group: dict, pricing: Pricing, facts) -> float:
    """Bits per stored element of a group: 16 unquantized, else its codes, scales and recent window at the
    plan's context, as the planner priced it."""
    bits = group.get("bits", FULL_BITS)
    if group["mode"] == "keep":
        return pricing.kept(bits, facts.head_dim, facts.num_kv_heads)
    if group["mode"] == "latent_values":
        return pricing.latent_values(bits, group["rank"], facts.head_dim, facts.num_kv_heads)
    tail = group.get("tail")
    return pricing.latent(bits, group["rank"] or 0, tail and (tail["start"], tail["bits"]))


def decode_costs(config: dict) -> dict:
    """The predicted decode step against the full cache's at 2k and 8k tokens (flat keys: one table row each)."""
    rows = config_predictions(config)
    return {
        **{f"decode_cost_at_{r.tokens}": round(r.cost, 3) for r in rows},
        "decode_cost_basis": f"predicted step time relative to the full cache (>1: slower), batch 1, "
                             f"{CPU_MACS_PER_BYTE:g} MACs per byte moved (2-core CPU); multiply-adds "
                             + ", ".join(f"{r.macs:.2f}x" for r in rows) + ", bytes "
                             + ", ".join(f"{r.bytes:.2f}x" for r in rows) + " (see commonkv_convert/decode_cost.py)",
    }


def _converted_config(model: str, config: dict):
    """The runtime's config object (its per-token formula is the one the cache obeys), or a one-line error."""
    from .errors import ModelSourceError
    from .runtime.configuration_commonkv import CommonKVConfig

    try:
        ckv = CommonKVConfig(**{k: v for k, v in config.items() if k != "model_type"})
        ckv.check_block()
        return ckv
    except (ValueError, TypeError) as err:
        raise ModelSourceError(f"{model}: {err}") from None
