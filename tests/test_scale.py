"""Conversion at scale: memory bounded by a layer (not the model), bf16 sources, and the --device option.

The memory test converts a ~400 MB random Llama in a child process and compares its peak RSS (the report's
`peak_rss_mb`, the process's maximum resident set) with that of converting the tiny model with the same flags:
the difference must stay below half the source size, so no stage may hold a full copy of the weights (the
old validation, which reloaded the converted model, needed one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from commonkv_convert.recipe import ConvertOptions

from .helpers import check_checkpoint, convert_tiny, load_script

REPO = Path(__file__).resolve().parent.parent
# 12 layers of a 768-wide Llama with an 8k vocabulary: 87 M parameters, 346 MB in fp32, one layer 25 MB
MEDIUM = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
              num_key_value_heads=3)
FLAGS = ["--samples", "4", "--seq-len", "64", "--group-size", "2", "--rank-step", "64", "--device", "cpu"]


def _peak_rss_mb(model: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "commonkv_convert.cli", "convert", str(model), str(out), *FLAGS,
                           "--quiet"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "commonkv_report.json").read_text())
    assert report["validation"]["bytes_match"]
    return report["peak_rss_mb"]


@pytest.mark.slow
def test_conversion_never_holds_a_copy_of_the_weights(tmp_path, tiny_model_dirs):
    model = tmp_path / "medium"
    load_script("scale_benchmark").build(MEDIUM, model, vocab=8000)
    source_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    assert source_mb > 300
    baseline = _peak_rss_mb(tiny_model_dirs["llama"], tmp_path / "tiny-out")  # interpreter, torch, transformers
    peak = _peak_rss_mb(model, tmp_path / "medium-out")
    assert peak - baseline < 0.5 * source_mb, (peak, baseline, source_mb)


def test_bf16_source_is_factorized_in_full_precision(tiny_model_dirs, tmp_path):
    """A bf16 model converts to a bf16 checkpoint; at full rank it reproduces the source's logits."""
    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.bfloat16).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tiny_model_dirs["llama"] / name).read_bytes())
    out = convert_tiny(source, tmp_path / "out", ratio=0.0, group_size=1, allow_keep=False, rank_step=64)
    config = check_checkpoint(out)
    assert all(g["mode"] == "per_layer" and g["rank"] == 64 for g in config["commonkv"]["groups"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    validation = json.loads((out / "commonkv_report.json").read_text())["validation"]
    assert validation["bytes_match"]
    # rounding the factors to bf16 costs about what rounding the weights did; factors computed in bf16 would not
    assert validation["top1_agreement"] >= 0.95 and validation["kl_source_to_converted"] < 1e-3, validation


def test_unknown_device_is_a_one_line_error():
    from commonkv_convert.calibrate import resolve_devices
    from commonkv_convert.errors import UserInputError

    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert resolve_devices("auto") == ([torch.device("cuda", i) for i in range(torch.cuda.device_count())]
                                       or [torch.device("cpu")])
    with pytest.raises(UserInputError, match="--device 'tpu' is unknown"):
        resolve_devices("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="To resolve, pass --device cpu"):
            resolve_devices("cuda")


def _products(path: Path) -> dict[str, torch.Tensor]:
    """B · A per layer and projection: independent of the sign of each latent direction."""
    config = json.loads((path / "config.json").read_text())
    tensors = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            tensors.update({n: f.get_tensor(n).double() for n in f.keys() if "kv_groups" in n or "_up." in n})
    out = {}
    for g, group in enumerate(config["commonkv"]["groups"]):
        for layer in group["layers"]:
            for which in "kv":
                up = tensors[f"model.layers.{layer}.self_attn.{which}_up.weight"]
                out[f"{layer}.{which}"] = up @ tensors[f"model.kv_groups.{g}.down.weight"]
    return out


@pytest.mark.gpu
def test_cuda_conversion_matches_cpu(tiny_model_dirs, tmp_path):
    """Calibration and factorization on the GPU give the same plan and the same K/V maps as on the CPU."""
    cpu = convert_tiny(tiny_model_dirs["qwen2"], tmp_path / "cpu", group_size=2, device="cpu")
    gpu = convert_tiny(tiny_model_dirs["qwen2"], tmp_path / "gpu", group_size=2, device="cuda")
    plan = lambda p: json.loads((p / "config.json").read_text())["commonkv"]["groups"]  # noqa: E731
    assert [(g["layers"], g["mode"], g.get("rank")) for g in plan(cpu)] == \
        [(g["layers"], g["mode"], g.get("rank")) for g in plan(gpu)]
    a, b = _products(cpu), _products(gpu)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)
    assert ConvertOptions(device="cuda").device == "cuda"
