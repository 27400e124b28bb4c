"""The `weighted` merge mode: factors, checkpoint fields, cache bytes, exact prefill, batching, the CLI flag."""

from __future__ import annotations

import json

import pytest
import torch

from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime.modeling_commonkv import WeightedLayer
from commonkv_convert.weighted import weighted_factorize

from .helpers import check_checkpoint, left_padded


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_factors_solve_their_least_squares_problems():
    """B_l, the merge weights and the held-out errors against a direct computation on random data."""
    gen = torch.Generator().manual_seed(0)
    d, rows, t = 24, 16, 400
    def inputs():
        x0 = torch.randn(d, t, generator=gen, dtype=torch.float64)
        return [x0, x0 + 0.5 * torch.randn(d, t, generator=gen, dtype=torch.float64)]
    x, h = inputs(), inputs()
    w = {l: torch.randn(rows, d, generator=gen, dtype=torch.float64) for l in (0, 1)}
    cand = weighted_factorize(w, lambda i, j: x[i] @ x[j].T, lambda i, j: h[i] @ h[j].T, torch.arange(4, 21, 4))
    for idx, rank in enumerate(cand.ranks.tolist()):
        down, up = cand.factors(rank)
        mix = cand.merge_weights[idx].double().requires_grad_(True)
        loss = sum(((w[l] @ x[l] - up[l] @ down @ (mix[0] * x[0] + mix[1] * x[1])) ** 2).sum() for l in (0, 1))
        (grad,) = torch.autograd.grad(loss, mix)
        assert grad.abs().max() < 1e-4 * loss  # w minimizes the fit-split loss
        for l in (0, 1):
            gram = x[l] @ x[l].T
            gram = gram + torch.eye(d, dtype=gram.dtype) * gram.diagonal().mean() * 1e-5
            direct = w[l] @ gram @ down.T @ torch.linalg.inv(down @ gram @ down.T)
            assert torch.allclose(up[l], direct, atol=1e-6)
            err = w[l] @ h[l] - up[l] @ down @ (mix[0] * h[0] + mix[1] * h[1]).detach()
            ref = w[l] @ h[l]
            for rows_, got in ((slice(0, 8), cand.err_k[l][idx]), (slice(8, None), cand.err_v[l][idx])):
                expected = (err[rows_] ** 2).sum() / (ref[rows_] ** 2).sum()
                assert abs(float(expected) - float(got)) < 1e-4 * max(1.0, float(expected))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_checkpoint_records_weighted_groups(family, weighted_dirs):
    config = check_checkpoint(weighted_dirs[family])
    block = config["commonkv"]
    assert block["merge_mode"] == "weighted"
    for group in block["groups"]:
        assert group["mode"] == "merged" and group["merge"] == "weighted"
        assert len(group["weights"]) == len(group["layers"])
        assert all(torch.isfinite(torch.tensor(group["weights"])))
        assert (group["sink"], group["window"], group["block"]) == (2, 4, 2)
    report = json.loads((weighted_dirs[family] / "commonkv_report.json").read_text())
    assert report["validation"]["bytes_match"]
    assert block["ratio"]["achieved"] >= 0.6 and "asymptotic" in block["ratio"]["basis"]


@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 9, 20])
def test_cache_bytes_equal_analytic(weighted_dirs, length):
    """Below and above S + W, after prefill and after every decode step (folding in blocks of K)."""
    model = load_checkpoint(weighted_dirs["qwen2"], dtype=torch.float32)
    ids = _ids(2, length + 7)
    with torch.inference_mode():
        cache = model(ids[:, :length], use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_elements(length) * 2 * 4
        for t in range(length, length + 7):
            cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
            assert cache.nbytes() == model.config.cache_elements(t + 1) * 2 * 4, t + 1
    rank = model.config.commonkv["groups"][0]["rank"]
    layers = [i for i, layer in enumerate(cache.layers) if isinstance(layer, WeightedLayer)]
    assert layers == [0, 1, 2, 3]
    total = length + 7  # sinks 2, then recent n if n < 4 else 4 + (n - 4) % 2
    recent = total - 2 if total - 2 < 4 else 4 + (total - 6) % 2
    assert cache.layers[0].recent.shape == (2, 1, recent, rank)
    assert cache.layers[0].group.merged.shape[-2] == total - 2 - recent


def _unfolded(path):
    model = load_checkpoint(path, dtype=torch.float32)
    for group in model.config.commonkv["groups"]:
        group["window"] = 10**9
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_attends_with_own_latents(family, weighted_dirs):
    """One forward over T tokens equals the same factors with folding off: the fold comes after attending."""
    model, unfolded = load_checkpoint(weighted_dirs[family], dtype=torch.float32), _unfolded(weighted_dirs[family])
    ids = _ids(2, 30, 4)
    with torch.inference_mode():
        folded_out, plain_out = model(ids, use_cache=True), unfolded(ids, use_cache=True)
        assert torch.equal(folded_out.logits, plain_out.logits)
        assert folded_out.past_key_values.nbytes() < plain_out.past_key_values.nbytes()
        # the next token reads merged latents for the folded tokens: no longer the per-layer model's answer
        nxt = _ids(2, 1, 5)
        after = model(nxt, past_key_values=folded_out.past_key_values).logits
        reference = unfolded(nxt, past_key_values=plain_out.past_key_values).logits
    assert not torch.equal(after, reference) and torch.isfinite(after).all()


def test_left_padded_batch_rows_are_independent(weighted_dirs):
    """Batch of 3 left-padded prompts: each row generates what it generates alone with the same padding, and
    the unpadded (longest) row what its prompt generates alone. Fold points are cache slots, shared by the
    rows, so a shorter prompt folds its tokens as its padded length says (see the module docstring)."""
    model = load_checkpoint(weighted_dirs["qwen2"], dtype=torch.float32)
    prompts = [_ids(1, n, n)[0] for n in (5, 11, 8)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=257)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for row in range(3):
        alone = model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **kwargs)[0, width:]
        assert torch.equal(batched[row], alone), f"prompt {row}"
    assert torch.equal(batched[1], model.generate(prompts[1][None], **kwargs)[0, len(prompts[1]):])


def test_cli_merge_flag_reaches_the_plan(tiny_model_dirs):
    from typer.testing import CliRunner

    from commonkv_convert.cli import app

    args = ["convert", str(tiny_model_dirs["llama"]), "--dry-run", "--json", "--ratio", "0.6", "--group-size", "2",
            "--allocator", "uniform", "--merge", "weighted", "--samples", "8", "--seq-len", "64"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert [row["mode"] for row in plan] == ["merged", "merged"]


@pytest.mark.parametrize("bad", [dict(merge="mean"), dict(block=0), dict(sink=-1)])
def test_bad_merge_options_are_refused(bad):
    from commonkv_convert.errors import UserInputError
    from commonkv_convert.recipe import ConvertOptions

    with pytest.raises(UserInputError, match="To resolve"):
        ConvertOptions(**bad).check()


def test_weighted_checkpoint_runs_with_remote_code_only(weighted_dirs, tmp_path):
    from .test_runtime import _run_isolated

    ok = _run_isolated("""
        import os, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(os.environ["CKPT"], trust_remote_code=True)
        out = model.generate(torch.arange(1, 21)[None], max_new_tokens=6, do_sample=False, pad_token_id=257,
                             return_dict_in_generate=True)
        expected = model.config.cache_elements(25) * 4
        print("OK", out.sequences.shape[1], out.past_key_values.nbytes() == expected)
    """, tmp_path, weighted_dirs["qwen3"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.startswith("OK 26 True")
