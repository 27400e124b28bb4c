"""Recipes for CI: every option survives YAML, flags override a recipe, and the same recipe converts to the
same bytes.

Determinism, as defined in docs/ci.md: with the same source files, recipe, command line and software, every
output file is byte-identical, except that commonkv_report.json also records this run's wall time and peak RSS
(`wall_time_s`, `peak_rss_mb`); with those two keys removed it is identical too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from commonkv_convert.cli import app
from commonkv_convert.recipe import ConvertOptions

from .helpers import check_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = ("wall_time_s", "peak_rss_mb")


# Valid values other than the defaults, for the fields whose type alone does not give one.
OTHER_CHOICES = {"allocator": "uniform", "value_metric": "plain", "key_metric": "query", "layer_weights": "uniform",
                 "factor_weights": "kl",
                 "merge": "weighted", "method": "kvsharer",
                 "share_order": "similar-first", "share_latent": "source", "max_shard_size": "1GB", "device": "cpu",
                 "revision": "a1b2c3d", "base_model": "org/base-model", "bits": "16,8,4", "quant_group": 64}


def _other_value(f: dataclasses.Field, calib: Path):
    """A valid value of the field's type that differs from its default (to prove it really round-trips)."""
    kind, default = str(f.type), f.default
    if f.name in OTHER_CHOICES:
        return OTHER_CHOICES[f.name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return round(default * 0.5 + 0.125, 4)
    if "Path" in kind:
        return calib
    return 7  # int | None (share_layers)


# options whose other value the choices above exclude (--refit needs --merge anchor and --method commonkv)
APART = {"refit": "sequential"}


def test_every_option_round_trips_through_yaml(tmp_path):
    calib = tmp_path / "my_texts.txt"
    calib.write_text("Some calibration text.\n")
    changed = ConvertOptions(**{f.name: _other_value(f, calib) for f in dataclasses.fields(ConvertOptions)
                                if f.name not in APART})
    apart = ConvertOptions(**APART)
    assert all(getattr(apart if f.name in APART else changed, f.name) != f.default
               for f in dataclasses.fields(ConvertOptions))
    recipe = tmp_path / "recipe.yaml"
    for options in (changed, apart):
        recipe.write_text(options.to_yaml())
        assert ConvertOptions.from_yaml(recipe) == options
    assert ConvertOptions.from_yaml(recipe, ratio=0.25, samples=None).ratio == 0.25  # a flag wins, None = unset


def test_example_recipes_load_and_check():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert recipes, "configs/ has an example recipe"
    for recipe in recipes:
        options = ConvertOptions.from_yaml(recipe)
        options.check()
        assert set(yaml.safe_load(recipe.read_text())) <= {f.name for f in dataclasses.fields(ConvertOptions)}


def _hashes(path: Path) -> dict[str, str]:
    out = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if file.name == "commonkv_report.json":
            report = json.loads(data)
            assert all(report.pop(k) > 0 for k in RUN_FIELDS)  # present, then excluded from the comparison
            data = json.dumps(report, sort_keys=True).encode()
        out[str(file.relative_to(path))] = hashlib.sha256(data).hexdigest()
    return out


def _convert_in(monkeypatch, workdir: Path, model: Path, recipe: Path, *flags: str):
    """`commonkv convert MODEL ckpt --recipe RECIPE ...` with ./ckpt inside `workdir` (same command line each time)."""
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, ["convert", str(model), "ckpt", "--recipe", str(recipe), *flags])
    assert result.exit_code == 0, result.output
    return workdir / "ckpt", result


def test_same_recipe_gives_identical_files_and_flags_override(tiny_model_dirs, tmp_path, monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("ratio: 0.5\ngroup_size: 2\nsamples: 8\nseq_len: 64\nrank_step: 4\n")
    model = tiny_model_dirs["qwen2"]
    first, result = _convert_in(monkeypatch, tmp_path / "a", model, recipe)
    second, _ = _convert_in(monkeypatch, tmp_path / "b", model, recipe)
    check_checkpoint(first)
    hashes = _hashes(first)
    assert {"config.json", "model.safetensors", "README.md", "commonkv_recipe.yaml"} <= set(hashes)
    assert hashes == _hashes(second)
    # stdout is not a terminal here: progress is plain log lines, not bars
    progress = [line for line in result.output.splitlines() if "Calibrating" in line or "Writing" in line]
    assert len(progress) >= 5 and all(re.fullmatch(r"\(\d+/\d+\): (Calibrating|Writing)( \S+)* \[\d+\.\ds\]", line)
                                      for line in progress), progress

    third, _ = _convert_in(monkeypatch, tmp_path / "c", model, recipe, "--ratio", "0.7")
    resolved = yaml.safe_load((third / "commonkv_recipe.yaml").read_text())
    assert resolved["ratio"] == 0.7 and resolved["group_size"] == 2 and resolved["rank_step"] == 4
    assert ConvertOptions.from_yaml(third / "commonkv_recipe.yaml") == ConvertOptions(
        **{**ConvertOptions().to_dict(), **resolved, "calib": None})
    assert json.loads((third / "config.json").read_text())["commonkv"]["ratio"]["requested"] == 0.7
