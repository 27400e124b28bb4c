"""Quantization errors for the planner (quant_error.py) and the precision axis of the budget (budget.py)."""

from __future__ import annotations

import json

import pytest
import torch

from commonkv_convert.budget import FULL_BITS, Option, Pricing, allocate, keep_options, plan_bits
from commonkv_convert.errors import UserInputError
from commonkv_convert.quant_error import QUANT_BITS, kept_errors, latent_errors, round_trip
from commonkv_convert.recipe import ConvertOptions, parse_bits


def test_fewer_bits_lose_more():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 64, 8), torch.randn(2, 3, 64, 8)
    errors = kept_errors(keys, values)
    assert list(errors) == list(QUANT_BITS)
    for (hi_k, hi_v), (lo_k, lo_v) in zip(list(errors.values()), list(errors.values())[1:]):
        assert 0 < hi_k < lo_k and 0 < hi_v < lo_v
    assert errors[8][0] < 1e-3  # 8-bit codes of Gaussian data: ~1e-4 relative error


@pytest.mark.parametrize(("group", "sink"), [(32, 0), (16, 0), (16, 1)])
def test_latent_errors_equal_the_direct_computation(group, sink):
    """The cumulative per-rank error must equal ‖B_r (c − ĉ)_r‖² / ‖target‖² computed from scratch, at the
    quantization group it is asked for (72 tokens: the last partial group is never quantized)."""
    torch.manual_seed(1)
    n, t, r, d_kv = 2, 72, 12, 5
    latent = torch.randn(n, t, r) * torch.linspace(3, 0.1, r)  # channels of falling energy, as SVD latents
    up = {0: torch.randn(2 * d_kv, r), 1: torch.randn(2 * d_kv, r)}
    targets = {l: torch.randn(n, t, 2 * d_kv) for l in up}
    ranks = torch.tensor([4, 8, 12])
    got = latent_errors(latent, up, targets, ranks, d_kv, group, sink)
    whole = t // group * group
    for b, bits in enumerate(QUANT_BITS):
        kept = latent[:, :whole]
        noise = (kept - round_trip(kept, bits, "channel", group, sink)).reshape(n * whole, r)
        for l, u in up.items():
            for i, rank in enumerate(ranks.tolist()):
                err = noise[:, :rank] @ u[:, :rank].T
                flat = targets[l][:, :whole].reshape(n * whole, -1)
                expect_k = err[:, :d_kv].square().sum() / flat[:, :d_kv].square().sum()
                expect_v = err[:, d_kv:].square().sum() / flat[:, d_kv:].square().sum()
                assert got[l][b, 0, i] == pytest.approx(float(expect_k), rel=1e-4)
                assert got[l][b, 1, i] == pytest.approx(float(expect_v), rel=1e-4)


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_round_trip_is_what_the_runtime_reads_back(axis):
    """The analysis measures what the cache will hold: `round_trip` equals a stream that quantized the same
    tokens, with and without a sink, so the planner's errors are the runtime's."""
    from commonkv_convert.runtime.quantization import TokenStream

    torch.manual_seed(2)
    x = torch.randn(2, 3, 48, 16)
    x[..., 0, :] *= 40  # an attention sink
    for sink in (0, 1, 3):
        stream = TokenStream(2, 16, 0, axis, sink=sink)
        stream.append(x)
        stream.compress()
        assert torch.allclose(round_trip(x, 2, axis, 16, sink), stream.full(), atol=1e-6), sink


def test_a_sink_lowers_the_measured_error_of_an_outlier_first_token():
    """Keys per channel: one huge first token sets its group's range, so keeping it exact lowers the error of
    the whole group by far (values per token: only the first token's own error goes)."""
    torch.manual_seed(3)
    keys, values = torch.randn(2, 3, 64, 8), torch.randn(2, 3, 64, 8)
    keys[..., 0, :] *= 50
    values[..., 0, :] *= 50
    plain, sunk = kept_errors(keys, values, 32), kept_errors(keys, values, 32, sink=1)
    for bits in QUANT_BITS:
        assert sunk[bits][0] < plain[bits][0] / 4 and sunk[bits][1] < plain[bits][1], bits


