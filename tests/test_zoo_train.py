"""The zoo's MAR training pieces: the official objective, the exact latent rescale, and a tiny run of the
kl-tokenizer and mar stages end to end (time cap, record, re-evaluation)."""

import json
import shutil

import pytest
import torch

from conftest import needs_fashion_mnist
from quantcore.models import mar
from quantcore.models.mar import LATENT_SCALE, MODELS
from quantcore.tokenizers.kl16 import AutoencoderKL
from quantcore.zoo import CLASSIFIER_WEIGHTS, ZOO_KL
from quantcore.zoo.train import main, rescale_latents

TINY = MODELS["mar-tiny"].config


@torch.enable_grad()  # whatever an earlier test left on
def test_training_loss_trains_the_eps_and_the_variance_outputs():
    torch.manual_seed(0)
    model = mar.build(TINY)
    net = model.diffloss.net
    final = net.final_layer
    # past the official zero init (the output layer and every AdaLN linear), as after a first step:
    # then the output's both halves and the conditions the transformer feeds get a gradient
    for zeroed in [b.adaLN_modulation[1] for b in net.res_blocks] + [final.adaLN_modulation[1], final.linear]:
        torch.nn.init.normal_(zeroed.weight, std=0.02)
    tokens = torch.randn(6, TINY.num_tokens, TINY.token_dim)
    classes = torch.tensor([0, 1, 2, 3, 4, TINY.num_classes])  # the last row is the uncond class
    mask = model.training_mask(6, torch.Generator().manual_seed(1))
    loss = mar.training_loss(model, classes, tokens, mask, torch.Generator().manual_seed(2))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grad = final.linear.weight.grad
    c = TINY.token_dim
    assert grad[:c].abs().sum() > 0 and grad[c:].abs().sum() > 0  # eps rows (MSE) and v rows (the bound)
    assert model.encoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it reaches the transformer


def test_training_loss_is_seeded():
    torch.manual_seed(0)
    model = mar.build(TINY)
    tokens = torch.randn(4, TINY.num_tokens, TINY.token_dim)
    classes = torch.arange(4)
    mask = model.training_mask(4, torch.Generator().manual_seed(1))
    a, b = (
        mar.training_loss(model, classes, tokens, mask, torch.Generator().manual_seed(3)) for _ in range(2)
    )
    assert torch.equal(a, b)


def test_latent_rescale_is_exact_and_gives_mar_unit_tokens():
    torch.manual_seed(0)
    vae = AutoencoderKL(ZOO_KL).eval()
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    untouched = vae.encode_latents(images)
    assert abs(float(untouched.std()) * LATENT_SCALE - 1.0) > 0.5  # far from unit tokens before
    before = vae.decode_latents(untouched).float()
    scale = rescale_latents(vae, images)
    latents = vae.encode_latents(images)
    assert float((latents * LATENT_SCALE).std()) == pytest.approx(1.0, rel=1e-4)
    after = vae.decode_latents(latents).float()
    assert (after - before).abs().max() <= 1.0  # the same images up to uint8 rounding
    assert torch.allclose(latents, untouched * scale, rtol=1e-4, atol=1e-6)  # the same latents, scaled


@needs_fashion_mnist
def test_kl_tokenizer_and_mar_stages_train_record_and_reevaluate(tmp_path):
    shutil.copy(CLASSIFIER_WEIGHTS, tmp_path / CLASSIFIER_WEIGHTS.name)
    common = ["--out", str(tmp_path), "--limit", "64", "--eval-per-class", "1", "--batch-size", "32"]
    main(["kl-tokenizer", "mar", "--epochs", "3", "--seconds", "0.001", *common])
    record = json.loads((tmp_path / "training.json").read_text())
    kl, run = record["kl-tokenizer"]["metrics"], record["mar"]["metrics"]
    assert kl["test_token_std"] == pytest.approx(
        1.0, abs=0.05
    )  # the rescale, measured on the stored fp16 file
    assert run["epochs"] == 1  # three planned, one fits in the cap
    assert set(run["cfg_sweep"]) == {"1.0", "2.0", "3.0", "4.0", "6.0"}
    assert (tmp_path / "tiny-mar.safetensors").is_file() and (tmp_path / "kl-zoo.safetensors").is_file()

    main(["mar", "--reevaluate", *common])
    again = json.loads((tmp_path / "training.json").read_text())["mar"]
    assert again["settings"] == record["mar"]["settings"]  # the training record is kept, the sweep re-run
    assert again["metrics"]["cfg_sweep_sampling"]["num_sampling_steps"] == "250"
    assert again["reevaluated"]["eval_per_class"] == 1
    with pytest.raises(SystemExit):
        main(["kl-tokenizer", "--reevaluate", *common])  # not a generator stage: a usage error
