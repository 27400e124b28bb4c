"""The `commonkv` command line, driven for real: every bad input of `convert` is one line, an exit code, no output.

Most runs go through Typer's CliRunner (in-process, fast); one runs the installed `commonkv` script in a
subprocess to prove what the real entry point prints and returns. Every real conversion uses the tiny models
and `--samples 8 --seq-len 64`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from commonkv_convert import __version__
from commonkv_convert.cli import app
from commonkv_convert.errors import (
    CalibrationError,
    ModelSourceError,
    PlanError,
    UnsupportedModelError,
    UserInputError,
)
from commonkv_convert.testing import TINY_FAMILIES

from .helpers import check_checkpoint

TINY = ["--samples", "8", "--seq-len", "64"]
OUT = "out"  # every convert writes (or must not write) ./out inside the test's empty working directory
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"^\(\d+/\d+\): ")  # "(1/4): Calibrating layer 0 [0.0s]": progress, not an error


# ---------------------------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: relative output paths (and the default OUT_DIR) land here."""
    path = tmp_path / "work"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def invoke(*args: str | Path) -> tuple[int, str, str]:
    """Run `commonkv ARGS` in-process; (exit code, stdout, stderr) without colour codes.

    An exception that escapes the CLI fails the test with its traceback (catch_exceptions=False): the
    real entry point would have printed it.
    """
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COMMONKV_DEBUG": None}, catch_exceptions=False)
    return result.exit_code, _ANSI.sub("", result.stdout), _ANSI.sub("", result.stderr)


