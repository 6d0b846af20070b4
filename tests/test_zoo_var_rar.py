"""The bundled VAR and RAR models (tiny-var, deep-var, tiny-rar) and their zoo tokenizers."""

import numpy as np
import pytest
import torch

from conftest import needs_fashion_mnist
from quantcore.api import load_generator, quantize_job
from quantcore.checkpoint import read_state_dict
from quantcore.eval.fidelity import teacher_forced_fidelity
from quantcore.models import family_module
from quantcore.recipe import PRESETS
from quantcore.registry import get_spec
from quantcore.tokenizers import load_tokenizer
from quantcore.zoo import BUNDLED, ZOO_TOKENIZERS, heldout_sequences, load_zoo_tokenizer

NEW = ("tiny-var", "deep-var", "tiny-rar")


@pytest.mark.parametrize("name", NEW)
def test_weights_load_strictly_and_the_registry_knows_the_family(name):
    entry, checkpoint, tokenizer_checkpoint, family = BUNDLED[name]
    assert family == name.split("-")[1] and get_spec(name).family == family
    assert get_spec(name).describe()["bundled"] and get_spec(name).describe()["image_size"] == 32
    sd = read_state_dict(checkpoint)
    assert sd.keys() == family_module(family).build(entry.config).state_dict().keys()
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    # the tokenizer registry loads the zoo tokenizer by name, strictly, from its bundled file
    config, model_class, weights = ZOO_TOKENIZERS[entry.config.tokenizer]
    assert tokenizer_checkpoint == weights
    tokenizer = load_tokenizer(entry.config.tokenizer, tokenizer_checkpoint)
    assert isinstance(tokenizer, model_class) and tokenizer.config == config


@pytest.mark.parametrize("name", NEW)
def test_api_generates_images_of_the_right_shape(name):
    images = load_generator(name).generate([0, 5, 9], seeds=[1, 2, 3])
    assert images.shape == (3, 32, 32, 3) and images.dtype == torch.uint8
    again = load_generator(name).generate([0, 5, 9], seeds=[1, 2, 3])
    assert torch.equal(images, again)


@pytest.mark.parametrize("name", NEW)
def test_tokenizer_round_trip_keeps_the_image(name):
    """Encode and decode a garment-like image: the reconstruction stays close (trained weights)."""
    tokenizer = load_zoo_tokenizer(None, BUNDLED[name].entry.config.tokenizer)
    image = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    image[:, 6:26, 10:22] = 200
    tokens = tokenizer.encode_to_tokens(image)
    assert tokens.shape == (1, BUNDLED[name].entry.config.num_tokens)
    recon = tokenizer.decode_tokens(tokens)
    assert float((recon.float() - image.float()).abs().mean()) < 20


@needs_fashion_mnist
@pytest.mark.parametrize("name", NEW)
def test_heldout_sequences_in_generation_order(name):
    gen = load_generator(name)
    classes, tokens = heldout_sequences(gen.model, gen.tokenizer, 8)
    assert classes.shape == (8,) and tokens.shape == (8, gen.model.config.num_tokens)
    same = teacher_forced_fidelity(gen.model, gen.model, classes, tokens)
    assert same["top1_agreement"] == 1.0 and same["logit_kl"] == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        logits = gen.model.sequence_logits(classes, tokens)
    # a trained model predicts held-out tokens far better than chance (ln 512 = 6.24 nats)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert float(loss) < 4.0


@pytest.mark.parametrize("name", ("tiny-var", "tiny-rar"))  # deep-var: the same family, 2x the depth
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_quantizes_the_bundled_model(tmp_path, name, preset):
    spec = {
        "model": name,
        "recipe": preset,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 2},
    }
    manifest = quantize_job(spec, tmp_path / "art")
    assert manifest["model"]["family"] == BUNDLED[name].family
    assert manifest["model"]["tokenizer"] == BUNDLED[name].entry.config.tokenizer
    assert 0.0 <= manifest["metrics"]["token_agreement"] <= 1.0 and np.isfinite(
        manifest["metrics"]["logit_kl"]
    )
    images = load_generator(str(tmp_path / "art"), real=False).generate([3], [7])
    assert images.shape == (1, 32, 32, 3)
