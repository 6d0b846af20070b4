"""The official calibration mode against the staged one: which quantizers quantize while each range is
observed, what the last forward re-sets, RAR's zero-including ranges, and the EMA over batches."""

import copy

import pytest
import torch

from conftest import random_llamagen
from quantcore.calib import CalibrationSet, CalibrationSpec, build_calibration_set
from quantcore.methods import gps
from quantcore.models import rar
from quantcore.pipeline import layout_of, quantize
from quantcore.quant import UniformQuantizer
from quantcore.quant.modules import QuantLinear, iter_quant_modules
from quantcore.quant.quantizer import _ObservingQuantizer
from quantcore.recipe import Recipe


def random_rar(seed: int = 0) -> rar.RAR:
    torch.manual_seed(seed)
    model = rar.RAR(rar.MODELS["rar-tiny"].config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def calibration_set(model, rows: int = 8) -> CalibrationSet:
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    vocab = getattr(cfg, "vocab_size", None) or cfg.codebook_size
    tokens = torch.randint(0, vocab, (rows, cfg.num_tokens), generator=gen)
    classes = torch.randint(0, cfg.num_classes + 1, (rows,), generator=gen)  # null class included
    return CalibrationSet(classes, tokens, pool_size=rows, indices=list(range(rows)))


def quantizer_slots(model) -> dict[int, str]:
    """id(quantizer) -> "module:slot" for every quantizer in the model now."""
    slots = {}
    for name, m in iter_quant_modules(model):
        pairs = (
            (("input", m.input_quantizer), ("weight", m.weight_quantizer))
            if isinstance(m, QuantLinear)
            else (("a", m.a_quantizer), ("b", m.b_quantizer))
        )
        slots.update({id(q): f"{name}:{slot}" for slot, q in pairs})
    return slots


def quantizing(model) -> set[str]:
    """The quantizers that fake-quantize their input in a forward run now."""
    slots = quantizer_slots(model)
    return {
        slots[id(q)]
        for q in model.modules()
        if isinstance(q, _ObservingQuantizer)
        and (q.mode == "on" or (q.mode == "init" and bool(q.initialized)))
    }


def record_events(monkeypatch, model, recipe, calib):
    """Quantize `model`, recording every range observation: (stage, quantizer slot, quantizing set).
    GPS statistics are recorded as slot "gps-stats"."""
    events, pending = [], []
    observe_uniform, update_stats = UniformQuantizer.observe, gps.GPSStats.update

    def observe(self, x, pos=None):
        slots = quantizer_slots(model)
        if id(self) in slots and not slots[id(self)].endswith(":weight"):
            pending.append((slots[id(self)], frozenset(quantizing(model))))
        return observe_uniform(self, x, pos)

    def stats_update(self, x):
        pending.append(("gps-stats", frozenset(quantizing(model))))
        return update_stats(self, x)

    def progress(stage, fraction):
        events.extend((stage, slot, on) for slot, on in pending)
        pending.clear()

    monkeypatch.setattr(UniformQuantizer, "observe", observe)
    monkeypatch.setattr(gps.GPSStats, "update", stats_update)
    quantize(model, recipe, calib, progress=progress)
    return events


def forward_order(model, calib) -> list[str]:
    """Quantized modules in the order a forward runs them."""
    order = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n, m in iter_quant_modules(model)
    ]
    with torch.no_grad():
        model.sequence_logits(calib.classes[:1], calib.tokens[:1])
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(order))


def official(preset: str = "ptq4arvg", **options) -> Recipe:
    recipe = Recipe.preset(preset, 6, 6)
    return recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update=options)})


def test_official_mode_observes_each_range_with_everything_upstream_quantized(monkeypatch):
    model = random_llamagen("par-tiny", std=0.3)
    calib = calibration_set(model)
    events = record_events(monkeypatch, model, official(), calib)
    order = forward_order(model, calib)
    weights = {f"{n}:weight" for n, m in iter_quant_modules(model) if isinstance(m, QuantLinear)}
    ranges = [e for e in events if e[1] != "gps-stats"]
    assert ranges
    for stage, slot, on in ranges:
        module = slot.split(":")[0]
        upstream = order[: order.index(module)]
        assert weights <= on, (stage, slot)  # weights quantized while activations are calibrated
        for earlier in upstream:  # every activation quantizer that ran before it quantized its input
            assert any(s.startswith(f"{earlier}:") and not s.endswith(":weight") for s in on), (slot, earlier)
    # SmoothQuant and GPS gather their statistics on the float model
    assert {on for stage, slot, on in events if slot == "gps-stats"} == {frozenset()}
    # the shift's per-channel ranges, the re-set ranges GPS reads after the shift, the final ones
    wqkv = [stage for stage, slot, _ in ranges if slot == "layers.1.attention.wqkv:input"]
    assert wqkv == ["shift", "gps-ranges", "calibrate"]
    # PAR re-sets every activation quantizer at the end; a plain linear's range is set twice
    assert [s for s, slot, _ in ranges if slot == "layers.1.attention.wo:input"] == ["shift", "calibrate"]


