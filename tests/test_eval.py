"""`commonkv eval`: every task on a tiny model (shapes, determinism, bytes), the baselines, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from commonkv_convert.cli import app
from commonkv_convert.evaluate.baselines import AveragedKVCache, average_groups
from commonkv_convert.evaluate.ppl import compressed_context_ppl
from commonkv_convert.evaluate.retrieval import RULER_TASKS, make_probes
from commonkv_convert.evaluate.runner import EvalSettings, TASKS, headline, run_eval
from commonkv_convert.evaluate.targets import load_target

SMALL = EvalSettings(contexts=(512, 768), ctx_len=64, eval_len=16, windows=2, depths=(0.2, 0.8), samples=1,
                     new_tokens=4)


@pytest.fixture(scope="module")
def tiny_ckpt(merged_dirs):
    return merged_dirs["llama"]


@pytest.mark.parametrize("layers,ratio", [(30, 0.3), (30, 0.5), (30, 0.7), (30, 0.8), (7, 0.5), (4, 0.2)])
def test_average_groups_reach_the_ratio_with_deepest_layers(layers, ratio):
    groups = average_groups(layers, ratio)
    removed = sum(len(g) - 1 for g in groups)
    assert removed / layers >= ratio - 1e-9 and (removed - 1) / layers < ratio  # enough, and not one layer more
    flat = [l for g in groups for l in g]
    assert flat == sorted(set(flat)) and flat[-1] == layers - 1  # disjoint, ordered, ends at the last layer
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)  # adjacent layers


def test_averaged_cache_without_groups_is_the_full_cache(tiny_model_dir):
    target = load_target(str(tiny_model_dir))
    ids = torch.randint(0, 258, (1, 96), generator=torch.Generator().manual_seed(0))
    layers = target.model.config.num_hidden_layers
    plain = compressed_context_ppl(target.model, ids, 64, 32)
    same = compressed_context_ppl(target.model, ids, 64, 32, new_cache=lambda: AveragedKVCache(layers, []))
    assert plain["nll"] == pytest.approx(same["nll"], rel=1e-6)


def test_averaged_baseline_bytes_and_quality(tiny_model_dir):
    full = run_eval(load_target(str(tiny_model_dir)), ["ctx-ppl", "memory"], SMALL)
    half = run_eval(load_target(str(tiny_model_dir), baseline="average", ratio=0.5), ["ctx-ppl", "memory"], SMALL)
    for row_full, row_half in zip(full["tasks"]["memory"]["rows"], half["tasks"]["memory"]["rows"]):
        assert row_half["cache_bytes"] * 2 == row_full["cache_bytes"] == row_full["full_cache_bytes"]
    assert half["target"]["kv_elements_per_token"] * 2 == full["target"]["kv_elements_per_token"]
    assert half["tasks"]["ctx-ppl"]["ppl"] != full["tasks"]["ctx-ppl"]["ppl"]


def test_probes_are_deterministic_and_hold_their_needles(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for task in RULER_TASKS:
        first = make_probes(tok, task, 1024, 2, seed=3)
        again = make_probes(tok, task, 1024, 2, seed=3)
        for a, b in zip(first, again):
            assert torch.equal(a.prompt, b.prompt) and a.answers == b.answers
            assert a.prompt.numel() == 1024
            text = tok.decode(a.prompt)
            assert all(answer in text for answer in a.answers) or task == "vt"
            assert text.rstrip().endswith((" is", "are", ":"))  # ends at the start of the answer
            assert tok.decode(a.prompt[a.question_at:]).startswith("\n\nQuestion:")
            assert all(answer in tok.decode(a.prompt[:a.question_at]) for answer in a.answers) or task == "vt"
    depths = [p.depth for p in make_probes(tok, "niah", 2048, 3, depths=(0.1, 0.5, 0.9))]
    assert depths == [0.1, 0.5, 0.9]
    low, high = (tok.decode(p.prompt).find("special magic number") for p in make_probes(tok, "niah", 2048, 2, depths=(0.1, 0.9)))
    assert 0 < low < high


def test_asking_after_the_prefill_changes_nothing_for_an_uncompressed_cache(tiny_model_dirs):
    """`ask_after` splits the prompt into two forwards; only a cache that compresses after its prefill (eviction)
    may answer differently."""
    from commonkv_convert.evaluate.retrieval import greedy_answer

    model = load_target(str(tiny_model_dirs["llama"])).model
    prompt = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(1))
    assert greedy_answer(model, prompt, 12) == greedy_answer(model, prompt, 12, question_at=70)


def test_every_task_runs_and_repeats(tiny_ckpt):
    target = load_target(str(tiny_ckpt))
    tasks = list(TASKS)
    first = run_eval(target, tasks, SMALL)
    assert set(first["tasks"]) == set(TASKS)
    t = first["tasks"]
    assert t["ctx-ppl"]["tokens"] == 2 * 16 and t["ppl"]["tokens"] == 2 * 63
    assert len(t["needle"]["probes"]) == 2 * 2 and set(t["needle"]["by_context"]) == {"512", "768"}
    assert set(t["ruler"]["by_task"]) == set(RULER_TASKS) and len(t["ruler"]["probes"]) == 4 * 2
    assert 0.0 <= t["needle"]["accuracy"] <= 1.0 and 0.0 <= t["ruler"]["score"] <= 1.0
    assert [r["context"] for r in t["memory"]["rows"]] == [512, 768]
    achieved = target.model.config.commonkv["ratio"]["achieved"]
    assert t["memory"]["removed"] == pytest.approx(achieved, abs=1e-6)
    assert t["speed"]["rows"][0]["decode_tokens_per_s"] > 0
    again = run_eval(target, ["ctx-ppl", "ppl", "needle", "ruler", "memory"], SMALL)
    for task in ("ctx-ppl", "ppl", "needle", "ruler"):
        assert again["tasks"][task] == first["tasks"][task]
    assert again["tasks"]["memory"]["rows"][0]["cache_bytes"] == first["tasks"]["memory"]["rows"][0]["cache_bytes"]
    assert set(headline(first)) >= {"ctx-ppl", "needle", "ruler", "removed", "decode tok/s"}


def test_cli_eval_json_plots_and_saved_results(tiny_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    result = CliRunner().invoke(app, ["eval", str(ckpt), "--tasks", "ctx-ppl,needle,memory", "--context", "512",
                                      "--ctx-len", "64", "--eval-len", "16", "--windows", "2", "--depths", "0.5",
                                      "--json", "-", "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert set(payload["tasks"]) == {"ctx-ppl", "needle", "memory"}
    assert json.loads((ckpt / "commonkv_eval.json").read_text())["tasks"] == payload["tasks"]
    assert "ctx-ppl" in (ckpt / "README.md").read_text()  # the model card shows the measured results
    assert (tmp_path / "plots" / "memory.png").stat().st_size > 0 and (tmp_path / "plots" / "needle.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "bogus"], "unknown task"),
    (["--context", "10"], "--context"),
    (["--baseline", "average", "--ratio", "0.5"], "already a CommonKV checkpoint"),
    (["--dtype", "int3"], "--dtype"),
    (["--ratio", "0.5"], "--ratio only applies with --baseline"),
])
def test_cli_eval_bad_input_is_one_line(tiny_ckpt, args, needle):
    result = CliRunner().invoke(app, ["eval", str(tiny_ckpt), *args])
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output


def test_cli_eval_baseline_needs_ratio(tiny_model_dir):
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--baseline", "average"])
    assert result.exit_code == 2 and "--ratio" in result.output


@pytest.mark.slow
def test_real_model_full_cache_finds_needles_and_the_average_baseline_costs_quality(smollm2):
    settings = EvalSettings(contexts=(1024,), windows=2, depths=(0.25, 0.75))
    full = run_eval(load_target(str(smollm2)), ["ctx-ppl", "needle"], settings)
    averaged = run_eval(load_target(str(smollm2), baseline="average", ratio=0.5), ["ctx-ppl"], settings)
    assert full["tasks"]["needle"]["accuracy"] == 1.0  # the task is solvable by this model
    assert averaged["tasks"]["ctx-ppl"]["ppl"] > 1.2 * full["tasks"]["ctx-ppl"]["ppl"]
