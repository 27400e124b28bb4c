"""Layer sensitivities (sensitivity.py) against transformers' own full forward pass: the KL measured when one
layer's k_proj / v_proj weight is replaced by its latent reconstruction, over the estimated error."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from commonkv_convert.architectures import source_view
from commonkv_convert.checkpoint.reader import open_model
from commonkv_convert.methods import analyze_source
from commonkv_convert.progress import Reporter
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.sensitivity import SCORED_STRIDE, SEQUENCES, curves, fit_curve, probe_indices

from .helpers import TINY_CALIB


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2", "phi3"], indirect=True)  # plain, biased, fused qkv
def test_probes_are_the_kl_of_a_full_forward(tiny_model_dir):
    options = ConvertOptions(ratio=0.5, group_size=2, validate=False, **TINY_CALIB)
    with open_model(str(tiny_model_dir)) as opened:
        analysis = analyze_source(source_view(opened), options, Reporter())
        try:
            facts = analysis.facts
            tokens = analysis.data.tokens[-analysis.data.held_out:][:SEQUENCES]
            probes = analysis.sensitivity
            assert set(probes) == set(curves(probes)) == set(range(facts.num_layers))
            layer = facts.num_layers - 2
            cand = analysis.candidates[(layer, 1)]
            for role, errors in (("k", cand.err_k[layer]), ("v", cand.err_v[layer])):
                indices = probe_indices(errors)
                assert len(probes[layer][role]) == len(indices) >= 1
                for idx, (error, kl) in zip(indices, probes[layer][role]):
                    down, ups = analysis.store.factors(cand, int(cand.ranks[idx]))
                    rows = slice(0, facts.d_kv) if role == "k" else slice(facts.d_kv, None)
                    expected = _kl_with(tiny_model_dir, tokens, layer, role, ups[layer][rows] @ down, facts)
                    assert error == pytest.approx(float(errors[idx]))
                    assert kl > 0 and kl == pytest.approx(expected, rel=2e-3, abs=1e-7)
        finally:
            analysis.store.close()


def test_curves_pass_through_consistent_probes_and_never_go_negative():
    a, b = fit_curve([(0.02, 0.02 * 3 + 0.0004 * 5), (0.2, 0.2 * 3 + 0.04 * 5)])
    assert (a, b) == (pytest.approx(3), pytest.approx(5))
    # a KL that grows slower than linearly would fit b < 0: kept convex and non-negative instead
    a, b = fit_curve([(0.02, 0.1), (0.2, 0.3)])
    assert a >= 0 and b >= 0 and a * 0.2 + b * 0.04 == pytest.approx(0.3, rel=0.3)
    assert fit_curve([(0.05, 0.5)]) == (pytest.approx(10), 0.0)
    assert fit_curve([]) == (0.0, 0.0)


def _kl_with(src, tokens: torch.Tensor, layer: int, role: str, weight: torch.Tensor, facts) -> float:
    """KL(source ‖ source with layer `layer`'s `role` projection weight replaced), at the scored positions."""
    logprobs = []
    for replace in (False, True):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        if replace:
            attn = model.model.layers[layer].self_attn
            if facts.family.fused_qkv:
                getattr(attn, facts.family.fused_qkv).weight.data[facts.qkv_rows(role)] = weight.float()
            else:
                getattr(attn, f"{role}_proj").weight.data.copy_(weight.float())
        with torch.no_grad():
            logits = model(tokens).logits[:, ::SCORED_STRIDE].double()
        logprobs.append(torch.log_softmax(logits, -1))
    clean, probed = logprobs
    return float((clean.exp() * (clean - probed)).sum(-1).mean())


def test_uniform_weights_skip_the_measurement_and_kl_needs_it(tiny_model_dirs, tmp_path):
    """--layer-weights uniform measures nothing (the stage costs layers² forwards); a sweep variant that asks for
    kl weights on such an analysis is refused with a one-line fix."""
    from commonkv_convert.convert import convert_sweep
    from commonkv_convert.errors import UserInputError

    base = ConvertOptions(ratio=0.5, validate=False, layer_weights="uniform", **TINY_CALIB)
    with open_model(str(tiny_model_dirs["llama"])) as opened:
        analysis = analyze_source(source_view(opened), base, Reporter())
        analysis.store.close()
    assert analysis.sensitivity is None
    kl = ConvertOptions(ratio=0.5, validate=False, layer_weights="kl", **TINY_CALIB)
    with pytest.raises(UserInputError, match="--layer-weights kl"):
        convert_sweep(str(tiny_model_dirs["llama"]), base, {"kl": kl}, tmp_path)
    assert not (tmp_path / "kl").exists()
