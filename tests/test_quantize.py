import copy
import json

import pytest
import torch
from reference_sampling import reference_tokens

from conftest import random_llamagen
from quantcore.api import JobSpec, load_generator, quantize_job
from quantcore.artifact import MODEL_FILE, load_artifact, verify_artifact
from quantcore.calib import CalibrationSpec, build_calibration_set
from quantcore.errors import ArtifactError, ConfigError, RecipeError
from quantcore.fastgen import generate_tokens
from quantcore.pipeline import layout_of, quantize
from quantcore.quant.modules import QuantLinear, iter_quant_modules, set_quant_mode
from quantcore.recipe import PRESETS, Recipe

MODELS = ["llamagen-tiny", "par-tiny"]


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for name in MODELS:
        fp = random_llamagen(name, std=0.3)
        calib = build_calibration_set(fp, CalibrationSpec(num_samples=8, batch_size=8), {"cfg_scale": 2.0})
        out[name] = (fp, calib)
    return out


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("preset", ["smoothquant", "os+", "gps", "ptq4arvg"])
def test_folding_is_exact_with_quantization_off(calibrated, name, preset):
    fp, calib = calibrated[name]
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset(preset, 6, 6), calib)
    set_quant_mode(model, weights="off", acts="off")
    ref = fp.sequence_logits(calib.classes, calib.tokens)
    assert rel_err(model.sequence_logits(calib.classes, calib.tokens), ref) <= 1e-5
    # the folds really happened: norms carry the scales, shifted linears gained biases
    if preset in ("os+", "ptq4arvg"):
        assert model.layers[0].attention_norm.bias is not None
        assert model.layers[0].attention.wqkv.bias is not None
    assert not torch.equal(model.layers[0].attention_norm.weight, fp.layers[0].attention_norm.weight)


def test_no_runtime_division_remains(calibrated):
    fp, calib = calibrated["par-tiny"]
    model = copy.deepcopy(fp)
    quantize(model, Recipe.preset("ptq4arvg", 8, 8), calib)
    for name, module in iter_quant_modules(model):
        extra = {k for k, _ in module.named_buffers(recurse=False)} | {
            k for k, _ in module.named_parameters(recurse=False)
        }
        assert extra <= {"weight", "bias"}, (
            name,
            extra,
        )  # only quantizer tables live below, no smoothing scales


@pytest.mark.parametrize("name", MODELS)
def test_stwq_uses_each_positions_group_during_kv_decoding(calibrated, name):
    fp, calib = calibrated[name]
    model = copy.deepcopy(fp).double()
    quantize(model, Recipe.preset("ptq4arvg", 8, 8), calib)
    layout = layout_of(model)
    lin: QuantLinear = model.layers[0].feed_forward.w2
    q = lin.input_quantizer
    assert q.granularity == "group" and q.num_params == int(layout.position_groups.max()) + 1
    assert len(set(q.scale.tolist())) == q.num_params  # every group got its own calibration
    seen = []
    original = q.params_for

    def spy(x, pos):
        scale, zp = original(x, pos)
        seen.append((pos.clone(), scale.flatten().clone()))
        return scale, zp

    q.params_for = spy
    cached = generate_tokens(model, torch.tensor([1, 2]), [0, 1], cfg_scale=2.0)
    q.params_for = original
    positions = torch.cat([p for p, _ in seen])
    assert sorted(set(positions.tolist())) == list(
        range(model.config.seq_len)
    )  # decoding visits every position
    for pos, scale in seen:
        expected = q.scale[layout.position_groups[pos]]
        torch.testing.assert_close(scale, expected.to(scale.dtype))
    full = reference_tokens(model, torch.tensor([1, 2]), [0, 1], cfg_scale=2.0)
    assert torch.equal(cached, full)


