"""Calibration text: read the prompt file, tokenize, and cut it into equal-length sequences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import CalibrationError

DEFAULT_CALIBRATION = Path(__file__).parent / "configs" / "calibration_default.jsonl"


def check_file(path: Path) -> None:
    """Fail early (before any download) on a calibration path that cannot be read as .txt or .jsonl."""
    if not path.is_file():
        raise CalibrationError(f"Calibration file {path} does not exist. To resolve, pass an existing .txt or .jsonl file.")
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibrationError(f"Calibration file {path} is neither .txt nor .jsonl. To resolve, pass one of those.")


def read_texts(path: Path) -> list[str]:
    """Texts of a .txt file (one document) or a .jsonl file ({"text": ...} per line)."""
    check_file(path)
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".txt":
        texts = [raw]
    else:
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise CalibrationError(
                    f"{path}:{n} is not valid JSON. To resolve, write one {{\"text\": ...}} object per line."
                ) from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise CalibrationError(f"{path}:{n} has no \"text\" string. To resolve, write {{\"text\": ...}} lines.")
            texts.append(item["text"])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"Calibration file {path} is empty. To resolve, pass a file with text in it.")
    return texts


def token_sequences(texts: list[str], tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids: the texts joined by EOS and cut into consecutive windows."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        if len(stream) >= samples * seq_len:
            break
    if len(stream) < samples * seq_len:
        raise CalibrationError(
            f"Calibration text has {len(stream)} tokens but {samples} samples × {seq_len} tokens = "
            f"{samples * seq_len} are needed. To resolve, pass a longer --calib file or lower --samples/--seq-len."
        )
    return torch.tensor(stream[: samples * seq_len], dtype=torch.long).view(samples, seq_len)


def fingerprint(tokens: torch.Tensor) -> str:
    """sha256 of the token ids, recorded so a conversion can be traced to its exact calibration data."""
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()
