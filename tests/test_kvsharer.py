"""KVSharer: the search's rules, sharing layers that allocate nothing, exactness, generation, options."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DummyLayer

from commonkv_convert.architectures import resolve
from commonkv_convert.checkpoint.reader import open_model
from commonkv_convert.errors import PlanError, UserInputError
from commonkv_convert.kvsharer import _Runner, _run_from, layer_means, rank_pairs, refit_up_projections, \
    search_sharing, walk
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint

from .helpers import checkpoint_tensors, convert_tiny

FAMILIES = ["llama", "qwen2", "qwen3"]  # plain, q/k/v biases, qk-norm


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def combined_dirs(tiny_model_dirs, tmp_path_factory):
    """CommonKV + KVSharer on qwen3 at 70% removed: every storing layer holds a latent, so the sharer reads one."""
    root = tmp_path_factory.mktemp("kvsharer_combined")
    return {path: convert_tiny(tiny_model_dirs["qwen3"], root / path, method="commonkv+kvsharer", share_layers=1,
                               share_threshold=-1.0, ratio=0.7, share_latent=path)
            for path in ("refit", "source")}


# ---- the search -------------------------------------------------------------------------------------------
def test_walk_rules_without_chains():
    ranked = [(10.0 - k, i, j) for k, (i, j) in enumerate([(0, 3), (3, 5), (1, 3), (0, 2), (2, 4), (1, 5), (0, 1)])]
    calls = []

    def score(pairs, sharer):
        calls.append(dict(pairs))
        return 0.2 if sharer == 2 else 0.9  # sharing layer 2 is rejected

    pairs, trials = walk(ranked, 3, 0.5, score)
    assert pairs == {3: 0, 4: 2, 5: 1}  # (3,5): 3 is a source; (1,3): 3 already shares; (0,2) rejected
    assert [t["accepted"] for t in trials] == [True, False, True, True]
    assert not set(pairs) & set(pairs.values())
    assert walk(ranked, 1, 0.5, score)[0] == {3: 0}  # stops at N
    assert walk(ranked, 3, 0.95, score)[0] == {}  # nothing clears the threshold


def test_rank_pairs_orders():
    means = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    far = rank_pairs(means, "dissimilar-first")
    near = rank_pairs(means, "similar-first")
    assert [(i, j) for _, i, j in far][:2] == [(0, 3), (1, 3)]
    assert [(i, j) for _, i, j in near][:2] == [(0, 1), (1, 2)]
    assert sorted(far) == sorted(near) and len(far) == 6


def test_search_deterministic_respects_threshold_and_n(tiny_model_dirs):
    tokens = _ids(6, 32)
    with open_model(str(tiny_model_dirs["llama"])) as source:
        facts = resolve(source.config)
        runs = [search_sharing(source, facts, tokens, share_layers=2, threshold=0.5) for _ in range(2)]
        loose = search_sharing(source, facts, tokens, share_layers=3, threshold=-1.0, order="similar-first")
    assert runs[0].pairs == runs[1].pairs and runs[0].trials == runs[1].trials
    for plan in runs + [loose]:
        assert len(plan.pairs) <= plan.requested
        assert not set(plan.pairs) & set(plan.pairs.values())  # no chains
        assert all(j < s for s, j in plan.pairs.items())
        for t in plan.trials:
            assert t["accepted"] == (t["cosine"] > plan.threshold)
            assert (plan.pairs.get(t["layer"]) == t["source"]) == t["accepted"]
    assert len(loose.pairs) == 3


def test_search_restart_equals_full_pass(tiny_model_dirs):
    """The search re-runs only from the tentative sharer: the same as a pass from layer 0 with all sharings."""
    tokens = _ids(4, 32, 1)
    with open_model(str(tiny_model_dirs["qwen3"])) as source:
        runner = _Runner(source, resolve(source.config), 32)
        _, reference, _ = layer_means(runner, tokens, 4)
        step = _run_from(runner, 3, {3: 1}, _run_from(runner, 2, {2: 0}, reference))
        scratch = _run_from(runner, 0, {2: 0, 3: 1}, reference)
        source_model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32).eval()
        with torch.inference_mode():
            hidden = source_model.model(tokens).last_hidden_state
    torch.testing.assert_close(step.final, scratch.final)
    torch.testing.assert_close(reference.final, hidden)


def test_too_strict_threshold_is_a_plan_error(tiny_model_dirs, tmp_path):
    with pytest.raises(PlanError, match="--threshold"):
        convert_tiny(tiny_model_dirs["llama"], tmp_path / "out", method="kvsharer", share_layers=3,
                     share_threshold=0.999)
    assert not (tmp_path / "out").exists()


# ---- the checkpoint and the runtime -----------------------------------------------------------------------
def test_inspect_counts_sharers_as_storing_nothing(shared_dirs):
    """`commonkv inspect` reports what the cache holds: a sharer's layer costs nothing."""
    from commonkv_convert.inspection import describe

    info = describe(str(shared_dirs["llama"]))
    pairs = dict(json.loads((shared_dirs["llama"] / "config.json").read_text())["commonkv"]["sharing"]["pairs"])
    assert info["achieved_ratio"] == pytest.approx(len(pairs) / info["layers"])
    shared = [g for g in info["groups"] if g["mode"] == "shared"]
    assert {g["layers"][0]: g["reads"] for g in shared} == pairs and all(g["elements"] == 0 for g in shared)
    assert info["kv_elements_per_token"] == info["full_kv_elements_per_token"] * (1 - len(pairs) / info["layers"])


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_matches_search_and_allocates_nothing(family, tiny_model_dirs, shared_dirs):
    config = json.loads((shared_dirs[family] / "config.json").read_text())
    block = config["commonkv"]
    pairs = {s: j for s, j in block["sharing"]["pairs"]}
    assert len(pairs) == 2 and block["format_version"] == 2
    assert all(g["mode"] == "keep" for g in block["groups"])
    shapes = checkpoint_tensors(shared_dirs[family])
    for s in pairs:  # a sharer keeps its queries and output projection, nothing that makes keys or values
        names = {n.split(".")[-2] for n in shapes if n.startswith(f"model.layers.{s}.self_attn.")}
        assert "q_proj" in names and not names & {"k_proj", "v_proj", "k_up", "v_up", "k_norm"}
    model = load_checkpoint(shared_dirs[family], dtype=torch.float32)
    tokens = _ids(2, 24, 2)
    with torch.inference_mode():
        out = model(tokens, use_cache=True)
    cache = out.past_key_values
    for layer in range(4):
        assert isinstance(cache.layers[layer], DummyLayer) == (layer in pairs)
    d_kv = model.config.num_key_value_heads * model.config.head_dim
    stored = 2 * 2 * 24 * 2 * d_kv * 4  # 2 storing layers × batch 2 × 24 tokens × (K, V) × d_kv × fp32
    assert cache.nbytes() == stored == model.config.cache_elements(24) * 2 * 4
    assert model.config.kv_elements_per_token() == model.config.full_kv_elements_per_token() // 2
    with open_model(str(tiny_model_dirs[family])) as source:
        runner = _Runner(source, resolve(source.config), 24)
        _, reference, _ = layer_means(runner, tokens, 2)
        expected = _run_from(runner, 0, pairs, reference).final
    with torch.inference_mode():
        torch.testing.assert_close(out.logits, model.lm_head(expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["kvsharer", "refit", "source"])
def test_greedy_generation_matches_full_forward(kind, shared_dirs, combined_dirs):
    path = shared_dirs["qwen3"] if kind == "kvsharer" else combined_dirs[kind]
    model = load_checkpoint(path, dtype=torch.float32)
    prompt = _ids(2, 10, 4)
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=257)
    with torch.inference_mode():
        logits = model(generated).logits
    assert torch.equal(logits[:, 9:-1].argmax(-1), generated[:, 10:])
    with torch.inference_mode():
        cache = model(prompt, use_cache=True).past_key_values
    assert cache.nbytes() == model.config.cache_elements(10) * 2 * 4