def test_dgc_official_on_collapsed_uncond_half_keeps_cond_only(calibrated):
    # LlamaGen's token 0 is the class token; under the null class its features are identical rows
    fp, _ = calibrated["llamagen-tiny"]
    spec = CalibrationSpec(num_samples=8, batch_size=8, selection="dgc-official", seed=3)
    calib = build_calibration_set(fp, spec, {"cfg_scale": 2.0})
    assert calib.info["pct"] == 1.0 and (calib.classes < fp.config.num_classes).all()
    again = build_calibration_set(fp, spec, {"cfg_scale": 2.0})
    assert calib.indices == again.indices and torch.equal(calib.tokens, again.tokens)
    rand = build_calibration_set(fp, spec.model_copy(update={"selection": "random"}), {"cfg_scale": 2.0})
    assert len(rand) == 8 and (rand.classes == fp.config.num_classes).any()
    maha = build_calibration_set(
        fp, spec.model_copy(update={"selection": "dgc-mahalanobis"}), {"cfg_scale": 2.0}
    )
    assert len(maha) == 8 and maha.info["method"] == "dgc-mahalanobis"


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("bits", [(8, 8), (6, 6)])
def test_every_preset_runs_and_round_trips(tmp_path, preset, bits):
    spec = {
        "model": "par-tiny",
        "recipe": preset,
        "w_bits": bits[0],
        "a_bits": bits[1],
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 2},
    }
    out = tmp_path / "art"
    manifest = quantize_job(spec, out)
    assert manifest["recipe"]["name"] == preset and manifest["files"][MODEL_FILE]["size"] > 0
    assert 0.0 <= manifest["metrics"]["token_agreement"] <= 1.0
    assert manifest["calibration"]["selection"] == "dgc-official" and "indices" in manifest["calibration"]
    model, _, loaded = load_artifact(out)
    assert loaded["layers"] == manifest["layers"]


def test_loaded_artifact_reproduces_outputs_bit_for_bit(tmp_path):
    spec = JobSpec(
        model="llamagen-tiny",
        recipe="ptq4arvg",
        w_bits=6,
        a_bits=6,
        calibration={"num_samples": 4, "batch_size": 4},
        evaluation={"num_images": 0},
    )
    manifest = quantize_job(spec, tmp_path / "a")
    gen = load_generator(str(tmp_path / "a"))
    again = load_generator(str(tmp_path / "a"))
    images = gen.generate([1, 2, 3], [5, 6, 7])
    assert torch.equal(images, again.generate([1, 2, 3], [5, 6, 7]))
    classes = torch.tensor([1, 2])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        gen.model.sequence_logits(classes, tokens), again.model.sequence_logits(classes, tokens)
    )
    assert manifest["model"]["random_weights"] is True and manifest["model"]["weights"] == "random"
    assert manifest["model"]["checkpoint_sha256"] is None


def test_an_artifacts_real_layers_are_built_from_its_stored_codes(tmp_path):
    from safetensors.torch import load_file

    from quantcore.quant.real import Int8Linear, RealQuantLinear, weight_codes

    spec = {
        "model": "llamagen-tiny",
        "recipe": "ptq4arvg",
        "calibration": {"num_samples": 4, "batch_size": 4},
    }
    quantize_job({**spec, "evaluation": {"num_images": 0}}, tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / MODEL_FILE))
    model, _, _ = load_artifact(tmp_path / "a")
    layers = {n: m for n, m in iter_quant_modules(model) if isinstance(m, QuantLinear)}
    for name, layer in layers.items():
        assert torch.equal(layer.stored_codes(), stored[f"{name}.weight_codes"])  # 8-bit: one byte each
        # a copy's weight is another tensor, so it re-quantizes: to the same codes
        assert torch.equal(weight_codes(copy.deepcopy(layer)), stored[f"{name}.weight_codes"].int())
    generator = load_generator(str(tmp_path / "a"))
    wqkv = generator.model.layers[0].attention.wqkv
    assert isinstance(wqkv, Int8Linear)
    assert torch.equal(
        wqkv.qweight, (stored["layers.0.attention.wqkv.weight_codes"].int() - 128).to(torch.int8)
    )
    # the real module is built from the kept codes (here one code moved, so the source shows) ...
    layer = layers["layers.0.attention.wqkv"]
    moved = stored["layers.0.attention.wqkv.weight_codes"].clone()
    moved[0, 0] = (int(moved[0, 0]) + 1) % 256
    layer.keep_stored_codes(moved)
    assert torch.equal(
        RealQuantLinear.from_quant_linear(layer, "int8-cpu").qweight, (moved.int() - 128).to(torch.int8)
    )
    # ... only while the weight is the loaded one: an edited weight is quantized afresh
    with torch.no_grad():
        layer.weight.mul_(1.01)
    assert layer.stored_codes() is None
    assert not torch.equal(weight_codes(layer), moved.int())


