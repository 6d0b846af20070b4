import math

import pytest
import torch
from torch import nn

from quantcore.errors import ConfigError, QuantcoreError
from quantcore.nn import Linear, MatMul
from quantcore.quant import (
    LogSqrt2Quantizer,
    QuantLinear,
    QuantMatMul,
    Reservoir,
    UniformQuantizer,
    build_quant_module,
    build_quantizer,
    calibrate_weights,
    describe_quant_modules,
    fake_quant,
    finalize_calibration,
    iter_quant_modules,
    log_sqrt2_quant,
    search_range,
    set_quant_mode,
    swap_module,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calibrated(q, *batches):
    q.set_mode("calibrate")
    for x, pos in batches:
        q(x, pos)
    q.finalize()
    q.set_mode("on")
    return q


def _reference_search(x: torch.Tensor, n_bits: int) -> tuple[float, float]:
    """The official per-tensor search written with torch.quantile, for small tensors."""
    best = (math.inf, None, None)
    for pct in (0.999, 0.9999, 0.99999):
        hi, lo = torch.quantile(x, pct), torch.quantile(x, 1 - pct)
        scale = (hi - lo) / (2**n_bits - 1)
        zp = torch.round(-lo / scale)
        err = (fake_quant(x, scale, zp, n_bits) - x).square().mean()
        if err < best[0]:
            best = (err, scale, zp)
    return float(best[1]), float(best[2])


def test_fake_quant_grid_and_clamp():
    scale, zp = torch.tensor(0.5), torch.tensor(3.0)
    x = torch.tensor([-1.5, -1.4, 0.0, 0.26, 100.0, -100.0])
    out = fake_quant(x, scale, zp, 3)
    # q = clamp(round(x/0.5) + 3, 0, 7); x^ = (q - 3) * 0.5
    assert torch.equal(out, torch.tensor([-1.5, -1.5, 0.0, 0.5, 2.0, -1.5]))


@pytest.mark.parametrize("bits", [1, 9, 0, 6.0, True])
def test_bits_out_of_range_raise_config_error(bits):
    with pytest.raises(ConfigError, match=repr(bits)):
        UniformQuantizer(bits)


def test_search_range_matches_quantile_reference_and_is_per_row():
    x = torch.randn(5, 3000, generator=_gen()) * torch.tensor([0.1, 1, 3, 10, 0.01])[:, None]
    x[2, 7] = 80.0  # an outlier that the percentile clip should cut
    scale, zp = search_range(x, 6)
    for r in range(5):
        ref_scale, ref_zp = _reference_search(x[r], 6)
        assert scale[r].item() == pytest.approx(ref_scale, rel=1e-4)
        assert zp[r].item() == ref_zp
    assert torch.equal(zp, torch.round(zp))


def test_tensor_quantizer_streams_more_than_2_pow_24_elements():
    q = UniformQuantizer(8, "tensor")
    q.set_mode("calibrate")
    g = _gen(1)
    extremes = []
    for _ in range(3):
        x = torch.randn(16, 512, 768, generator=g)  # 6.3M per batch, 18.9M in all
        extremes.append((x.min(), x.max()))
        q(x)
    assert q._stats.reservoirs[0].values.numel() <= q.sample_size
    q.finalize()
    assert q.observed_min.item() == min(e[0] for e in extremes).item()
    assert q.observed_max.item() == max(e[1] for e in extremes).item()
    # For N(0, 1) the 0.9999-ish range is about +-3.7..4.4 and zero maps to the middle code.
    assert 7.0 / 255 < q.scale.item() < 9.5 / 255
    assert abs(q.zero_point.item() - 127.5) <= 2


def test_reservoir_is_exact_when_small_and_deterministic_when_full():
    blocks = [torch.randn(3, n, generator=_gen(n)) for n in (50, 70, 30)]
    small = Reservoir(1000, seed=0)
    for b in blocks:
        small.add(b)
    assert torch.equal(small.values.sort(dim=1).values, torch.cat(blocks, 1).sort(dim=1).values)

    def fill(seed):
        r = Reservoir(64, seed=seed)
        for b in blocks:
            r.add(b)
        return r.values

    assert fill(0).shape == (3, 64)
    assert torch.equal(fill(0), fill(0))
    assert not torch.equal(fill(0), fill(1))


def test_streaming_calibration_equals_one_shot_when_sample_fits():
    x = torch.randn(6, 10, 8, generator=_gen(2))
    pos = torch.arange(10)
    one = _calibrated(UniformQuantizer(6, "channel", channels=8), (x, pos))
    many = _calibrated(UniformQuantizer(6, "channel", channels=8), *[(x[i : i + 2], pos) for i in (0, 2, 4)])
    assert torch.equal(one.scale, many.scale) and torch.equal(one.zero_point, many.zero_point)


def test_channel_granularity_is_a_search_per_input_channel():
    x = torch.randn(4, 20, 6, generator=_gen(3)) * torch.arange(1, 7) + torch.arange(6)
    q = _calibrated(UniformQuantizer(5, "channel", channels=6), (x, None))
    scale, zp = search_range(x.reshape(-1, 6).T, 5)
    assert torch.allclose(q.scale, scale) and torch.equal(q.zero_point, zp.int())
    assert torch.allclose(q(x), fake_quant(x, scale, zp, 5))


def test_row_granularity_for_weights():
    w = torch.randn(7, 33, generator=_gen(4)) * torch.logspace(-2, 1, 7)[:, None]
    q = UniformQuantizer(4, "row", channels=7)
    q.observe(w)
    q.finalize()
    q.set_mode("on")
    scale, zp = search_range(w, 4)
    assert torch.allclose(q(w), fake_quant(w, scale[:, None], zp[:, None], 4))


def test_group_quantizer_indexes_its_table_by_position():
    table = torch.tensor([0, 1, 2])  # pos 0, pos 1, pos >= 2 shared (RAR)
    x = torch.randn(8, 12, 16, generator=_gen(5))
    x[:, 0] *= 30  # a sink-like first token
    pos = torch.arange(12)
    q = _calibrated(UniformQuantizer(6, "group", group_of_position=table), (x, pos))
    for g, sl in ((0, slice(0, 1)), (1, slice(1, 2)), (2, slice(2, 12))):
        scale, zp = search_range(x[:, sl].reshape(1, -1), 6)
        assert q.scale[g].item() == pytest.approx(scale.item()) and q.zero_point[g].item() == zp.item()
    assert q.scale[0] > 10 * q.scale[2]
    # A decode step at absolute position 9 uses the shared entry; position 0 its own.
    step = torch.randn(8, 1, 16, generator=_gen(6))
    assert torch.equal(q(step, torch.tensor([9])), fake_quant(step, q.scale[2], q.zero_point[2].float(), 6))
    assert torch.equal(q(step, torch.tensor([0])), fake_quant(step, q.scale[0], q.zero_point[0].float(), 6))
    with pytest.raises(ConfigError, match="pos"):
        q(step)


def test_group_quantizer_refuses_unseen_groups():
    q = UniformQuantizer(8, "group", group_of_position=torch.tensor([0, 1, 1, 2]))
    q.set_mode("calibrate")
    q(torch.randn(2, 2, 4), torch.arange(2))
    with pytest.raises(QuantcoreError, match=r"\[2\]"):
        q.finalize()


def test_dynamic_token_quantizes_each_token_with_its_own_range():
    x = torch.randn(2, 5, 32, generator=_gen(7)) * torch.tensor([0.1, 1, 10, 100, 1000])[:, None]
    q = UniformQuantizer(8, "dynamic_token")
    q.set_mode("on")
    rel = ((q(x) - x).abs().amax(-1) / x.abs().amax(-1)).max()
    assert rel < 1.0 / 255


def test_sink_positions_stay_fp_and_out_of_the_statistics():
    x = torch.randn(4, 10, 8, generator=_gen(8))
    x[:, :2] *= 100
    pos = torch.arange(10)
    plain = _calibrated(UniformQuantizer(6), (x[:, 2:], pos[2:]))
    sink = UniformQuantizer(6)
    sink.set_passthrough([0, 1])
    _calibrated(sink, (x, pos))
    assert torch.equal(sink.scale, plain.scale) and torch.equal(sink.zero_point, plain.zero_point)
    out = sink(x, pos)
    assert torch.equal(out[:, :2], x[:, :2])
    assert torch.equal(out[:, 2:], plain(x[:, 2:]))
    with pytest.raises(ConfigError, match="pos"):
        sink(x)
    sink.set_passthrough(None)
    assert not torch.equal(sink(x)[:, :2], x[:, :2])


@pytest.mark.parametrize(
    "make",
    [
        lambda: UniformQuantizer(6),
        lambda: UniformQuantizer(6, "channel", channels=16, include_zero=True),
        lambda: UniformQuantizer(6, "group", group_of_position=torch.tensor([0, 1, 2, 3, 4, 4, 4, 4, 5])),
        lambda: UniformQuantizer(6, "dynamic_token"),
        lambda: LogSqrt2Quantizer(4),
    ],
)
def test_state_dict_reloads_into_a_quantizer_built_from_its_description(make):
    x = torch.rand(3, 12, 16, generator=_gen(9))
    pos = torch.arange(12)
    q = _calibrated(make(), (x, pos))
    state = q.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values())
    fresh = build_quantizer(q.describe())
    assert fresh.describe() == q.describe()
    fresh.load_state_dict(state)
    fresh.set_mode("on")
    assert torch.equal(fresh(x, pos), q(x, pos))


