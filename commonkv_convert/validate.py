"""Validate a written checkpoint: reload it with the runtime, compare logits with the source's, and check
that a real cache holds exactly the bytes the plan says."""

from __future__ import annotations

from pathlib import Path

import torch

from .memory import release_memory
from .progress import Reporter

VALIDATION_LOGITS = 64  # positions per validation sequence whose logits are compared (vocab-sized each)


def validate_checkpoint(out_dir: Path, tokens: torch.Tensor, final_hidden: torch.Tensor | None,
                        reporter: Reporter) -> dict:
    """Reload with the runtime; compare logits with the source's and cache bytes with the plan."""
    from .runtime import load_checkpoint

    release_memory()
    with reporter.stage("Validating", tokens.shape[0]) as bar, torch.inference_mode():
        model = load_checkpoint(out_dir, dtype=torch.float32)
        metrics, measured = [], 0
        for i in range(tokens.shape[0]):  # one sequence at a time: logits are T × vocab floats
            out = model(tokens[i:i + 1], use_cache=True, logits_to_keep=VALIDATION_LOGITS)
            if final_hidden is not None:
                reference = model.lm_head(final_hidden[i:i + 1, -VALIDATION_LOGITS:])
                metrics.append(compare_logits(reference, out.logits))
            measured += out.past_key_values.nbytes()
            del out
            bar.advance()
    width = torch.empty(0, dtype=torch.float32).element_size()
    # per sequence: weighted groups hold sinks + merged + recent, not the asymptotic r per token
    expected = sum(model.config.cache_elements(tokens.shape[1]) for _ in range(tokens.shape[0])) * width
    full = model.config.full_kv_elements_per_token() * tokens.numel() * width
    result = {"sequences": tokens.shape[0], "tokens_per_sequence": tokens.shape[1],
              "compared_positions": min(VALIDATION_LOGITS, tokens.shape[1])}
    if metrics:
        result.update(top1_agreement=round(sum(m["top1_agreement"] for m in metrics) / len(metrics), 4),
                      kl_source_to_converted=round(sum(m["kl_source_to_converted"] for m in metrics) / len(metrics), 6),
                      max_abs_logit_diff=max(m["max_abs_logit_diff"] for m in metrics))
    result.update(cache_bytes=measured, cache_bytes_expected=expected, full_cache_bytes=full,
                  measured_ratio=round(1 - measured / full, 6), bytes_match=measured == expected)
    return result


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    ref_logp = reference.float().log_softmax(-1)
    logp = logits.float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
    return {
        "top1_agreement": round(float((reference.argmax(-1) == logits.argmax(-1)).float().mean()), 4),
        "kl_source_to_converted": round(float(kl), 6),
        "max_abs_logit_diff": round(float((reference - logits).abs().max()), 6),
    }
