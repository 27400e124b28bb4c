"""Resume: a conversion killed with SIGKILL continues on rerun and writes the same bytes as an uninterrupted one.

The kill comes from the test hook COMMONKV_TEST_CRASH_AFTER=stage:n (commonkv_convert/resume.py): a real
SIGKILL of the `commonkv convert` child right after its n-th layer or shard is recorded. The report may differ
(wall time, peak RSS); weights, their index and config.json must not.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonkv_convert.checkpoint.writer import CheckpointWriter
from commonkv_convert.convert import convert
from commonkv_convert.progress import Reporter
from commonkv_convert.recipe import ConvertOptions

REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--samples", "8", "--seq-len", "64", "--group-size", "2", "--max-shard-size", "60KB", "--device", "cpu"]
OPTIONS = dict(samples=8, seq_len=64, group_size=2, max_shard_size="60KB", device="cpu")


def _run(model: Path, cwd: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    """`commonkv convert MODEL out` in `cwd` (the same command line in every directory: the card quotes it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("COMMONKV_TEST_CRASH_AFTER", None)
    if crash:
        env["COMMONKV_TEST_CRASH_AFTER"] = crash
    return subprocess.run([sys.executable, "-m", "commonkv_convert.cli", "convert", str(model), "out", *FLAGS],
                          capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def _hashes(path: Path) -> dict[str, str]:
    """sha256 of everything but the report (wall time and peak RSS differ from run to run)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())
            if f.name != "commonkv_report.json"}


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, tmp_path_factory) -> dict[str, str]:
    """Hashes of an uninterrupted conversion with the same options (CLI, so the model card's command matches)."""
    root = tmp_path_factory.mktemp("reference")
    proc = _run(tiny_model_dirs["llama"], root)
    assert proc.returncode == 0, proc.stderr
    hashes = _hashes(root / "out")
    assert sum(name.endswith(".safetensors") for name in hashes) > 3  # several shards, so shard:N is mid-write
    return hashes


@pytest.mark.parametrize("crash", ["layer:3", "shard:2"])
def test_killed_conversion_resumes_to_identical_files(tiny_model_dirs, tmp_path, reference, crash):
    out = tmp_path / "out"
    killed = _run(tiny_model_dirs["llama"], tmp_path, crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # nothing that looks complete
    work = tmp_path / ".out.commonkv-work"
    assert (work / "manifest.json").is_file()

    resumed = _run(tiny_model_dirs["llama"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr
    assert _hashes(out) == reference
    assert not work.exists()  # cleaned up once the report is written


class _Log(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_work_for_other_options_is_discarded_with_a_notice(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    killed = _run(tiny_model_dirs["llama"], tmp_path, "layer:2")
    assert killed.returncode == -signal.SIGKILL
    log = _Log()
    convert(str(tiny_model_dirs["llama"]), out, ConvertOptions(**{**OPTIONS, "ratio": 0.4}), reporter=log)
    assert any("different conversion" in line and "starting over" in line for line in log.lines), log.lines
    fresh = tmp_path / "fresh"
    convert(str(tiny_model_dirs["llama"]), fresh, ConvertOptions(**{**OPTIONS, "ratio": 0.4}))
    assert {k: v for k, v in _hashes(out).items() if k != "README.md"} == \
        {k: v for k, v in _hashes(fresh).items() if k != "README.md"}  # the card names the output directory
    assert not (tmp_path / ".out.commonkv-work").exists()


def test_two_conversions_cannot_share_a_work_directory(tmp_path):
    from commonkv_convert.errors import UserInputError
    from commonkv_convert.resume import WorkDir

    first = WorkDir.for_output(tmp_path / "out")
    first.bind("a", print)
    with pytest.raises(UserInputError, match="Another conversion is using"):
        WorkDir.for_output(tmp_path / "out").bind("b", print)
    assert first.manifest["fingerprint"] == "a" and (first.root / "manifest.json").is_file()


def test_writer_keeps_recorded_shards_and_skips_their_tensors(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each, 3 per 1 KB shard
    recorded: list[dict] = []

    def on_shard(index, path, names, data_bytes):
        recorded.append({"file": path.name, "tensors": names, "data_bytes": data_bytes})

    with CheckpointWriter(tmp_path / "a", max_shard_size=1000) as writer:
        for name, t in tensors.items():
            writer.add_tensor(name, t)
        writer.finalize()

    work = tmp_path / "work"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "b", max_shard_size=1000, tmp_dir=work, on_shard=on_shard) as writer:
            for i, (name, t) in enumerate(tensors.items()):
                if i == 7:
                    raise RuntimeError("interrupted")
                writer.add_tensor(name, t)
    assert len(recorded) == 3 and work.is_dir()  # three shards of two closed; the fourth was being filled

    with CheckpointWriter(tmp_path / "b", max_shard_size=1000, tmp_dir=work, shards_done=recorded) as writer:
        for name, t in tensors.items():
            if name in ("t0", "t4"):
                assert writer.written(name)
            writer.add_tensor(name, t)  # tensors in kept shards are skipped
        writer.finalize()
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
