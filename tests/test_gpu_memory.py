"""scripts/gpu_memory.py's smoke mode on the CPU: every plan, batch and context it measures holds the bytes the
runtime's formula gives, and a plan no conversion can meet is recorded instead of ending the run."""

from __future__ import annotations

import json

import pytest

from .helpers import load_script


@pytest.fixture(scope="module")
def gpu_memory():
    return load_script("gpu_memory")


def test_tiny_run_on_cpu(gpu_memory, tmp_path):
    out = tmp_path / "gm.json"
    gpu_memory.main(["--tiny", "--device", "cpu", "--out", str(out), "--tokens", "96", "--batches", "1", "2",
                     "--decode-tokens", "2", "--decode-warmup", "1", "--models", "base,optimal,plan,plan-fast",
                     "--max-decode-cost", "0.01", "--no-profile"])
    results = json.loads(out.read_text())
    assert "no plan" in results["table"] and "error" in results["conversions"]["plan-fast"]
    assert {m["model"] for m in results["models"]} == {"base", "commonkv-optimal", "commonkv-plan"}
    rows = {(m["model"], r["batch"]): r for m in results["models"] for r in m["rows"]}
    assert len(rows) == 6 and all(r["tokens"] == 96 and "error" not in r for r in rows.values())
    assert all(r["cache_bytes_match"] and r["cache_bytes_after_decode_match"] for r in rows.values())
    for model in ("base", "commonkv-optimal", "commonkv-plan"):
        assert rows[model, 2]["cache_bytes"] == 2 * rows[model, 1]["cache_bytes"]
    for model in ("commonkv-optimal", "commonkv-plan"):
        assert rows[model, 1]["cache_bytes"] <= 0.51 * rows["base", 1]["cache_bytes"]
    assert any(g.get("bits", 16) < 16 for g in results["conversions"]["plan"]["plan"])
    assert "| commonkv-plan | 96 | 2 |" in results["table"]


def test_unknown_model_is_refused(gpu_memory, tmp_path):
    with pytest.raises(SystemExit):
        gpu_memory.parse_args(["--out", str(tmp_path / "x.json"), "--models", "base,fastest"])


@pytest.mark.parametrize("flag", [["--batches", "0"], ["--tokens", "-5"], ["--max-decode-cost", "0"]])
def test_sizes_and_limits_must_be_positive(gpu_memory, tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_memory.parse_args(["--out", str(tmp_path / "x.json"), *flag])
    assert exit_info.value.code == 2 and "is not above 0" in capsys.readouterr().err
