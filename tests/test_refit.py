"""--refit (refit.py): the planned groups' factors refitted on all calibration tokens, and with `sequential` on
the stream the converted model itself produces."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from commonkv_convert.architectures import resolve, source_view
from commonkv_convert.analysis import CalibrationData
from commonkv_convert.checkpoint.reader import open_model
from commonkv_convert.commonkv import _kv_weight
from commonkv_convert.convert import convert
from commonkv_convert.errors import UserInputError
from commonkv_convert.factorize import factorize
from commonkv_convert.methods import method_for
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.runtime import load_checkpoint

from .helpers import TINY_CALIB, convert_tiny

MERGED = dict(ratio=0.5, group_size=2, allocator="uniform", layer_weights="uniform", validate=False)


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2", "phi3"], indirect=True)  # plain, biased, fused qkv
def test_full_rank_sequential_refit_is_exact(tiny_model_dir, tmp_path):
    out = convert_tiny(tiny_model_dir, tmp_path / "ckv", ratio=0.0, group_size=1, allow_keep=False, rank_step=64,
                       refit="sequential")
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    converted = load_checkpoint(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (source(ids).logits - converted(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2"], indirect=True)
def test_sequential_refit_fits_the_converted_models_own_stream(tiny_model_dir, tmp_path):
    """The second merged group's factors are the reduced-rank fit of the source's K/V on the anchor input that
    the converted model (first group refitted) really produces, recomputed here from the two models' hidden
    states."""
    out = convert_tiny(tiny_model_dir, tmp_path / "ckv", **MERGED, refit="sequential")
    options = ConvertOptions(**TINY_CALIB, **MERGED, refit="sequential")
    with open_model(str(tiny_model_dir)) as opened:
        source = source_view(opened)
        tokens = CalibrationData.load(None, source.tokenizer(), options.samples, options.seq_len,
                                      options.held_out).refit_tokens
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        converted = load_checkpoint(out, dtype=torch.float32)
        anchor = 2  # groups [0, 1] and [2, 3]
        with torch.inference_mode():
            clean = model(tokens, output_hidden_states=True).hidden_states
            drift = _layer_input(converted, anchor, tokens)
        layers = model.model.layers
        x_p = layers[anchor].input_layernorm(drift).flatten(0, 1).double()
        xs = {l: layers[l].input_layernorm(clean[l]).flatten(0, 1).double() for l in (2, 3)}
        method, facts = method_for(options), resolve(source.config)
        transforms = {l: method._row_transform(source, facts, l, xs[l].T @ xs[l], None) for l in xs}
        weights = {l: transforms[l] @ _kv_weight(source, l) for l in xs}
        grams = {(-1, -1): x_p.T @ x_p, **{(l, l): x.T @ x for l, x in xs.items()},
                 **{(l, -1): x.T @ x_p for l, x in xs.items()}}

        def gram(i, j):
            return grams[(i, j)] if (i, j) in grams else grams[(j, i)].T
        stored = load_file(str(next(out.glob("*.safetensors"))))
        rank = stored["model.kv_groups.1.down.weight"].shape[0]
        cand = factorize(weights, -1, gram, gram, torch.tensor([rank]), anchor=anchor)
    for l in xs:
        expected = torch.linalg.solve(transforms[l], cand.up[l]) @ cand.down
        prefix = f"model.layers.{l}.self_attn."
        got = torch.cat([stored[prefix + "k_up.weight"], stored[prefix + "v_up.weight"]]).double() @ \
            stored["model.kv_groups.1.down.weight"].double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()


def _layer_input(model, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The residual stream entering decoder layer `layer` of `model` on `tokens`."""
    seen = []
    handle = model.model.layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        model(tokens)
    finally:
        handle.remove()
    return seen[0]


def test_refit_changes_factors_and_validation_kl(tiny_model_dirs, tmp_path):
    """Pooled, sequential and symmetric refits write other factors than the analysis's; the first group sees the
    same inputs and targets under all three, the later one does not, and the sequential modes differ there by
    their targets. The validation KL of each is reported (and printed)."""
    kls, tensors = {}, {}
    for mode in ("none", "pooled", "sequential", "symmetric"):  # 4 held-out rows, 2 validation: pooled fits 2 more
        out = convert_tiny(tiny_model_dirs["llama"], tmp_path / mode, **{**MERGED, "validate": True}, refit=mode,
                           held_out=0.5)
        kls[mode] = json.loads((out / "commonkv_report.json").read_text())["validation"][
            "kl_source_to_converted"]
        tensors[mode] = load_file(str(next(out.glob("*.safetensors"))))
    print("validation KL by --refit:", kls)

    def product(mode, g, layer):
        t = tensors[mode]
        return t[f"model.layers.{layer}.self_attn.k_up.weight"] @ t[f"model.kv_groups.{g}.down.weight"]
    assert not torch.allclose(product("none", 0, 0), product("pooled", 0, 0))
    assert torch.allclose(product("pooled", 0, 0), product("sequential", 0, 0), atol=1e-5)
    assert not torch.allclose(product("pooled", 1, 2), product("sequential", 1, 2), atol=1e-5)
    assert torch.allclose(product("pooled", 0, 1), product("symmetric", 0, 1), atol=1e-5)
    for other in ("pooled", "sequential"):
        # layer 3: the anchor's rank reaches the hidden size here (asserted below), so layer 2 is W itself when
        # its targets and inputs are one stream; the later layer's targets are where symmetric differs
        assert not torch.allclose(product(other, 1, 3), product("symmetric", 1, 3), atol=1e-5)
    assert tensors["symmetric"]["model.kv_groups.1.down.weight"].shape[0] == 64  # the tiny models' hidden size


@pytest.mark.parametrize("other", [{"merge": "weighted"}, {"method": "commonkv+kvsharer", "share_layers": 1}])
def test_refit_refuses_what_it_cannot_refit(other):
    with pytest.raises(UserInputError, match="--refit"):
        ConvertOptions(refit="pooled", **other)
    with pytest.raises(UserInputError, match="--refit 'all'"):
        ConvertOptions(refit="all")


def test_refit_is_a_sweep_field(tiny_model_dirs):
    assert "refit" in ConvertOptions.sweep_fields()
    plan = convert(str(tiny_model_dirs["llama"]), None, ConvertOptions(**TINY_CALIB, **MERGED, refit="pooled"),
                   dry_run=True).config["commonkv"]["options"]
    assert plan["refit"] == "pooled"