def test_prices_count_codes_scales_and_the_recent_window():
    pricing = Pricing((16, 8, 4), context=4096)
    assert pricing.latent(16, 64) == pricing.kept(16, 64, 3) == FULL_BITS
    recent = 32 / 4096
    # 4-bit codes plus two float16 per 32 values (1 bit), the 32 most recent tokens at 16 bits
    assert pricing.latent(4, 64) == pytest.approx((1 - recent) * 5 + recent * 16)
    assert pricing.kept(4, 64, 3) == pytest.approx((1 - recent) * 5 + recent * 16)
    # a head narrower than a quantization group pads its values' last group: the price counts the padding
    assert pricing.kept(4, 16, 2) > pricing.kept(4, 64, 2)
    # a sink of 2 tokens: their exact copies at 16 bits on top (their codes keep the group whole)
    sunk = Pricing((16, 4), context=4096, sink=2)
    assert sunk.latent(4, 64) == pytest.approx(pricing.latent(4, 64) + 2 / 4096 * 16)


def _opt(layer: int, bits: int, loss: float, prices: dict[int, float]) -> Option:
    return Option(layer, 1, "keep", 0, 10, loss, {layer: (loss, 0.0)}, bits, prices[bits])


def test_allocator_trades_precision_against_loss_within_the_byte_budget():
    prices = {16: 16.0, 8: 9.0, 4: 5.0}
    options = [_opt(l, b, loss, prices) for l in range(2) for b, loss in ((16, 0.0), (8, 0.01), (4, 0.1))]
    # two layers of 10 elements: 320 bits at 16 bits. 180 bits fit both at 8 bits (loss 0.02), not 16 + 8 (250).
    plan = allocate(options, 2, 180)
    assert [o.bits for o in plan] == [8, 8] and plan_bits(plan) <= 180
    plan = allocate(options, 2, 250)
    assert sorted(o.bits for o in plan) == [8, 16]
    plan = allocate(options, 2, 100)  # only 4 bits fit (50 + 50)
    assert [o.bits for o in plan] == [4, 4]


def test_keep_options_use_the_measured_errors():
    opts = keep_options(3, 8, 1, {8: (0.01, 0.02), 4: (0.1, 0.2), 2: (1.0, 1.0)}, Pricing((16, 4)),
                        {3: ((1.0, 0.0), (2.0, 10.0))})  # value errors cost 2·e + 10·e²
    assert [(o.bits, o.loss) for o in opts] == [(16, 0.0), (4, pytest.approx(0.1 + 2 * 0.2 + 10 * 0.2**2))]


@pytest.mark.parametrize("text", ["", "16,3", "eight", "32"])
def test_bad_bits_are_refused(text):
    with pytest.raises(UserInputError, match="--bits"):
        parse_bits(text)
    with pytest.raises(UserInputError, match="--bits"):
        ConvertOptions(bits=text)


def test_bits_parse_sorted_and_unique():
    assert parse_bits("4,16,8,4") == (16, 8, 4)


def test_a_plan_with_bits_writes_loads_and_saves_the_bytes_it_promises(tiny_model_dir, tmp_path):
    """--bits 16,8,4 at a ratio that 16-bit latents alone would reach only by cutting rank: the plan quantizes some
    groups, the checkpoint records their bits, validation's byte count matches, and the runtime's bfloat16 cache
    removes the share of the 16-bit full cache the plan states."""
    from commonkv_convert.runtime import load_checkpoint
    from commonkv_convert.validate import removed_at_16_bits

    from .helpers import convert_tiny

    out = convert_tiny(tiny_model_dir, tmp_path / "bits", ratio=0.6, bits="16,8,4", context=256)
    config = json.loads((out / "config.json").read_text())
    block = config["commonkv"]
    assert any("bits" in g for g in block["groups"]), block["groups"]
    assert block["ratio"]["context"] == 256 and block["ratio"]["achieved"] >= 0.6
    report = json.loads((out / "commonkv_report.json").read_text())
    assert report["validation"]["bytes_match"]
    measured = report["validation"]["removed_at_16_bits"]
    assert measured["tokens"] == 256
    assert measured["measured"] == pytest.approx(block["ratio"]["achieved"], abs=1e-6)
    model = load_checkpoint(out, dtype=torch.float32)
    assert removed_at_16_bits(model.config, 256) == pytest.approx(measured["measured"])