def error_line(stderr: str) -> str:
    """The one error line of stderr (progress lines aside); fails unless there is exactly one."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.match(line)]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: ") and "To resolve" in line, line
    return line


def assert_fails(args: list, code: int, work: Path, *needles: str) -> str:
    """`commonkv ARGS` exits with `code`, prints one error line holding every needle, and writes nothing."""
    exit_code, stdout, stderr = invoke(*args)
    line = error_line(stderr)
    assert exit_code == code, (exit_code, line)
    assert "Traceback" not in stdout and not stdout.strip(), stdout
    for needle in needles:
        assert needle in line, (needle, line)
    assert sorted(p.name for p in work.iterdir()) == [], "output (or a .tmp- sibling) left behind"
    return line


@pytest.fixture(scope="module")
def llama(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> dict[str, Path]:
    """Bad (and one pickle-only) model directories and calibration files, built once."""
    root = tmp_path_factory.mktemp("cli_inputs")
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no config.json here\n")

    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "n_head": 2}))
    save_file({"transformer.wte.weight": torch.zeros(4, 8)}, str(gpt2 / "model.safetensors"))

    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    for file in llama.iterdir():
        if file.name != "model.safetensors":  # config, generation config and tokenizer files
            shutil.copy(file, pickle_only / file.name)
    torch.save(load_file(str(llama / "model.safetensors")), pickle_only / "pytorch_model.bin")

    files = {"empty.txt": "", "blank.jsonl": "\n   \n\n", "short.txt": "just a few words", "calib.csv": "text\nhello\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    return {"not_a_model": not_a_model, "gpt2": gpt2, "pickle_only": pickle_only,
            **{name: root / name for name in files}}


def _full_kv_elements(family: str) -> int:
    cfg = TINY_FAMILIES[family]
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return 2 * cfg["num_key_value_heads"] * head_dim * cfg["num_hidden_layers"]


# ---------------------------------------------------------------------------------------------------------
# convert: bad input
# ---------------------------------------------------------------------------------------------------------
def test_missing_path(work: Path) -> None:
    assert_fails(["convert", "./does-not-exist", OUT, *TINY], ModelSourceError.exit_code, work, "./does-not-exist")


def test_directory_without_config(work: Path, inputs: dict[str, Path]) -> None:
    assert_fails(["convert", inputs["not_a_model"], OUT, *TINY], ModelSourceError.exit_code, work, "config.json")


def test_unsupported_architecture_names_supported_families(work: Path, inputs: dict[str, Path]) -> None:
    line = assert_fails(["convert", inputs["gpt2"], OUT, *TINY], UnsupportedModelError.exit_code, work, "gpt2")
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert family in line


@pytest.mark.parametrize("ratio", ["1.0", "-0.1"])
def test_ratio_out_of_range(work: Path, llama: Path, ratio: str) -> None:
    assert_fails(["convert", llama, OUT, "--ratio", ratio, *TINY], UserInputError.exit_code, work, "--ratio")


def test_unreachable_ratio_is_plan_error(work: Path, llama: Path) -> None:
    # d_kv = 32: per-layer ranks are multiples of 32 below 64, so the cheapest plan keeps 4 · 32 > 12 elements.
    args = ["convert", llama, OUT, "--ratio", "0.95", "--group-size", "1", "--rank-step", "32", *TINY]
    assert_fails(args, PlanError.exit_code, work, "--ratio")


def test_rank_step_wider_than_a_layer_is_plan_error(work: Path, llama: Path) -> None:
    args = ["convert", llama, OUT, "--ratio", "0.95", "--group-size", "1", "--rank-step", "64", *TINY]
    assert_fails(args, PlanError.exit_code, work)


@pytest.mark.parametrize("group_size", ["0", "5"])  # the tiny models have 4 layers
def test_group_size_out_of_range(work: Path, llama: Path, group_size: str) -> None:
    assert_fails(["convert", llama, OUT, "--group-size", group_size, *TINY], UserInputError.exit_code, work,
                 "--group-size")


@pytest.mark.parametrize(("flag", "value"), [("--quant-group", "30"), ("--quant-group", "0"), ("--residual", "-1"),
                                             ("--quant-sink", "32")])
def test_bad_quantization_layout(work: Path, llama: Path, flag: str, value: str) -> None:
    line = assert_fails(["convert", llama, OUT, "--bits", "16,4", flag, value, *TINY], UserInputError.exit_code, work,
                        flag)
    assert "--quant-group 32 --residual 32" in line


def test_pickle_weights_need_allow_pickle(work: Path, inputs: dict[str, Path]) -> None:
    assert_fails(["convert", inputs["pickle_only"], OUT, *TINY], ModelSourceError.exit_code, work,
                 "pickle", "--allow-pickle")


def test_pickle_weights_convert_with_allow_pickle(work: Path, inputs: dict[str, Path]) -> None:
    code, stdout, stderr = invoke("convert", inputs["pickle_only"], OUT, "--allow-pickle", "--ratio", "0.5", *TINY)
    assert code == 0, stderr
    assert "Wrote" in stdout and "Traceback" not in stderr
    config = check_checkpoint(work / OUT)
    assert config["commonkv"]["ratio"]["achieved"] >= 0.5
    assert sorted(p.name for p in work.iterdir()) == [OUT]


def test_existing_output_is_left_untouched(work: Path, llama: Path) -> None:
    existing = work / OUT
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me\n")
    code, stdout, stderr = invoke("convert", llama, OUT, *TINY)
    line = error_line(stderr)
    assert code == UserInputError.exit_code and "--overwrite" in line and not stdout.strip()
    assert sorted(p.name for p in work.iterdir()) == [OUT]
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]
    assert (existing / "mine.txt").read_text() == "keep me\n"


@pytest.mark.parametrize(("name", "needle"), [
    ("empty.txt", "empty"),
    ("blank.jsonl", "empty"),
    ("short.txt", "512 are needed"),  # 8 samples × 64 tokens
    ("calib.csv", ".jsonl"),
    ("missing[bold].txt", "missing[bold].txt does not exist"),  # printed as is, not read as Rich markup
])
def test_bad_calibration_file(work: Path, llama: Path, inputs: dict[str, Path], name: str, needle: str) -> None:
    calib = inputs["short.txt"].parent / name
    assert_fails(["convert", llama, OUT, "--calib", calib, *TINY], CalibrationError.exit_code, work, needle)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An empty Hub cache under tmp_path with offline mode on, for this process and for subprocesses."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads these once, at import: patch the constants it consults at call time too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    return env


def test_hub_id_while_offline(work: Path, offline_hub: dict[str, str]) -> None:
    assert_fails(["convert", "some-org/some-model", OUT, *TINY], ModelSourceError.exit_code, work,
                 "offline", "HF_HUB_OFFLINE", "hf download some-org/some-model")


def _console_script() -> str:
    """The installed `commonkv` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "commonkv"
    found = str(script) if script.is_file() else shutil.which("commonkv")
    assert found, "The `commonkv` console script is not installed. To resolve, run: pip install -e ."
    return found


