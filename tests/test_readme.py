"""Every command in the README's code blocks runs, in README order, so none can go stale.

Paths are mapped to fixtures: the demo's checkpoint is the session's real `commonkv demo` output; a source
model (the demo's SmolLM2, its Hub id, a local copy) is the tiny Llama, because a command's behaviour does
not depend on the model's size and SmolLM2 conversions cost minutes each (the demo runs the real one).
Relative paths (`out/…`, `configs/…`, `scripts/…`) resolve in a scratch directory holding a copy of configs/.
A command this file does not know fails the test: add it to a runner or to COVERED_ELSEWHERE.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commonkv_convert.cli import app

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = "~/.cache/commonkv/smollm2-135m-instruct-commonkv-0.5"
SOURCES = ("~/.cache/commonkv/smollm2-135m-instruct", "./SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
NOT_RUN = {  # command prefix -> why this file does not run it
    "pip install": "installation: .ci/run installs exactly what the README says",
    "pytest": "the suite itself",
    "commonkv demo": "tests/test_demo.py (the demo_run fixture runs `commonkv demo --json`)",
}
COVERED_ELSEWHERE = {
    "commonkv push out/smol-0.5 my-user/SmolLM2-135M-Instruct-commonkv-0.5":
        "tests/test_hub.py pushes to a local Hub server with the real client (no Hub here)",
}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer((REPO / "README.md").read_text())]


def shell_commands(body: str) -> list[str]:
    """One string per command, as written: continuation lines joined, comments and blank lines dropped."""
    lines = (re.sub(r"(^|\s+)#\s.*$", "", raw).strip() for raw in body.replace("\\\n", " ").splitlines())
    return [" ".join(line.split()) for line in lines if line]


def map_paths(text: str, demo_checkpoint: Path | None, source: Path) -> str:
    if demo_checkpoint is not None:
        text = text.replace(DEMO_CHECKPOINT, str(demo_checkpoint))
    for name in SOURCES:
        text = text.replace(name, str(source))
    return text


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def run_command(command: str, demo_checkpoint: Path | None, source: Path, cwd: Path) -> str:
    """Run one README command (mapped); returns what was done, for the failure message of the next one."""
    if command in COVERED_ELSEWHERE or any(command.startswith(p) for p in NOT_RUN):
        return "covered elsewhere"
    args = shlex.split(map_paths(command, demo_checkpoint, source))
    env = dict(arg.split("=", 1) for arg in args if re.fullmatch(r"[A-Z_]+=\S*", arg))
    args = args[len(env):]
    if args[0] == "commonkv":
        result = CliRunner().invoke(app, args[1:], env={"COMMONKV_DEBUG": None}, catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n{result.stderr}"
        return "ran"
    if args[0] == "python" and args[1].startswith("scripts/"):
        args = [sys.executable, str(REPO / args[1]), *args[2:]]
    elif args[0] == "lm_eval":
        if importlib.util.find_spec("lm_eval") is None:
            return "skipped: lm-eval is not installed (pip install -e '.[eval]')"
    else:
        pytest.fail(f"README command {command!r} is not run by any test. To resolve, add it to tests/test_readme.py.")
    proc = subprocess.run(args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    return "ran"


def run_readme(demo_checkpoint: Path | None, source: Path, cwd: Path) -> dict[str, str]:
    """Every command and Python block in README order; only those on the demo checkpoint when it is given,
    only the others when it is None."""
    done = {}
    for language, body in readme_blocks():
        on_demo = DEMO_CHECKPOINT in body
        if language == "python":
            if on_demo == (demo_checkpoint is not None):  # a fresh interpreter, as a user runs it
                proc = subprocess.run([sys.executable, "-c", map_paths(body, demo_checkpoint, source)], cwd=cwd,
                                      env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                                      timeout=900)
                assert proc.returncode == 0, f"{body}\n{proc.stderr[-2000:]}"
                done[body.splitlines()[-1]] = "ran"
            continue
        for command in shell_commands(body):
            if (DEMO_CHECKPOINT in command) == (demo_checkpoint is not None):
                done[command] = run_command(command, demo_checkpoint, source, cwd)
    return done


def test_readme_commands_run(scratch: Path, tiny_model_dirs: dict[str, Path]) -> None:
    done = run_readme(None, tiny_model_dirs["llama"], scratch)
    assert "commonkv convert ~/.cache/commonkv/smollm2-135m-instruct out/smol-ckv --ratio 0.5" in done
    assert sum(v == "ran" for v in done.values()) >= 15, done  # the blocks were found and run


@pytest.mark.slow
def test_readme_commands_on_the_demo_checkpoint_run(scratch: Path, demo_run: dict,
                                                    tiny_model_dirs: dict[str, Path]) -> None:
    done = run_readme(Path(demo_run["checkpoint"]), tiny_model_dirs["llama"], scratch)
    assert [c.split()[1] for c, v in done.items() if v == "ran"] == ["inspect", "generate", "eval"], done


def test_every_readme_command_is_known() -> None:
    """Classification alone (fast): a new README command fails here until a test runs it."""
    runners = ("commonkv ", "python scripts/", "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval ")
    for language, body in readme_blocks():
        if language in ("bash", ""):
            for command in shell_commands(body):
                known = command.startswith(runners) or command in COVERED_ELSEWHERE or \
                    any(command.startswith(p) for p in NOT_RUN)
                assert known, f"README command {command!r} is not run by any test"
        else:
            assert language == "python", f"README block in {language!r}: run it in tests/test_readme.py"
