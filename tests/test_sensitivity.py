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
from commonkv_convert.sensitivity import SCORED_STRIDE, probe_index

from .helpers import TINY_CALIB


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2", "phi3"], indirect=True)  # plain, biased, fused qkv
def test_sensitivity_is_the_kl_of_a_full_forward_over_the_estimated_error(tiny_model_dir):
    options = ConvertOptions(ratio=0.5, group_size=2, validate=False, **TINY_CALIB)
    with open_model(str(tiny_model_dir)) as opened:
        analysis = analyze_source(source_view(opened), options, Reporter())
        try:
            facts, tokens = analysis.facts, analysis.data.tokens[-analysis.data.held_out:]
            assert set(analysis.sensitivity) == set(range(facts.num_layers))
            layer = facts.num_layers - 2
            cand = analysis.candidates[(layer, 1)]
            expected = {}
            for role, errors in (("k", cand.err_k[layer]), ("v", cand.err_v[layer])):
                idx = probe_index(errors)
                down, ups = analysis.store.factors(cand, int(cand.ranks[idx]))
                rows = slice(0, facts.d_kv) if role == "k" else slice(facts.d_kv, None)
                expected[role] = _kl_with(tiny_model_dir, tokens, layer, role, ups[layer][rows] @ down,
                                          facts) / float(errors[idx])
        finally:
            analysis.store.close()
    got = analysis.sensitivity[layer]
    assert got[0] > 0 and got[1] > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor([expected["k"], expected["v"]]), rtol=2e-3, atol=1e-6)


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
