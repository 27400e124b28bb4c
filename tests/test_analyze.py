"""`commonkv analyze`: the layer × layer maps are the real model's, the suggestion follows its rule, and plots
come from a model or from a converted checkpoint's report."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from commonkv_convert.analyze import ERROR_HIGH, ERROR_LOW, KEEP_TOKENS, RATIO_GRID, analyze, suggest
from commonkv_convert.calibration_data import DEFAULT_CALIBRATION, read_texts, token_sequences
from commonkv_convert.cli import app
from commonkv_convert.errors import UserInputError
from commonkv_convert.plots import require_matplotlib
from commonkv_convert.recipe import ConvertOptions

from .helpers import TINY_CALIB, convert_tiny

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tiny_analysis(tiny_model_dirs) -> dict:
    return analyze(str(tiny_model_dirs["llama"]), ConvertOptions(group_size=2, **TINY_CALIB))


def test_maps_match_a_full_forward_of_the_model(tiny_model_dirs, tiny_analysis):
    """Hidden / key / value maps equal cosines computed from transformers' own full forward pass."""
    src = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = token_sequences(read_texts(DEFAULT_CALIBRATION), AutoTokenizer.from_pretrained(src),
                             TINY_CALIB["samples"], TINY_CALIB["seq_len"])
    kept = torch.linspace(0, tokens.numel() - 1, min(KEEP_TOKENS, tokens.numel())).long()
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states  # embeddings + each layer's output
    layers = model.config.num_hidden_layers
    reference = {"hidden": [], "key": [], "value": []}
    for l, layer in enumerate(model.model.layers):
        x = layer.input_layernorm(states[l])
        reference["hidden"].append(states[l].flatten(0, 1)[kept])
        reference["key"].append(layer.self_attn.k_proj(x).flatten(0, 1)[kept])
        reference["value"].append(layer.self_attn.v_proj(x).flatten(0, 1)[kept])
    for kind, rows in reference.items():
        unit = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
        expected = torch.einsum("itd,jtd->ij", unit, unit) / unit.shape[1]
        got = torch.tensor(tiny_analysis["matrices"][kind])
        assert got.shape == (layers, layers)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=0), kind


def test_latent_map_is_blockwise_and_adjacent_rows_agree(tiny_analysis):
    latent = tiny_analysis["matrices"]["latent"]
    for i, row in enumerate(latent):
        for j, value in enumerate(row):
            assert (value is None) == (i // 2 != j // 2), (i, j)
    assert all(latent[i][i] == pytest.approx(1.0, abs=1e-3) for i in range(len(latent)))
    for row in tiny_analysis["adjacent"]:
        i, j = row["layers"]
        assert row["hidden"] == tiny_analysis["matrices"]["hidden"][j][i]
        assert ("latent" in row) == (i // 2 == j // 2)
    # every sliding group of 2 has similarities and the merged error at the latent rank
    assert [g["layers"] for g in tiny_analysis["groups"]] == [[l, l + 1] for l in range(tiny_analysis["layers"] - 1)]
    assert all(0 <= g["key_error"] and 0 <= g["value_error"] for g in tiny_analysis["groups"])


def test_error_table_shrinks_with_ratio_and_suggestion_follows_the_rule(tiny_analysis):
    table = tiny_analysis["errors"]
    for size in (1, 2):
        errors = [r["error"] for r in table if r["group_size"] == size and r["error"] is not None]
        assert errors == sorted(errors), "a larger ratio cannot have a smaller optimal error"
    s = tiny_analysis["suggestion"]
    assert s == suggest(table)
    assert s["ratio_high"] is None or s["error_at_high"] <= ERROR_HIGH
    assert s["ratio_low"] is None or s["error_at_low"] <= ERROR_LOW


def test_suggest_prefers_small_groups_unless_larger_ones_pay():
    def table(factor_g2: float) -> list[dict]:  # per-layer error grows with the ratio; merging scales it
        rows = []
        for ratio in RATIO_GRID:
            base = None if ratio > 0.85 else round(0.002 * 2 ** ((ratio - 0.2) * 10), 6)  # doubles every 0.1
            rows.append({"group_size": 1, "ratio": ratio, "error": base})
            rows.append({"group_size": 2, "ratio": ratio, "error": None if base is None else base * factor_g2})
        return rows

    def last_ratio(rows, size, bound):
        return max(r["ratio"] for r in rows if r["group_size"] == size and r["error"] is not None
                   and r["error"] <= bound)

    same = suggest(table(0.99))  # 1% better: not worth merging
    assert (same["group_size"], same["ratio_low"], same["ratio_high"]) == (
        1, last_ratio(table(0.99), 2, ERROR_LOW), last_ratio(table(0.99), 2, ERROR_HIGH))
    better = suggest(table(0.5))  # half the error: merge, and the range moves up by one doubling (0.1)
    assert better["group_size"] == 2
    assert better["ratio_high"] == pytest.approx(same["ratio_high"] + 0.1)
    assert better["ratio_low"] == pytest.approx(same["ratio_low"] + 0.1)


def test_cli_writes_json_and_pngs(tiny_model_dirs, tmp_path):
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", str(tiny_model_dirs["llama"]), "--out", str(out), "--group-size", "2",
                                      "--samples", "8", "--seq-len", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Suggestion: --group-size" in result.output and "Most mergeable" in result.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["source"] == "calibration" and set(data["matrices"]) == {"hidden", "key", "value", "latent"}
    for name in ("hidden", "key", "value", "latent", "similarity", "adjacent"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_converted_checkpoint_is_plotted_from_its_report(tiny_model_dirs, tmp_path):
    ckpt = convert_tiny(tiny_model_dirs["llama"], tmp_path / "ckpt", ratio=0.5, group_size=2)
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", str(ckpt), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = json.loads((ckpt / "commonkv_report.json").read_text())
    assert data["source"] == "report" and data["adjacent"] == report["similarity"]["adjacent"]
    assert (out / "adjacent.png").is_file() and not (out / "hidden.png").exists()


def test_missing_matplotlib_is_one_line_naming_the_extra(monkeypatch, tiny_model_dirs, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserInputError, match=r'pip install -e "\.\[plot\]"'):
        require_matplotlib()
    result = CliRunner().invoke(app, ["analyze", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "[plot]" in result.output
    assert not (tmp_path / "a").exists(), "nothing is written when plotting cannot work"


@pytest.mark.slow
def test_smollm2_shows_the_papers_observation(smollm2):
    """On a real pretrained model: adjacent hidden states alike, raw K/V not, latents under a shared projection
    alike again (docs/analyze has the full-size run; this one uses less calibration text)."""
    result = analyze(str(smollm2), ConvertOptions(group_size=2, ratio=0.7, samples=8, seq_len=128))
    mean = {kind: values[0] for kind, values in result["distance"].items()}  # adjacent pairs
    assert mean["hidden"] > 0.8 and mean["latent"] > 0.7
    assert abs(mean["key"]) < 0.1 and abs(mean["value"]) < 0.1
    assert result["suggestion"]["ratio_high"] is not None
