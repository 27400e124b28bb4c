"""KL-weighted joint SVD (`--factor-weights kl`): each layer's key and value rows weighted by the slope of their
measured KL curves, from a first pass over per-layer latents."""

from __future__ import annotations

import json

import pytest
import torch

from commonkv_convert.architectures import source_view
from commonkv_convert.checkpoint.reader import open_model
from commonkv_convert.errors import UserInputError
from commonkv_convert.factorize import factorize, rank_grid
from commonkv_convert.methods import analyze_source
from commonkv_convert.progress import Reporter
from commonkv_convert.recipe import ConvertOptions
from commonkv_convert.sensitivity import FLOOR, factor_scales

from .helpers import TINY_CALIB, convert_tiny


def test_scales_are_the_curves_slopes_at_the_first_plan_s_errors_over_their_mean():
    curves = {0: ((1.0, 0.0), (2.0, 10.0)), 1: ((0.0, 0.0), (1.0, 0.0))}
    scales = factor_scales(curves, {0: (0.1, 0.1)})  # layer 1 kept by the first plan: its slopes at 0
    slopes = {0: (1.0, 2.0 + 2 * 10.0 * 0.1), 1: (0.0, 1.0)}
    mean = (1.0 + 4.0 + 0.0 + 1.0) / 4
    assert scales[0] == (pytest.approx(slopes[0][0] / mean), pytest.approx(slopes[0][1] / mean))
    assert scales[1] == (FLOOR, pytest.approx(1.0 / mean))  # a role with no measured effect still counts a little
    assert factor_scales({0: ((0.0, 0.0), (0.0, 0.0))}, {}) == {0: (1.0, 1.0)}


def test_weighting_a_role_moves_the_rank_to_it():
    """The mechanism the option rests on: values weighted up, the joint SVD at a fixed rank leaves them less error
    and the keys more (relative errors, which the weights do not change the meaning of)."""
    g = torch.Generator().manual_seed(0)
    d, d_kv = 24, 8
    x = torch.randn(d, 400, generator=g, dtype=torch.float64)
    gram = x @ x.T
    w = torch.randn(2 * d_kv, d, generator=g, dtype=torch.float64)
    errors = {}
    for value_scale in (1.0, 30.0):
        rows = torch.cat([torch.ones(d_kv), torch.full((d_kv,), value_scale)]).double()[:, None]
        cand = factorize({0: rows * w}, 0, lambda i, j: gram, lambda i, j: gram, rank_grid(8, 8))
        errors[value_scale] = (float(cand.err_k[0][0]), float(cand.err_v[0][0]))
    assert errors[30.0][1] < errors[1.0][1] and errors[30.0][0] > errors[1.0][0]


def test_unknown_factor_weights_are_refused():
    with pytest.raises(UserInputError, match="--factor-weights 'fisher' is unknown. To resolve, pass energy or kl."):
        ConvertOptions(factor_weights="fisher")


def test_a_kl_weighted_conversion_plans_writes_and_validates(tiny_model_dir, tmp_path):
    """The first pass's sensitivities are the analysis's (no second probe); the factors differ from the energy
    weights' at the same ratio; the checkpoint validates and records the option."""
    options = ConvertOptions(ratio=0.5, group_size=2, validate=False, factor_weights="kl", **TINY_CALIB)
    with open_model(str(tiny_model_dir)) as opened:
        source = source_view(opened)
        kl = analyze_source(source, options, Reporter())
        energy = analyze_source(source, ConvertOptions(**{**options.to_dict(), "factor_weights": "energy"}),
                                Reporter())
    try:
        assert set(kl.sensitivity) == set(range(kl.facts.num_layers))
        pair = (0, 2)
        assert not torch.allclose(kl.candidates[pair].err_v[0], energy.candidates[pair].err_v[0])
    finally:
        kl.store.close()
        energy.store.close()
    out = convert_tiny(tiny_model_dir, tmp_path / "kl", ratio=0.5, factor_weights="kl")
    report = json.loads((out / "commonkv_report.json").read_text())
    assert report["validation"]["passed"]
    assert "factor_weights: kl" in (out / "commonkv_recipe.yaml").read_text()


def test_a_resumed_conversion_does_not_measure_the_first_pass_again(tiny_model_dir, tmp_path, monkeypatch):
    from commonkv_convert import commonkv
    from commonkv_convert.resume import WorkDir

    options = ConvertOptions(ratio=0.5, group_size=2, validate=False, factor_weights="kl", **TINY_CALIB)
    with open_model(str(tiny_model_dir)) as opened:
        source = source_view(opened)
        work = WorkDir(tmp_path / "work", persistent=True)
        first = analyze_source(source, options, Reporter(), work=work)
        work._lock.close()  # as if the process had ended: the next run may take the directory
        assert (work.root / commonkv.CommonKV.FIRST_PASS).is_file()

        def no_probe(*args, **kwargs):
            raise AssertionError("the sensitivities were measured again")
        monkeypatch.setattr(commonkv, "probe", no_probe)
        again = analyze_source(source, options, Reporter(), work=WorkDir(tmp_path / "work", persistent=True))
    assert again.sensitivity == first.sensitivity
    assert [(o.start, o.size, o.rank) for o in again.plan] == [(o.start, o.size, o.rank) for o in first.plan]