def test_a_bundled_models_manifest_records_trained_weights_and_their_sha256(tmp_path):
    from quantcore import zoo
    from quantcore.checkpoint import file_sha256

    spec = {
        "model": "tiny-var",
        "recipe": "rtn",
        "calibration": {"num_samples": 2, "batch_size": 2},
        "evaluation": {"num_images": 0},
    }
    model = quantize_job(spec, tmp_path / "a")["model"]
    assert model["weights"] == "bundled" and model["random_weights"] is False
    assert model["checkpoint_sha256"] == file_sha256(zoo.BUNDLED["tiny-var"].checkpoint)
    assert model["tokenizer_sha256"] == file_sha256(zoo.BUNDLED["tiny-var"].tokenizer_checkpoint)


@pytest.mark.parametrize("bits", [(4, 8), (8, None), (4, None)])
def test_w4a8_and_weight_only(tmp_path, bits):
    manifest = quantize_job(
        {
            "model": "llamagen-tiny",
            "recipe": "ptq4arvg" if bits[1] else "rtn",
            "w_bits": bits[0],
            "a_bits": bits[1],
            "calibration": {"num_samples": 4, "batch_size": 4},
            "evaluation": {"num_images": 2},
        },
        tmp_path / "a",
    )
    model, _, _ = load_artifact(tmp_path / "a")
    lin = model.layers[0].attention.wqkv
    assert lin.weight_quantizer.n_bits == bits[0]
    assert lin.input_quantizer.mode == ("off" if bits[1] is None else "on")
    assert manifest["recipe"]["a_bits"] == bits[1]


def test_tampered_or_truncated_artifact_is_refused(tmp_path):
    quantize_job(
        {
            "model": "llamagen-tiny",
            "recipe": "rtn",
            "calibration": {"num_samples": 4, "batch_size": 4},
            "evaluation": {"num_images": 0},
        },
        tmp_path / "a",
    )
    weights = tmp_path / "a" / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tmp_path / "a")
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="truncated"):
        verify_artifact(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"]["../evil"] = {"sha256": "0", "size": 0}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        verify_artifact(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not empty"):
        quantize_job({"model": "llamagen-tiny"}, tmp_path / "a")


@pytest.mark.parametrize(
    "recipe, field",
    [
        ({"w_bits": 9}, "recipe.w_bits"),
        ({"a_bits": 1}, "recipe.a_bits"),
        ({"passes": [{"kind": "quarot"}]}, "recipe.passes.0"),
        ({"passes": [{"kind": "smoothquant", "alpha": 2}]}, "recipe.passes.0.smoothquant.alpha"),
        ({"a_bits": None, "passes": [{"kind": "stwq"}]}, "needs activation quantization"),
        ({"passes": [{"kind": "stwq", "mode": "per_channel"}]}, "recipe.passes.0.stwq.mode"),
        ({"passes": [{"kind": "stwq"}, {"kind": "gps"}]}, "must come before"),
        ({"passes": [{"kind": "stwq"}, {"kind": "dynamic_token"}]}, "alternatives"),
    ],
)
def test_bad_recipes_name_the_field(recipe, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        Recipe.parse(recipe)


def test_recipe_serialises_and_bad_job_fields(tmp_path):
    recipe = Recipe.preset("ptq4arvg", 6, 6)
    assert Recipe.parse(recipe.model_dump_json()) == recipe
    assert Recipe.parse(recipe.to_yaml()) == recipe
    with pytest.raises(RecipeError, match="unknown preset"):
        Recipe.preset("nope")
    with pytest.raises(ConfigError, match="calibration.num_samples"):
        quantize_job({"model": "llamagen-tiny", "calibration": {"num_samples": 1}}, tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown model"):
        quantize_job({"model": "gpt-9"}, tmp_path / "y")


@pytest.mark.parametrize("model", ["par-tiny", "rar-tiny", "var-tiny"])
def test_per_position_stwq_runs_on_every_family(tmp_path, model):
    recipe = {
        "name": "sq+stwq-pp",
        "w_bits": 8,
        "a_bits": 8,
        "passes": [{"kind": "smoothquant"}, {"kind": "stwq", "mode": "per_position"}],
    }
    quantize_job(
        {
            "model": model,
            "recipe": recipe,
            "calibration": {"num_samples": 4, "batch_size": 4},
            "evaluation": {"num_images": 1},
        },
        tmp_path / "a",
    )
    loaded, _, manifest = load_artifact(tmp_path / "a")
    groups = [d["input"]["num_groups"] for d in manifest["layers"].values() if d["kind"] == "linear"]
    assert max(groups) >= loaded.config.seq_len - 1  # per-position tables, sized by the positions they see