def test_log_sqrt2_codes_and_decode():
    scale = torch.tensor(1.0)
    # code = round(-2 log2 x): 1 -> 0, 2^-0.5 -> 1, 2^-1 -> 2, 2^-1.5 -> 3; decode 2^-ceil(q/2) * (sqrt2 if odd)
    x = torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5, 2.0, 0.0, 2**-9])
    out = log_sqrt2_quant(x, scale, 4)
    expected = torch.tensor([1.0, 2**-1 * math.sqrt(2), 0.5, 2**-2 * math.sqrt(2), 1.0, 0.0, 0.0])
    assert torch.allclose(out, expected)
    # Code 15 (x = 2^-7.5) is the last level; code 16 (x = 2^-8) underflows to 0.
    assert log_sqrt2_quant(torch.tensor(2**-7.5), scale, 4) > 0
    assert log_sqrt2_quant(torch.tensor(2**-8.0), scale, 4) == 0


def test_log_sqrt2_scale_is_a_quantile_candidate():
    p = torch.softmax(torch.randn(4, 2, 16, 16, generator=_gen(10)) * 3, dim=-1)
    q = _calibrated(LogSqrt2Quantizer(4), (p, None))
    candidates = [torch.quantile(p.flatten(), pct) for pct in (0.999, 0.9999, 0.99999)]
    assert any(torch.isclose(q.scale[0], c) for c in candidates)
    assert (q(p) - p).abs().max() < 0.25


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = Linear(16, 24)
        self.head = Linear(24, 8, bias=False)
        self.mm = MatMul()

    def forward(self, x, pos):
        h = self.fc(x, pos)
        return self.mm(torch.softmax(h @ h.transpose(-1, -2), -1), self.head(h, pos))


