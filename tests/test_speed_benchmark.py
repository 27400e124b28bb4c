"""scripts/speed_benchmark.py's core on tiny models: random caches as a prefill leaves them, timed steps, parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from commonkv_convert.evaluate.targets import load_target

from .helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("speed_benchmark")


@pytest.mark.parametrize("method", ["anchor", "weighted", "kvsharer"])
def test_filled_cache_holds_what_a_prefill_would_and_decodes(bench, converted, method: str) -> None:
    model = load_target(str(converted("llama", method))).model
    cache = bench.fill_cache(model, batch=2, tokens=40)
    assert cache.get_seq_length() == 40
    assert cache.nbytes() == model.config.cache_bytes(40, 4, batch=2)  # the analytic figure of a real prefill
    times = bench.decode_steps(model, cache, batch=2, steps=2)
    assert len(times) == 2 and all(t > 0 for t in times) and cache.get_seq_length() == 42


def test_interleaved_timing_and_parts(bench, tiny_model_dir, merged_dirs) -> None:
    models = {"source": load_target(str(tiny_model_dir)).model, "ckv": load_target(str(merged_dirs["llama"])).model}
    source_cache = bench.fill_cache(models["source"], batch=1, tokens=16)
    assert source_cache.get_seq_length() == 16
    times = bench.measure(models, batch=1, tokens=16, steps=2, repeats=2)
    assert {k: len(v) for k, v in times.items()} == {"source": 4, "ckv": 4}
    forward = torch.nn.Linear.forward
    ckv_parts = bench.breakdown(models["ckv"], batch=1, tokens=64, steps=2)
    source_parts = bench.breakdown(models["source"], batch=1, tokens=64, steps=2)
    assert torch.nn.Linear.forward is forward  # the timing wrappers are gone
    assert ckv_parts["rebuild"] > 0 and ckv_parts["attention"] > 0 and ckv_parts["rope"] > 0
    assert source_parts["rebuild"] == 0 and source_parts["append"] > 0 and source_parts["projections"] > 0
    for parts in (ckv_parts, source_parts):
        assert parts["step"] == pytest.approx(sum(v for k, v in parts.items() if k != "step"))


def test_arguments_default_to_the_issue_grid(bench) -> None:
    args = bench.parse([])
    assert (args.models, args.ratios, args.batches, args.contexts) == (["smollm2", "qwen25"], [0.5, 0.75], [1, 8],
                                                                       [2048, 8192])
    quick = bench.parse(["--quick"])
    assert quick.out == Path("docs/speed_quick.md") and quick.contexts == [256]