def test_combined_sharer_reads_a_latent(combined_dirs):
    for path, directory in combined_dirs.items():
        config = json.loads((directory / "config.json").read_text())
        block = config["commonkv"]
        (s, j), = block["sharing"]["pairs"]
        source_group = next(g for g in block["groups"] if j in g["layers"])
        assert source_group["mode"] != "keep" and block["sharing"]["latent_path"] == path
        shapes = checkpoint_tensors(directory)
        own_up = f"model.layers.{s}.self_attn.k_up.weight"
        assert (own_up in shapes) == (path == "refit")
        if path == "refit":
            assert shapes[own_up][1] == source_group["rank"]
        model = load_checkpoint(directory, dtype=torch.float32)
        report = json.loads((directory / "commonkv_report.json").read_text())
        assert report["validation"]["bytes_match"]
        assert report["ratio"]["achieved"] >= 0.7
        assert model.config.kv_elements_per_token() == report["kv_elements_per_token"]["converted"]


def test_source_path_at_full_rank_equals_kvsharer(tiny_model_dirs, shared_dirs, tmp_path):
    """Exact per-layer latents everywhere else: reading the source's reconstruction is reading its cache."""
    d_kv = 2 * 16  # qwen3 tiny: 2 KV heads × head_dim 16
    exact = convert_tiny(tiny_model_dirs["qwen3"], tmp_path / "exact", method="commonkv+kvsharer", share_layers=2,
                         share_threshold=-1.0, ratio=0.0, group_size=1, allow_keep=False, rank_step=2 * d_kv,
                         share_latent="source")
    a, b = (load_checkpoint(p, dtype=torch.float32) for p in (exact, shared_dirs["qwen3"]))
    assert a.config.commonkv["sharing"]["pairs"] == b.config.commonkv["sharing"]["pairs"]
    tokens = _ids(1, 20, 5)
    with torch.inference_mode():
        torch.testing.assert_close(a(tokens).logits, b(tokens).logits, atol=2e-4, rtol=1e-4)