def test_staged_mode_observes_every_range_on_the_float_model(monkeypatch):
    model = random_llamagen("par-tiny", std=0.3)
    events = record_events(monkeypatch, model, official(mode="staged"), calibration_set(model))
    weights = {f"{n}:weight" for n, m in iter_quant_modules(model) if isinstance(m, QuantLinear)}
    assert events
    for stage, slot, on in events:  # activations never quantized upstream; weights only in the final sweep
        assert on == (weights if stage == "calibrate" else set()), (stage, slot)
    wqkv = [stage for stage, slot, _ in events if slot == "layers.1.attention.wqkv:input"]
    assert wqkv == ["shift", "gps-ranges", "calibrate"]


def test_official_rar_keeps_earlier_ranges_and_includes_zero(monkeypatch):
    model = random_rar()
    calib = calibration_set(model)
    events = record_events(monkeypatch, model, official(), calib)
    stages = {}
    for stage, slot, _ in events:
        stages.setdefault(slot, []).append(stage)
    # RAR's last forward sets only what its passes reset: proj/fc2/AdaLN inputs and matmuls keep the
    # ranges of the first quantized forward; qkv/fc1 and the head get their final ones
    for slot in ("blocks.0.attn.proj:input", "blocks.1.mlp.fc2:input", "blocks.0.adaLN_modulation.1:input"):
        assert stages[slot] == ["shift"], slot
    assert stages["blocks.0.attn.matmul_qk:a"] == ["shift"]
    assert stages["blocks.1.attn.qkv:input"] == ["shift", "gps-ranges", "calibrate"]
    assert stages["lm_head:input"] == ["shift", "gps-ranges", "calibrate"]
    for name, m in iter_quant_modules(model):
        quantizers = (
            [m.weight_quantizer, m.input_quantizer] if isinstance(m, QuantLinear) else [m.a_quantizer]
        )
        for q in quantizers:
            assert q.include_zero == (q.granularity in ("tensor", "row", "channel")), (name, q.granularity)
            if q.include_zero:  # 0 is on the grid: lo <= 0 <= hi
                assert bool(((q.zero_point >= 0) & (q.zero_point <= 2**q.n_bits - 1)).all()), name


def test_rar_head_gets_a_second_shift_only_in_official_mode():
    model = random_rar()
    calib = calibration_set(model)
    reports = {
        mode: quantize(copy.deepcopy(model), official(mode=mode), calib) for mode in ("official", "staged")
    }
    assert "second_shift_abs_max" in reports["official"].scales["gps"]["lm_head"]
    assert "lm_head" not in reports["staged"].scales["gps"]
    assert reports["official"].plan.include_zero and not reports["staged"].plan.include_zero


def test_include_zero_clamps_positive_ranges():
    x = torch.linspace(1.0, 2.0, 1000)[None, :, None].expand(2, -1, 1).contiguous()
    plain, clamped = UniformQuantizer(6), UniformQuantizer(6, include_zero=True)
    for q in (plain, clamped):
        q.observe(x)
        q.finalize()
    assert float(clamped.zero_point) == 0 and float(clamped.scale) == pytest.approx(2.0 / 63, rel=1e-2)
    assert float(plain.scale) < 1.1 / 63  # the positive-only range alone


def test_init_mode_sets_from_its_forward_and_averages_later_batches():
    q = UniformQuantizer(8, "tensor", pcts=(0.99999,))
    first, second = (
        torch.linspace(-1.0, 1.0, 512)[None, :, None],
        torch.linspace(0.0, 3.0, 512)[None, :, None],
    )
    reference = []
    for x in (first, second):
        r = UniformQuantizer(8, "tensor", pcts=(0.99999,))
        r.observe(x)
        r.finalize()
        reference.append((float(r.scale), float(r.zero_point)))
    q.ema = 0.9
    q.set_mode("init")
    out = q(first)
    assert float(q.scale) == pytest.approx(reference[0][0]) and not torch.equal(out, first)  # quantized
    q(second)
    assert float(q.scale) == pytest.approx(0.9 * reference[0][0] + 0.1 * reference[1][0])
    assert float(q.zero_point) == round(0.9 * reference[0][1] + 0.1 * reference[1][1])
    q.ema = None
    q.set_mode("init")  # no average: the first forward of the session fixes the parameters
    q(second)
    fixed = float(q.scale)
    q(first)
    assert float(q.scale) == fixed == pytest.approx(reference[1][0])


def test_official_batches_follow_the_family(monkeypatch):
    par, rar_model = random_llamagen("par-tiny", std=0.3), random_rar()
    calls = []
    for model, expected in ((par, [64, 36]), (rar_model, [100])):
        original = model.sequence_logits
        monkeypatch.setattr(
            model, "sequence_logits", lambda c, t, o=original: (calls.append(len(c)), o(c, t))[1]
        )
        calls.clear()
        quantize(model, official("rtn"), calibration_set(model, rows=100))
        assert calls == expected  # PAR: batches of 64 (EMA), RAR: the whole set in one forward
        assert layout_of(model).official.batch_size == (64 if model is par else None)


def test_official_rar_calibration_labels_exclude_the_last_class():
    model = random_rar()
    spec = CalibrationSpec(num_samples=24, batch_size=24, selection="random")
    calib = build_calibration_set(model, spec, rar.MODELS["rar-tiny"].sampling.to_dict())
    cond = calib.classes[calib.classes != model.null_class]
    assert cond.numel() and int(cond.max()) < model.config.num_classes - 1
