"""The real model: SmolLM2-135M-Instruct converted at ratio 0.5 (DESIGN §7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from commonkv_convert.evaluate.ppl import compressed_context_ppl
from commonkv_convert.runtime import load_checkpoint

from .helpers import check_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_converted(demo_run) -> Path:
    """SmolLM2 converted at ratio 0.5 with the default options: the demo's checkpoint (one conversion per session)."""
    return Path(demo_run["checkpoint"])


def test_conversion_reaches_ratio_in_plan_and_bytes(smollm2_converted):
    config = check_checkpoint(smollm2_converted)
    report = json.loads((smollm2_converted / "commonkv_report.json").read_text())
    assert config["commonkv"]["ratio"]["achieved"] >= 0.5
    assert report["kv_elements_per_token"] == {"full": 11520, "converted": 5760}
    validation = report["validation"]
    assert validation["bytes_match"] and validation["measured_ratio"] >= 0.5
    assert validation["top1_agreement"] > 0.5  # lossy, but far from a broken model
    assert len(report["similarity"]["adjacent"]) == 29


def test_compressed_context_perplexity_stays_close(smollm2_converted, smollm2_model, smollm2_essay_ids):
    converted = load_checkpoint(smollm2_converted, dtype=torch.float32)
    ids = smollm2_essay_ids[:, :1280]
    full = compressed_context_ppl(smollm2_model, ids, 512, 128, max_windows=2)["ppl"]
    compressed = compressed_context_ppl(converted, ids, 512, 128, max_windows=2)["ppl"]
    assert full < compressed < 1.6 * full