def test_max_decode_cost_trades_quality_for_a_faster_step(tiny_model_dir, tmp_path):
    """With --max-decode-cost the planner finds a plan whose predicted step (the same model inspect and the card
    show) is within the limit, at a loss no lower than the unconstrained plan's; an impossible limit is a
    one-line PlanError."""
    from commonkv_convert.decode_cost import relative_cost, shape_from_config
    from commonkv_convert.errors import PlanError

    from .helpers import convert_tiny

    def step(out):
        config = json.loads((out / "config.json").read_text())
        groups = config["commonkv"]["groups"]
        rel = relative_cost(shape_from_config(config), groups, 256, element_size=4).cost
        return rel, sum(g.get("est_loss", 0.0) for g in groups)

    free = convert_tiny(tiny_model_dir, tmp_path / "free", ratio=0.6, bits="16,8,4", context=256, validate=False)
    free_cost, free_loss = step(free)
    limit = round(free_cost * 0.8, 3)
    fast = convert_tiny(tiny_model_dir, tmp_path / "fast", ratio=0.6, bits="16,8,4", context=256, validate=False,
                        max_decode_cost=limit)
    fast_cost, fast_loss = step(fast)
    assert fast_cost <= limit + 1e-9 < free_cost and fast_loss >= free_loss
    with pytest.raises(PlanError, match="--max-decode-cost"):
        convert_tiny(tiny_model_dir, tmp_path / "never", ratio=0.6, bits="16", context=256, validate=False,
                     max_decode_cost=0.01)


def test_sweep_records_a_variant_no_plan_meets(tiny_model_dir, tmp_path):
    """A sweep with `plan_errors` skips the variant whose speed limit no plan meets and still writes the others
    from the one analysis, each handed to `on_written` as soon as it is complete; without `plan_errors`, the
    PlanError stops the sweep."""
    from commonkv_convert.convert import convert_sweep
    from commonkv_convert.errors import PlanError

    from .helpers import TINY_CALIB

    base = ConvertOptions(**TINY_CALIB, validate=False)
    variants = {name: ConvertOptions(**TINY_CALIB, validate=False, ratio=0.6, bits="16", context=256, **limit)
                for name, limit in (("never", {"max_decode_cost": 0.01}), ("free", {}))}
    failed: dict[str, PlanError] = {}
    seen: list[tuple[str, bool]] = []
    written = convert_sweep(str(tiny_model_dir), base, variants, tmp_path, plan_errors=failed,
                            on_written=lambda n, r: seen.append((n, (r.out_dir / "commonkv_report.json").is_file())))
    assert set(written) == {"free"} and (tmp_path / "free" / "config.json").is_file()
    assert seen == [("free", True)]
    assert set(failed) == {"never"} and "--max-decode-cost" in str(failed["never"])
    assert not (tmp_path / "never").exists()
    with pytest.raises(PlanError, match="--max-decode-cost"):
        convert_sweep(str(tiny_model_dir), base, variants, tmp_path / "strict")


@pytest.mark.parametrize("sink", [0, 1])
def test_a_leaner_layout_is_planned_recorded_and_honoured(tiny_model_dir, tmp_path, sink):
    """--quant-group 16 --residual 0 (--quant-sink 1): each precision's error is measured at groups of 16, the plan
    is priced at them, the block records the layout, and the runtime stores the cache so: its bytes at --context
    remove the share the plan states. At the same precision the leaner layout costs fewer bits per element."""
    from commonkv_convert.runtime import load_checkpoint
    from commonkv_convert.validate import removed_at_16_bits

    from .helpers import convert_tiny

    assert Pricing(group=64, residual=0, context=1024).kept(4, 64, 1) == 4.5  # 4 + 2 float16 per 64 values
    assert Pricing(group=64, residual=0).latent(2, 64) < Pricing().latent(2, 64)
    out = convert_tiny(tiny_model_dir, tmp_path / "lean", ratio=0.7, bits="16,4", context=256, quant_group=16,
                       residual=0, quant_sink=sink)
    block = json.loads((out / "config.json").read_text())["commonkv"]
    layout = {"group": 16, "residual": 0, **({"sink": sink} if sink else {})}
    assert block["quantization"] == layout and block["format_version"] == (6 if sink else 5)
    assert any("bits" in g for g in block["groups"]), block["groups"]
    report = json.loads((out / "commonkv_report.json").read_text())
    assert report["validation"]["bytes_match"]
    assert report["validation"]["removed_at_16_bits"]["measured"] == pytest.approx(block["ratio"]["achieved"],
                                                                                   abs=1e-6)
    model = load_checkpoint(out, dtype=torch.float32)
    assert {(o.group, o.residual, o.sink) for o in map(model.config.layer_options, model.config.layer_roles())
            if o} == {(16, 0, sink)}
    assert removed_at_16_bits(model.config, 256) >= 0.7
    from typer.testing import CliRunner

    from commonkv_convert.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(out), "--json"], catch_exceptions=False)
    assert json.loads(shown.stdout)["achieved_ratio"] == pytest.approx(block["ratio"]["achieved"], abs=1e-6)
    card = (out / "README.md").read_text()
    shown = "16 values, the first 1 in the model dtype and out of their group's range;" if sink else "16 values;"
    assert f"float16 minimum and step per\n{shown}\n" in card and "most recent tokens" not in card
