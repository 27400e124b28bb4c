"""Convert random-init Llama-family checkpoints of growing size; record wall time and peak RSS.

    python scripts/scale_benchmark.py --sizes 0.25 0.5 1 2 --root /tmp/scale [--out docs/scale.md]
    python scripts/scale_benchmark.py build 2 /tmp/scale/llama-2b      # only build one checkpoint

Each checkpoint (fp32, 2 GB safetensors shards, byte tokenizer) is written tensor by tensor with the project's
streaming writer, so building it needs one tensor of RAM, not the model. Each conversion runs `commonkv convert`
in a child process under `/usr/bin/time -v` (its "Maximum resident set size" is the figure reported), with a
small calibration set (--samples 8 --seq-len 128 by default: the point is memory, not quality). Results go to
a JSON file next to the models, the markdown table and plot to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Llama shapes per size (billions of parameters, vocabulary 32000, untied embeddings, GQA)
SHAPES: dict[str, dict] = {
    "0.25": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=4),
    "0.5": dict(hidden_size=1536, num_hidden_layers=18, intermediate_size=4096, num_attention_heads=24,
                num_key_value_heads=6),
    "1": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
              num_key_value_heads=4),
    "2": dict(hidden_size=2560, num_hidden_layers=26, intermediate_size=6912, num_attention_heads=20,
              num_key_value_heads=4),
}
VOCAB = 32000
REPO = Path(__file__).resolve().parent.parent


def build(shape: dict, out_dir: Path, vocab: int = VOCAB, seed: int = 0) -> int:
    """Write a random Llama checkpoint of `shape` (a SHAPES entry); returns its parameter count."""
    import torch
    from transformers import AutoConfig

    from commonkv_convert.checkpoint.writer import CheckpointWriter
    from commonkv_convert.testing import byte_tokenizer

    config = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=4096, eos_token_id=256,
                                  pad_token_id=257, bos_token_id=None, tie_word_embeddings=False,
                                  dtype="float32", **shape)
    d, ffn, hd = shape["hidden_size"], shape["intermediate_size"], shape["hidden_size"] // shape["num_attention_heads"]
    d_kv = shape["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(seed)
    count = 0

    def rand(*dims: int) -> torch.Tensor:
        nonlocal count
        count += dims[0] * (dims[1] if len(dims) > 1 else 1)
        return torch.randn(*dims, generator=gen) * config.initializer_range

    def ones(n: int) -> torch.Tensor:
        nonlocal count
        count += n
        return torch.ones(n)

    with CheckpointWriter(out_dir, max_shard_size="2GB", overwrite=True) as writer:
        writer.add_tensor("model.embed_tokens.weight", rand(vocab, d))
        for i in range(shape["num_hidden_layers"]):
            p = f"model.layers.{i}."
            for name, dims in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d_kv, d)),
                               ("self_attn.v_proj", (d_kv, d)), ("self_attn.o_proj", (d, d)),
                               ("mlp.gate_proj", (ffn, d)), ("mlp.up_proj", (ffn, d)), ("mlp.down_proj", (d, ffn))):
                writer.add_tensor(p + name + ".weight", rand(*dims))
            writer.add_tensor(p + "input_layernorm.weight", ones(d))
            writer.add_tensor(p + "post_attention_layernorm.weight", ones(d))
        writer.add_tensor("model.norm.weight", ones(d))
        writer.add_tensor("lm_head.weight", rand(vocab, d))
        writer.write_json("config.json", config.to_dict())
        with tempfile.TemporaryDirectory() as tok:
            for file in byte_tokenizer().save_pretrained(tok):
                writer.copy_file(file)
        writer.finalize()
    return count


def count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def convert_measured(model: Path, out: Path, samples: int, seq_len: int, extra: list[str]) -> dict:
    """`commonkv convert` in a child under /usr/bin/time -v: wall time and maximum RSS of that process."""
    cmd = [sys.executable, "-m", "commonkv_convert.cli", "convert", str(model), str(out), "--ratio", "0.5", "--samples", str(samples),
           "--seq-len", str(seq_len), "--overwrite", "--json", *extra]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"command": " ".join(["commonkv", *cmd[3:]]), "wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024, 1),
            "validation": {k: report.get("validation", {}).get(k) for k in ("top1_agreement", "bytes_match")},
            "achieved_ratio": report["ratio"]["achieved"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gb = [r["weights_gb"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    ax.plot(gb, [r["peak_rss_mb"] * 2**20 / 1e9 for r in rows], "o-", label="peak RSS of the conversion")
    ax.plot(gb, gb, "--", color="grey", label="size of the source weights")
    ax.axhline(2.5, color="red", lw=0.8, ls=":", label="target 2.5 GB")
    ax.set_xlabel("source checkpoint (GB, fp32)")
    ax.set_ylabel("GB (10⁹ bytes)")
    ax.set_title("commonkv convert: memory vs model size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def table(rows: list[dict]) -> str:
    lines = ["| parameters | layers | hidden | weights on disk | wall time | peak RSS | cache bytes = plan |",
             "|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['params'] / 1e9:.2f} B | {r['layers']} | {r['hidden']} | {r['weights_gb']:.2f} GB | "
                     f"{r['wall_s'] / 60:.1f} min | {r['peak_rss_mb'] * 2**20 / 1e9:.2f} GB | "
                     f"{'yes' if r['validation']['bytes_match'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        print(build(SHAPES[sys.argv[2]], Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--root", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--keep", action="store_true", help="keep the built models and outputs")
    parser.add_argument("--out", type=Path, help="write the plot next to this markdown file and print the table")
    parser.add_argument("--table-only", action="store_true", help="only render ROOT/results.json")
    args, extra = parser.parse_known_args()
    results_path = args.root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for size in [] if args.table_only else args.sizes:
        model, out = args.root / f"llama-{size}b", args.root / f"llama-{size}b-commonkv"
        if not (model / "config.json").exists():
            t0 = time.perf_counter()
            params = build(SHAPES[size], model)
            print(f"built {model} ({params / 1e9:.2f} B params) in {time.perf_counter() - t0:.0f} s", flush=True)
        params = count_params(model)
        row = convert_measured(model, out, args.samples, args.seq_len, extra)
        row.update(size=size, params=params, layers=SHAPES[size]["num_hidden_layers"],
                   hidden=SHAPES[size]["hidden_size"],
                   weights_gb=round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9, 2))
        results[size] = row
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    rows = [results[s] for s in SHAPES if s in results]
    if args.out:
        plot(rows, args.out.with_name("scale.png"))
    print(table(rows))


if __name__ == "__main__":
    main()
