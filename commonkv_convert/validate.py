"""Validate a written checkpoint: reload it with the runtime, compare logits with the source's, and check
that a real cache holds exactly the bytes the plan says."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .architectures import CACHE_KWARG, cache_of
from .budget import Pricing
from .calibrate import module_names, module_state
from .checkpoint.reader import open_model
from .memory import release_memory
from .progress import Reporter

VALIDATION_LOGITS = 64  # positions per validation sequence whose logits are compared (vocab-sized each)


def validate_checkpoint(out_dir: Path, tokens: torch.Tensor, final_hidden: torch.Tensor | None,
                        reporter: Reporter) -> dict:
    """Reload with the runtime; compare logits with the source's and cache bytes with the plan."""
    release_memory()
    with reporter.stage("Validating", tokens.shape[0]) as bar, torch.inference_mode(), \
            layerwise_model(out_dir) as model:
        metrics, measured = [], 0
        # the compared positions are a second forward: they attend to the cache as it holds the rest (quantized,
        # merged), as generated tokens do, not to the exact keys and values a single prefill attends with
        split = max(tokens.shape[1] - VALIDATION_LOGITS, 1)
        for i in range(tokens.shape[0]):  # one sequence at a time: logits are T × vocab floats
            first = model(tokens[i:i + 1, :split], use_cache=True, logits_to_keep=1)
            out = model(tokens[i:i + 1, split:], **{CACHE_KWARG: cache_of(first)}, use_cache=True)
            del first
            if final_hidden is not None:
                reference = model.lm_head(final_hidden[i:i + 1, split:])
                metrics.append(compare_logits(reference, out.logits))
            measured += cache_of(out).nbytes()
            del out
            bar.advance()
    width = torch.empty(0, dtype=torch.float32).element_size()
    # one sequence at a time, each as the cache holds it (weighted groups: sinks + merged + recent; groups with bits:
    # packed codes), not the asymptotic figure per token
    expected = model.config.cache_bytes(tokens.shape[1], width, batch=tokens.shape[0])
    full = model.config.full_kv_elements_per_token() * tokens.numel() * width
    result = {"sequences": tokens.shape[0], "tokens_per_sequence": tokens.shape[1],
              "compared_positions": tokens.shape[1] - split}
    if metrics:
        result.update(top1_agreement=round(sum(m["top1_agreement"] for m in metrics) / len(metrics), 4),
                      kl_source_to_converted=round(sum(m["kl_source_to_converted"] for m in metrics) / len(metrics), 6),
                      max_abs_logit_diff=max(m["max_abs_logit_diff"] for m in metrics))
    result.update(cache_bytes=measured, cache_bytes_expected=expected, full_cache_bytes=full,
                  measured_ratio=round(1 - measured / full, 6), bytes_match=measured == expected)
    context = model.config.commonkv["ratio"].get("context", Pricing.context)  # a plan without bits: any
    result["removed_at_16_bits"] = {"tokens": context, "measured": round(removed_at_16_bits(model.config, context), 6)}
    return result


def filled_cache(config, batch: int, tokens: int, make: Callable[..., torch.Tensor]):
    """A runtime cache (`CommonKVCache`) holding `tokens` tokens per sequence, as a prefill would leave it: each
    storing layer gets `make(*shape)` as its latent [B, 1, T, r], its K/V [B, h, T, hd] or its keys and value
    latent, then `finish()` folds and quantizes as after a real forward. Its bytes do not depend on the content."""
    from .runtime.modeling_commonkv import CommonKVCache

    cache = CommonKVCache(config)
    for layer, role in zip(cache.layers, cache.roles):
        if not role.stores or role.borrow >= 0:
            continue
        shape = (batch, config.num_key_value_heads, tokens, config.head_dim)
        if role.latent:
            layer.update(make(batch, 1, tokens, role.rank))
        elif role.value_latent:  # its keys and its value latent
            layer.update(make(*shape), make(batch, 1, tokens, role.rank))
        else:
            layer.update(make(*shape), make(*shape))
    cache.finish()
    return cache


def removed_at_16_bits(config, tokens: int) -> float:
    """Share of the 16-bit full cache's bytes the runtime's bfloat16 cache really saves at `tokens` tokens: what
    --ratio promises, measured with the runtime's own cache layers."""
    held = filled_cache(config, 1, tokens, lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)).nbytes()
    return 1 - held / (config.full_kv_elements_per_token() * tokens * 2)


@contextmanager
def layerwise_model(out_dir: Path) -> Iterator[torch.nn.Module]:
    """The runtime model of a checkpoint with its decoder layers read from the shards only while they run.

    The model's own forward runs unchanged; a hook before each decoder layer materializes its weights (fp32)
    and one after it drops them again, as a disk offload does. So validating costs the embeddings,
    the head and one layer of memory, not a second copy of the model. Every tensor of the checkpoint must be
    used by the runtime: a leftover means the writer and the runtime disagree.
    """
    from .runtime import CommonKVConfig, CommonKVForCausalLM

    config = CommonKVConfig.from_pretrained(out_dir)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):  # no storage for the weights; buffers are rebuilt below
        model = CommonKVForCausalLM(config).eval()
    for name, module in model.model.named_children():  # non-persistent buffers (rotary inv_freq, Gemma's
        if name != "layers" and next(module.buffers(), None) is not None:  # embedding scale): the family's init
            module.to_empty(device="cpu").apply(model.model._init_weights)
    with open_model(str(out_dir)) as shards:
        unused = set(shards.tensor_names())
        family = config.base_model_type

        def load(module: torch.nn.Module, prefix: str) -> None:
            module.load_state_dict(module_state(shards, prefix, family), assign=True, strict=True)

        def use(module: torch.nn.Module, prefix: str) -> None:
            wanted = set(module.state_dict())
            unused.difference_update(n for n, m in module_names(shards, prefix, family).items() if m in wanted)

        tied = config.tie_word_embeddings and "lm_head.weight" not in unused
        for name, module in [*model.model.named_children(), ("lm_head", model.lm_head)]:
            prefix = "lm_head." if name == "lm_head" else f"model.{name}."
            if name == "layers" or (name == "lm_head" and tied):
                continue
            load(module, prefix)
            use(module, prefix)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            use(layer, prefix)
            layer.register_forward_pre_hook(lambda mod, args, p=prefix: load(mod, p))
            layer.register_forward_hook(lambda mod, args, out: _drop(mod))
        if unused:
            raise ValueError(f"the checkpoint holds tensors the runtime does not use: {sorted(unused)[:3]}")
        yield model


def _drop(module: torch.nn.Module) -> None:
    """Back to meta tensors once the layer has run (returns None: a forward hook's result replaces the output)."""
    module.to("meta")


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    ref_logp = reference.float().log_softmax(-1)
    logp = logits.float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
    return {
        "top1_agreement": round(float((reference.argmax(-1) == logits.argmax(-1)).float().mean()), 4),
        "kl_source_to_converted": round(float(kl), 6),
        "max_abs_logit_diff": round(float((reference - logits).abs().max()), 6),
    }
