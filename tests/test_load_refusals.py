"""A damaged or incomplete checkpoint never loads with random weights; the runtime's other guards.

Each case breaks a private copy of a converted tiny checkpoint the way a user's disk, editor or interrupted
copy could, and loads it through the package (`load_checkpoint`, the CLI) and, where it matters, through
transformers alone with `trust_remote_code` (the checkpoint's own runtime, without this package).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from commonkv_convert.cli import app
from commonkv_convert.errors import ModelSourceError, ValidationError
from commonkv_convert.runtime import load_checkpoint
from commonkv_convert.runtime import configuration_commonkv as runtime_config
from commonkv_convert.runtime.modeling_commonkv import LatentLayer

from .helpers import convert_tiny
from .test_runtime import _run_isolated


@pytest.fixture
def ckpt(merged_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(merged_dirs["llama"], tmp_path / "ckpt"))


def _edit_config(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path: Path, change) -> None:
    (shard,) = path.glob("*.safetensors")
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


NEWER = runtime_config.FORMAT_VERSION + 1  # a format this runtime cannot read
BREAKAGES = {
    "no block": (lambda p: _edit_config(p, lambda c: c.pop("commonkv")), "no commonkv block"),
    "block not a dict": (lambda p: _edit_config(p, lambda c: c.update(commonkv=[1])), "no commonkv block"),
    "newer format": (lambda p: _edit_config(p, lambda c: c["commonkv"].update(format_version=NEWER)),
                     f"format_version {NEWER}"),
    "group lost": (lambda p: _edit_config(p, lambda c: c["commonkv"]["groups"].pop()), "not each of the 4 layers"),
    "bad mode": (lambda p: _edit_config(p, lambda c: c["commonkv"]["groups"][0].update(mode="fused")), "malformed"),
    "rank gone": (lambda p: _edit_config(p, lambda c: c["commonkv"]["groups"][0].pop("rank")), "malformed"),
    "weight missing": (lambda p: _edit_weights(p, lambda t: t.pop("model.layers.1.self_attn.k_up.weight")),
                       "model.layers.1.self_attn.k_up.weight"),
    "down missing": (lambda p: _edit_weights(p, lambda t: t.pop("model.kv_groups.0.down.weight")),
                     "model.kv_groups.0.down.weight"),
    "wrong shape": (lambda p: _edit_weights(p, lambda t: t.update({"model.layers.0.self_attn.v_up.bias": torch.zeros(3)})),
                    "wrong shape"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_damaged_checkpoint_is_a_one_line_error(ckpt, name):
    breakage, message = BREAKAGES[name]
    breakage(ckpt)
    with pytest.raises(ModelSourceError, match=message) as err:
        load_checkpoint(ckpt, dtype=torch.float32)
    assert "\n" not in str(err.value) and "To resolve" in str(err.value)


@pytest.mark.parametrize("name", ["no block", "weight missing"])
def test_damaged_checkpoint_from_the_cli(ckpt, name):
    BREAKAGES[name][0](ckpt)
    result = CliRunner().invoke(app, ["generate", str(ckpt), "hi", "--max-new-tokens", "2"])
    assert result.exit_code == ModelSourceError.exit_code, result.output
    assert "Traceback" not in result.output and BREAKAGES[name][1] in result.output


@pytest.mark.parametrize("name", ["no block", "weight missing"])
def test_damaged_checkpoint_refused_without_the_package(ckpt, tmp_path, name):
    """The checkpoint's own copy of the runtime refuses it just the same."""
    BREAKAGES[name][0](ckpt)
    run = _run_isolated("""
        import os
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(os.environ["CKPT"], trust_remote_code=True)
        except ValueError as err:
            print("REFUSED", str(err))
        else:
            print("LOADED")
    """, tmp_path, ckpt)
    assert run.stdout.startswith("REFUSED") and BREAKAGES[name][1] in run.stdout, run.stdout + run.stderr[-2000:]


def test_card_snippet_loads_the_tokenizer_without_a_prompt(ckpt, tmp_path):
    """transformers asks on stdin before running custom code; the card's snippet must never get there."""
    card = (ckpt / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "trust_remote_code=True" in snippet.split("AutoTokenizer.from_pretrained", 1)[1].splitlines()[0]
    snippet = re.sub(r'from_pretrained\("[^"]*"', 'from_pretrained(os.environ["CKPT"]', snippet)
    run = _run_isolated("import builtins, os\n"
                        "def no_prompt(*args):\n"
                        "    raise SystemExit('PROMPTED: ' + str(args)[:80])\n"
                        "builtins.input = no_prompt\n"
                        + snippet + "print('OK', type(model).__name__, tokenizer('hi')['input_ids'])\n", tmp_path, ckpt)
    assert run.returncode == 0 and run.stdout.startswith("OK CommonKVForCausalLM"), run.stdout + run.stderr[-2000:]


def test_untested_transformers_warns_once_naming_the_range(ckpt, monkeypatch):
    low, high = runtime_config.TESTED_TRANSFORMERS
    assert json.loads((ckpt / "config.json").read_text())["commonkv"]["transformers_tested"] == [low, high]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(ckpt, dtype=torch.float32)
    assert not [w for w in caught if "tested with transformers" in str(w.message)]
    monkeypatch.setattr(runtime_config.transformers, "__version__", "9.1.0")
    with pytest.warns(UserWarning, match=f"tested with transformers {low} to {high}; 9.1.0 is installed"):
        load_checkpoint(ckpt, dtype=torch.float32)


def test_tested_range_matches_the_declared_dependency():
    """pyproject's transformers range is the one the suite runs on (.ci/run installs both ends)."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    low, high = runtime_config.TESTED_TRANSFORMERS
    major, minor, _ = (int(x) for x in high.split("."))
    assert f'"transformers>={low},<{major}.{minor + 1}"' in pyproject
    assert f"OLDEST_TRANSFORMERS={low}\n" in ci


@pytest.mark.parametrize("keep, expected", [(5, 5), (0, 0), (-3, 7), (12, 10), (-20, 0)])
def test_latent_crop_keeps_or_removes_like_transformers(keep, expected):
    layer = LatentLayer()
    layer.update(torch.randn(2, 1, 10, 4))
    layer.crop(keep)
    assert layer.get_seq_length() == expected


def test_validation_gate_on_logits(tiny_model_dirs, tmp_path):
    """Exit 7 and no output when the logits stray past --max-kl; the gate is recorded when it passes."""
    with pytest.raises(ValidationError, match="max-kl"):
        convert_tiny(tiny_model_dirs["llama"], tmp_path / "strict", ratio=0.5, max_kl=1e-9)
    assert not (tmp_path / "strict").exists()
    out = convert_tiny(tiny_model_dirs["llama"], tmp_path / "ok", ratio=0.5)
    validation = json.loads((out / "commonkv_report.json").read_text())["validation"]
    assert validation["passed"] is True and validation["max_kl"] == 2.0
    assert validation["kl_source_to_converted"] <= 2.0


def test_block_records_one_format_version(merged_dirs):
    text = (merged_dirs["llama"] / "config.json").read_text()
    assert text.count('"format_version"') == 1