def test_real_entry_point_hub_id_while_offline(work: Path, offline_hub: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COMMONKV_DEBUG"}
    proc = subprocess.run([_console_script(), "convert", "some-org/some-model", OUT, *TINY], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    line = error_line(_ANSI.sub("", proc.stderr))
    assert proc.returncode == ModelSourceError.exit_code, (proc.returncode, proc.stderr)
    assert not proc.stdout.strip() and "Traceback" not in proc.stdout
    assert "offline" in line and "not (fully) in the local Hugging Face cache" in line
    assert "hf download some-org/some-model" in line
    assert sorted(p.name for p in work.iterdir()) == []


def test_recipe_with_unknown_key(work: Path, tmp_path: Path, llama: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ratio: 0.5\ncompression: 0.5\n")
    assert_fails(["convert", llama, OUT, "--recipe", recipe], UserInputError.exit_code, work, "'compression'")


def test_recipe_with_wrong_type(work: Path, tmp_path: Path, llama: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ratio: half\n")
    assert_fails(["convert", llama, OUT, "--recipe", recipe], UserInputError.exit_code, work, "ratio")


# ---------------------------------------------------------------------------------------------------------
# convert: success paths
# ---------------------------------------------------------------------------------------------------------
def test_recipe_drives_options_and_flags_override_it(work: Path, tmp_path: Path, llama: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"ratio": 0.6, "group_size": 2, "samples": 8, "seq_len": 32}))
    code, _, stderr = invoke("convert", llama, OUT, "--recipe", recipe, "--seq-len", "64", "--quiet")
    assert code == 0, stderr
    config = check_checkpoint(work / OUT)
    written = yaml.safe_load((work / OUT / "commonkv_recipe.yaml").read_text())
    assert (written["ratio"], written["group_size"], written["samples"], written["seq_len"]) == (0.6, 2, 8, 64)
    assert config["commonkv"]["ratio"]["requested"] == 0.6 and config["commonkv"]["ratio"]["achieved"] >= 0.6


def test_every_option_is_a_flag_with_the_library_help_and_default(work: Path, llama: Path) -> None:
    """The convert flags are generated from ConvertOptions: each field has one, with its help and default."""
    import dataclasses

    from commonkv_convert.recipe import ConvertOptions

    code, stdout, _ = invoke("convert", "--help")
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", stdout).split())
    for f in dataclasses.fields(ConvertOptions):
        flag = (f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",))[0].split("/")[0]
        assert flag in flat, flag
        assert " ".join(f.metadata["help"].split()[:4]) in flat, f.name
    code, _, stderr = invoke("convert", llama, OUT, *TINY, "--ratio", "0", "--no-keep", "--rank-step", "64",
                             "--group-size", "1", "--threshold", "0.4", "--no-validate", "--quiet")
    assert code == 0, stderr
    written = yaml.safe_load((work / OUT / "commonkv_recipe.yaml").read_text())
    assert (written["allow_keep"], written["share_threshold"], written["validate"]) == (False, 0.4, False)


@pytest.fixture(scope="module")
def llama_copy(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> Path:
    """The tiny Llama as a local copy of a Hub model: its config still records the Hub id."""
    copy = tmp_path_factory.mktemp("local_copy") / "tiny-llama"
    shutil.copytree(llama, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama"}))
    return copy


@pytest.mark.parametrize(("flags", "expected"),
                         [([], "org/tiny-llama"), (["--base-model", "other/base"], "other/base")])
def test_card_of_a_local_conversion_names_its_base_model(work: Path, llama_copy: Path, flags, expected) -> None:
    code, _, stderr = invoke("convert", llama_copy, OUT, "--ratio", "0.5", *TINY, *flags)
    assert code == 0, stderr
    card = huggingface_hub.ModelCard.load(work / OUT / "README.md")
    assert card.data.base_model == expected
    assert f"# {expected} with a smaller KV cache" in card.text and str(llama_copy) not in card.text


def test_base_model_must_be_a_hub_id(work: Path, llama: Path) -> None:
    assert_fails(["convert", llama, OUT, "--base-model", "./local/dir", *TINY], UserInputError.exit_code, work,
                 "--base-model", "not a Hub id")


def test_dry_run_prints_plan_and_writes_nothing(work: Path, llama: Path) -> None:
    before = sorted(p.name for p in llama.iterdir())
    code, stdout, stderr = invoke("convert", llama, "--dry-run", "--ratio", "0.5", *TINY)
    assert code == 0, stderr
    assert "CommonKV plan" in stdout and ("per_layer" in stdout or "merged" in stdout)
    assert f"KV elements per token: {_full_kv_elements('llama')} →" in stdout
    assert "Predicted decode step vs the full cache: " in stdout and "× at 8192 tokens" in stdout
    assert sorted(p.name for p in work.iterdir()) == []
    assert sorted(p.name for p in llama.iterdir()) == before


def test_dry_run_json(work: Path, llama: Path) -> None:
    code, stdout, stderr = invoke("convert", llama, "--dry-run", "--json", "--ratio", "0.5", *TINY)
    assert code == 0, stderr
    payload = json.loads(stdout)
    rows = payload["plan"]
    assert sorted(layer for row in rows for layer in row["layers"]) == [0, 1, 2, 3]
    # a latent plan rebuilds keys every step: predicted slower than the full cache, more so at 8k than at 2k
    assert 1.0 < payload["decode_cost_at_2048"] < payload["decode_cost_at_8192"]
    assert sum(row["elements_after"] for row in rows) <= 0.5 * _full_kv_elements("llama")
    assert sorted(p.name for p in work.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# version, inspect, generate
# ---------------------------------------------------------------------------------------------------------
def test_version() -> None:
    code, stdout, _ = invoke("--version")
    assert code == 0 and stdout.strip() == f"commonkv {__version__}"


def test_inspect_plain_model(llama: Path) -> None:
    code, stdout, stderr = invoke("inspect", llama, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    cfg = TINY_FAMILIES["llama"]
    assert info["family"] == "llama" and info["layers"] == cfg["num_hidden_layers"]
    assert info["kv_heads"] == cfg["num_key_value_heads"]
    assert info["full_kv_elements_per_token"] == 2 * info["kv_heads"] * info["head_dim"] * info["layers"]
    assert info["full_kv_elements_per_token"] == _full_kv_elements("llama")
    assert "converted" not in info and "achieved_ratio" not in info


def test_inspect_plain_model_table(llama: Path) -> None:
    code, stdout, stderr = invoke("inspect", llama)
    assert code == 0, stderr
    assert "full_kv_elements_per_token" in stdout and str(_full_kv_elements("llama")) in stdout


def test_inspect_converted_model(merged_dirs: dict[str, Path]) -> None:
    path = merged_dirs["llama"]
    code, stdout, stderr = invoke("inspect", path, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    block = json.loads((path / "config.json").read_text())["commonkv"]
    assert info["converted"] is True and info["family"] == "llama"
    assert info["full_kv_elements_per_token"] == 2 * info["kv_heads"] * info["head_dim"] * info["layers"]
    assert info["achieved_ratio"] == pytest.approx(block["ratio"]["achieved"]) and info["achieved_ratio"] >= 0.5
    assert info["kv_elements_per_token"] == round((1 - info["achieved_ratio"]) * info["full_kv_elements_per_token"])
    assert [g["layers"] for g in info["groups"]] == [g["layers"] for g in block["groups"]]


def test_unexpected_error_is_one_line(work: Path, llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("commonkv_convert.inspection.describe", broken)
    line = assert_fails(["inspect", llama], 1, work, "unexpected RuntimeError: boom", "COMMONKV_DEBUG=1")
    assert "second line" not in line


def test_inspect_missing_path(work: Path) -> None:
    assert_fails(["inspect", "./does-not-exist"], ModelSourceError.exit_code, work)


def test_generate(merged_dirs: dict[str, Path]) -> None:
    code, stdout, stderr = invoke("generate", merged_dirs["llama"], "Hello", "--max-new-tokens", "8",
                                  "--device", "cpu")
    assert code == 0, stderr
    assert stdout.strip(), "no text generated"
    assert "8 tokens" in stderr and "Traceback" not in stderr


def test_generate_zero_tokens(work: Path, merged_dirs: dict[str, Path]) -> None:
    assert_fails(["generate", merged_dirs["llama"], "Hello", "--max-new-tokens", "0"], UserInputError.exit_code,
                 work, "--max-new-tokens")


def test_generate_on_unconverted_model(work: Path, llama: Path) -> None:
    assert_fails(["generate", llama, "Hello"], UserInputError.exit_code, work, "commonkv convert")
