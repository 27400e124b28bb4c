"""scripts/frontier.py's verdicts: which planner rows another method dominates at equal memory, and the targets."""

from __future__ import annotations

import pytest

from .helpers import load_script


@pytest.fixture(scope="module")
def frontier():
    return load_script("frontier")


def _row(removed: float, ppl: float, needle: float) -> dict:
    return {"removed": removed, "ctx_ppl": ppl, "needle": needle, "needle_probes": [1.0] * 5}


def _verdict(lines: list[str], name: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_a_planner_row_is_dominated_only_by_another_method_at_equal_or_fewer_bytes(frontier):
    entries = {
        "full": _row(0.0, 20.0, 1.0),
        "plan@0.5": _row(0.501, 20.1, 1.0),  # +0.5%: within +1%, every needle
        "plan-8bit@0.5": _row(0.501, 19.0, 1.0),  # better than plan@0.5, which it does not dominate
        "evict@0.5": _row(0.5, 19.9, 0.4),  # better ctx-ppl, fewer needles: no dominance
        "quant4": _row(0.666, 20.05, 1.0),  # more bytes removed, better ctx-ppl, same needles: dominates
        "plan@0.75": _row(0.75, 20.2, 1.0),
        "quant2": _row(0.787, 20.1, 0.8),
        "plan@0.875": _row(0.875, 22.0, 1.0),  # +10%: misses +8%
    }
    peers = [{"press": "full", "removed": 0.0, "ctx_ppl": 30.0, "needle": 5, "probes": 5},
             {"press": "snapkv", "removed": 0.875, "ctx_ppl": 30.3, "needle": 5, "probes": 5}]  # +1% of its own
    lines = frontier.verdicts(entries, peers)
    assert _verdict(lines, "plan@0.5")[4:] == ["met", "quant4"]
    assert _verdict(lines, "plan-8bit@0.5")[4:] == ["met", "not dominated"]
    assert _verdict(lines, "plan@0.75")[4:] == ["met", "not dominated"]
    assert _verdict(lines, "plan@0.875")[2:] == ["+10.0%", "5/5", "missed", "kvpress snapkv@0.875"]
    assert not any(line.startswith("| quant4 |") for line in lines)  # only planner rows are judged


def test_plan_fast_at_half_uses_the_speed_benchmarks_limit_per_model(frontier):
    for model, limit in frontier.FAST_LIMIT.items():
        plans = frontier.plans(model)
        assert plans["plan-fast@0.5"]["max_decode_cost"] == limit
        assert plans["plan-fast-lv@0.5"] == {**plans["plan-fast@0.5"], "latent_values": True}


def test_record_saves_each_figure_at_once_beside_other_models(frontier, tmp_path):
    """A long run keeps what it measured: every entry lands in the JSON as soon as it exists, and a run of one
    model never drops another's rows."""
    import argparse
    import json

    path = tmp_path / "frontier.json"
    path.write_text(json.dumps({"qwen25": {"full": {"ctx_ppl": 31.0}}}))
    results: dict = {}
    frontier.record(argparse.Namespace(json=path), results, "smollm2", "quant4", lambda: {"ctx_ppl": 22.0})
    saved = json.loads(path.read_text())
    assert saved["qwen25"] == {"full": {"ctx_ppl": 31.0}}
    assert saved["smollm2"]["quant4"]["ctx_ppl"] == 22.0 and saved["smollm2"]["quant4"]["seconds"] >= 0


def test_each_key_metric_gets_its_own_analysis(frontier, monkeypatch):
    """The key metric is an analysis field: the plans of each metric go to one sweep whose base options have it,
    so no sweep is asked for a variant its analysis cannot plan."""
    calls = []
    monkeypatch.setattr(frontier, "reuse_or_convert",
                        lambda model, base, wanted, root, use, plan_errors: calls.append((base, wanted)))
    frontier.checkpoints("smollm2", {"plan@0.5", "plan-query@0.5", "latent-query@0.75", "full"}, lambda n, p: None)
    assert {base.key_metric: sorted(wanted) for base, wanted in calls} == {
        "plain": ["full", "plan@0.5"], "query": ["latent-query@0.75", "plan-query@0.5"]}
    assert all(o.key_metric == base.key_metric for base, wanted in calls for o in wanted.values())
