"""Model builders for tests and benchmark scripts: tiny random models, and the real models of
commonkv_convert.real_models (`smollm2_dir`, which `commonkv demo` uses too, and `qwen25_dir`).

Everything is built locally (the Hub is out of reach), so tests and benchmarks run offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .real_models import qwen25_dir, smollm2_dir

__all__ = ["TINY_FAMILIES", "build_tiny_model", "byte_tokenizer", "qwen25_dir", "smollm2_dir"]

_TINY_COMMON: dict = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "vocab_size": 258,  # 256 bytes + <eos> + <pad> of the byte tokenizer below
    "eos_token_id": 256,
    "pad_token_id": 257,
    "bos_token_id": None,
    "max_position_embeddings": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "dtype": "float32",
    # Larger than the 0.02 default so attention is far from uniform and a wrong key shows in the logits.
    "initializer_range": 0.1,
}

TINY_FAMILIES: dict[str, dict] = {
    "llama": {"model_type": "llama", **_TINY_COMMON},
    "llama-mqa": {"model_type": "llama", **_TINY_COMMON, "num_key_value_heads": 1},
    # every layer slides; the window is shorter than calibration sequences and test prompts, so it matters
    "mistral": {"model_type": "mistral", **_TINY_COMMON, "sliding_window": 24},
    "qwen2": {"model_type": "qwen2", **_TINY_COMMON},  # q/k/v biases are built in
    "qwen3": {"model_type": "qwen3", **_TINY_COMMON, "head_dim": 16},  # q_norm / k_norm built in
    "mixtral": {"model_type": "mixtral", **_TINY_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": None},  # MoE MLP
    "qwen3_moe": {"model_type": "qwen3_moe", **_TINY_COMMON, "head_dim": 16, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 64},  # MoE MLP, q/k norm
    # scaled embeddings, (1 + w) norms around attention and MLP, sliding and global layers with their own rope,
    # q/k norm, MQA, a query scale that is not 1/√head_dim
    "gemma3": {"model_type": "gemma3_text", **_TINY_COMMON, "num_key_value_heads": 1, "head_dim": 16,
               "query_pre_attn_scalar": 24, "sliding_window": 16,
               "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]},
    "phi3": {"model_type": "phi3", **_TINY_COMMON, "partial_rotary_factor": 0.5},  # fused qkv_proj, partial RoPE
    "olmo2": {"model_type": "olmo2", **_TINY_COMMON},  # q/k norm over all heads, norms after attention and MLP
}
"""Family name -> config kwargs (with ``model_type``) for ``AutoConfig.for_model``."""

def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model (fp32 safetensors) to ``out_dir`` and return it.

    Biases and q/k norm weights are randomized: their default zeros / ones would let a converter
    that drops or misplaces them pass the tests.
    """
    kwargs = dict(TINY_FAMILIES[family])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.random.fork_rng(devices=[]):  # seed the build without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_attention_extras(model, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


def byte_tokenizer():
    """A real fast tokenizer over raw bytes (ids 0-255) plus <eos>=256 and <pad>=257, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_OF[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<eos>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")


def _byte_map() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (char -> byte value)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_map()


def _randomize_attention_extras(model: PreTrainedModel, seed: int) -> None:
    """Give every attention bias and q/k norm weight non-trivial random values."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".self_attn." not in name:
                continue
            if name.endswith("_proj.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=gen))