def _quantize_tiny(model: _Tiny) -> _Tiny:
    swap_module(
        model, "fc", QuantLinear.from_linear(model.fc, 6, 6, "group", group_of_position=torch.tensor([0, 1]))
    )
    swap_module(model, "head", QuantLinear.from_linear(model.head, 6, 6))
    swap_module(model, "mm", QuantMatMul.from_bits(8, 8, a_log_sqrt2=True))
    return model


def test_quant_linear_off_equals_fp_and_on_uses_the_cached_fake_weight():
    lin = Linear(16, 24)
    x = torch.randn(2, 5, 16, generator=_gen(11))
    ql = QuantLinear.from_linear(lin, 4, 8)
    assert ql.weight is lin.weight
    assert torch.equal(ql(x), lin(x))
    ql.calibrate_weight()
    ql.weight_quant = True
    wq = ql.quantized_weight()
    assert torch.equal(ql(x), nn.functional.linear(x, wq, lin.bias))
    assert ql.quantized_weight() is wq  # cached, not recomputed per call
    with torch.no_grad():
        ql.weight.mul_(2)
    assert ql.quantized_weight() is not wq  # an in-place weight edit invalidates the cache


def test_quant_linear_compiles_with_its_weight_cache():
    """A layer the planner keeps simulated runs inside the compiled sampler: the cache check must not
    reach the graph (its version key is a data-dependent guard dynamo refuses)."""
    ql = QuantLinear.from_linear(Linear(16, 24), 4, 8)
    ql.calibrate_weight()
    ql.weight_quant = True
    x = torch.randn(3, 16, generator=_gen(12))
    eager = ql(x)  # the warm-up fills the cache the graph reads
    torch._dynamo.reset()
    assert torch.equal(torch.compile(ql, fullgraph=True, backend="eager")(x), eager)


def test_model_mode_api_and_rebuild_from_descriptions():
    torch.manual_seed(0)
    model = _quantize_tiny(_Tiny())
    x = torch.randn(3, 6, 16, generator=_gen(12))
    pos = torch.arange(6)
    fp = model(x, pos)
    assert [n for n, _ in iter_quant_modules(model)] == ["fc", "head", "mm"]
    with pytest.raises(QuantcoreError):
        set_quant_mode(model, weights="on", acts="on")
        model(x, pos)
    set_quant_mode(model, weights="off", acts="off")
    assert calibrate_weights(model) == 2
    set_quant_mode(model, acts="calibrate")
    assert torch.equal(model(x[:2], pos), fp[:2])  # calibration passes FP through
    model(x[2:], pos)
    assert finalize_calibration(model) == 4
    set_quant_mode(model, weights="on", acts="on")
    out = model(x, pos)
    assert 0 < (out - fp).abs().max() < 0.2 * fp.abs().max()

    descriptions = describe_quant_modules(model)
    assert descriptions["fc"]["input"] == {
        "kind": "uniform",
        "bits": 6,
        "granularity": "group",
        "num_groups": 2,
        "include_zero": False,
        "num_positions": 2,
    }
    assert descriptions["mm"]["a"]["kind"] == "log_sqrt2"
    rebuilt = _Tiny()
    for name, desc in descriptions.items():
        swap_module(rebuilt, name, build_quant_module(desc))
    rebuilt.load_state_dict(model.state_dict())
    set_quant_mode(rebuilt, weights="on", acts="on")
    assert torch.equal(rebuilt(x, pos), out)


def test_bad_modes_are_config_errors():
    q = UniformQuantizer(8)
    with pytest.raises(ConfigError, match="maybe"):
        q.set_mode("maybe")
    with pytest.raises(ConfigError, match="calibrate_weights"):
        set_quant_mode(QuantLinear.from_linear(Linear(4, 4), 8, 8), weights="calibrate")
    with pytest.raises(ConfigError, match="granularity"):
        UniformQuantizer(8, "block")