def test_refit_is_least_squares(tiny_model_dirs):
    tokens = _ids(3, 16, 6)
    down = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with open_model(str(tiny_model_dirs["qwen2"])) as source:
        facts = resolve(source.config)
        ups = refit_up_projections(source, facts, tokens, {3: (1, down)})
        w = torch.cat([source.get_tensor(f"model.layers.3.self_attn.{x}_proj.weight", torch.float64) for x in "kv"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2"], dtype=torch.float64).eval()
    with torch.inference_mode():
        states = model(tokens, output_hidden_states=True).hidden_states
        xs = [model.model.layers[i].input_layernorm(states[i]).flatten(0, 1) for i in (1, 3)]
    latent = xs[0] @ down.double().T
    expected = torch.linalg.lstsq(latent, xs[1] @ w.T).solution.T
    torch.testing.assert_close(ups[3].double(), expected, atol=1e-4, rtol=1e-3)


# ---- options and config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,match", [
    ({"method": "sharing"}, "--method"),
    ({"method": "kvsharer", "share_order": "random"}, "--share-order"),
    ({"method": "kvsharer", "share_threshold": 1.5}, "--threshold"),
    ({"method": "kvsharer", "share_layers": 0}, "--share-layers"),
    ({"share_layers": 4}, "needs a KVSharer method"),
    ({"method": "commonkv+kvsharer"}, "needs --share-layers"),
    ({"method": "commonkv+kvsharer", "share_layers": 2, "merge": "weighted"}, "--merge anchor"),
    ({"method": "commonkv+kvsharer", "share_layers": 2, "share_latent": "copy"}, "--share-latent"),
])
def test_bad_sharing_options(fields, match):
    with pytest.raises(UserInputError, match=match):
        ConvertOptions(**fields).check()


def test_too_many_share_layers(tiny_model_dirs, tmp_path):
    with pytest.raises(PlanError, match="between 1 and 3"):
        convert_tiny(tiny_model_dirs["llama"], tmp_path / "out", method="kvsharer", share_layers=4)


def test_newer_format_is_refused(shared_dirs, tmp_path):
    from commonkv_convert.runtime import CommonKVConfig
    from commonkv_convert.runtime.configuration_commonkv import FORMAT_VERSION

    config = CommonKVConfig.from_pretrained(shared_dirs["llama"])
    config.commonkv = {**config.commonkv, "format_version": FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}"):
        config.layer_roles()


def test_sweep_replans_kvsharer_as_a_prefix(tiny_model_dirs, tmp_path):
    """One search for the most sharers serves every smaller N: the walk for fewer only stops earlier."""
    from commonkv_convert.convert import convert_sweep

    base = dict(method="kvsharer", share_threshold=-1.0, samples=8, seq_len=64, validate=False)
    results = convert_sweep(str(tiny_model_dirs["llama"]), ConvertOptions(ratio=0.5, **base),
                            {f"r{r}": ConvertOptions(ratio=r, **base) for r in (0.25, 0.5)}, tmp_path)
    full, small = (results[k].report["sharing"] for k in ("r0.5", "r0.25"))
    assert len(full["pairs"]) == 2 and len(small["pairs"]) == 1
    first = next(t for t in full["trials"] if t["accepted"])
    assert small["pairs"] == [[first["layer"], first["source"]]]
    alone = convert_tiny(tiny_model_dirs["llama"], tmp_path / "alone", ratio=0.25, **base)
    assert json.loads((alone / "commonkv_report.json").read_text())["sharing"]["pairs"] == small["pairs"]


def test_cli_rejects_bad_sharing_flags(tiny_model_dirs):
    from typer.testing import CliRunner

    from commonkv_convert.cli import app

    result = CliRunner().invoke(app, ["convert", str(tiny_model_dirs["llama"]), "--share-layers", "2", "--dry-run"])
    assert result.exit_code == 2 and "needs a KVSharer method" in result.output


@pytest.mark.parametrize("runtime", [dict(bits=4, residual=8, group=8), dict(budget=16, observe=8)])
def test_sharing_with_runtime_quantization_and_eviction(runtime, shared_dirs, combined_dirs):
    """Sharers store nothing under run-time cache compression too: bytes equal the analytic figure."""
    for path in (shared_dirs["qwen3"], combined_dirs["refit"], combined_dirs["source"]):
        model = load_checkpoint(path, dtype=torch.float32, kv_cache=runtime)
        ids = _ids(1, 64, 7)
        with torch.inference_mode():
            cache = model(ids, use_cache=True).past_key_values
            cache = model(ids[:, :1], past_key_values=cache, use_cache=True).past_key_values
        assert cache.nbytes() == model.config.cache_bytes(65, 4, prompt=64)
        assert model.generate(ids[:, :40], max_new_tokens=4, do_sample=False, pad_token_id=257).shape == (1, 44)
