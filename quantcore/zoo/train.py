"""Train the bundled models on Fashion-MNIST.

    python -m quantcore.zoo.train STAGE [STAGE ...] --out quantcore/zoo/weights \
        [--device cuda] [--epochs N] [--limit N]

STAGE: classifier, tokenizer, llamagen, par, var-tokenizer, var, rar-tokenizer, rar, tokenizer-16,
deep-llamagen, deep-var, kl-tokenizer, mar, or all. Stages read what earlier stages wrote to --out: a
tokenizer is evaluated with the classifier, and each generator trains on its tokenizer's tokens (llamagen
and par on `tokenizer`'s, var and deep-var on `var-tokenizer`'s, rar on `rar-tokenizer`'s, deep-llamagen
on `tokenizer-16`'s, mar on `kl-tokenizer`'s latents) and is evaluated with both. Stages run in the order given; `all` runs every
stage in the order above. Every stage is seeded, stores fp16 safetensors, evaluates the stored
(fp16-rounded) weights, and merges its settings, time, device and metrics into --out/training.json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from quantcore.checkpoint import load_checkpoint
from quantcore.eval.proxy import proxy_features, proxy_metrics
from quantcore.fastgen import generate_tokens
from quantcore.models import bind_tokenizer, family
from quantcore.models.mar import LATENT_SCALE
from quantcore.tokenizers.kl16 import AutoencoderKL
from quantcore.tokenizers.maskgit_vqgan import MaskGITVQGAN
from quantcore.tokenizers.var_vqvae import VQVAE
from quantcore.tokenizers.vq16 import VQModel
from quantcore.zoo import (
    BUNDLED_CONFIGS,
    FAMILIES,
    SAMPLING,
    ZOO_KL_NAME,
    ZOO_MASKGIT_NAME,
    ZOO_TOKENIZERS,
    ZOO_VAR_VQ_NAME,
    ZOO_VQ16_NAME,
    ZOO_VQ_NAME,
    generation_order,
    load_classifier,
    load_zoo_tokenizer,
)
from quantcore.zoo.classifier import ProxyClassifier
from quantcore.zoo.data import load_fashion_mnist, to_rgb32

STAGES = (
    "classifier",
    "tokenizer",
    "llamagen",
    "par",
    "var-tokenizer",
    "var",
    "rar-tokenizer",
    "rar",
    "tokenizer-16",
    "deep-llamagen",
    "deep-var",
    "kl-tokenizer",
    "mar",
)
GENERATORS = {
    "llamagen": "tiny-llamagen",
    "par": "tiny-par",
    "var": "tiny-var",
    "rar": "tiny-rar",
    "deep-llamagen": "deep-llamagen",
    "deep-var": "deep-var",
    "mar": "tiny-mar",
}
# Per-stage defaults: epochs, batch size, peak learning rate; generators also weight_decay (0.05), clip (1.0)
# and seconds (no cap) where they differ.
DEFAULTS = {
    "classifier": dict(epochs=15, batch_size=256, lr=2e-3),
    "tokenizer": dict(epochs=10, batch_size=256, lr=1e-3),
    "llamagen": dict(epochs=12, batch_size=512, lr=1.5e-3),
    "par": dict(epochs=12, batch_size=512, lr=1.5e-3),
    # Smaller than VQ-zoo: 8 epochs keep a tokenizer and its generator inside one ~5-minute GPU run.
    "var-tokenizer": dict(epochs=8, batch_size=256, lr=1e-3),
    "var": dict(epochs=15, batch_size=512, lr=1.5e-3),
    "rar-tokenizer": dict(epochs=8, batch_size=256, lr=1e-3),
    "rar": dict(epochs=15, batch_size=512, lr=1.5e-3),
    "tokenizer-16": dict(epochs=8, batch_size=256, lr=1e-3),
    # The deep models: a lower peak than the 4-layer ones, so that twice the depth trains stably.
    "deep-llamagen": dict(epochs=12, batch_size=512, lr=1e-3),
    "deep-var": dict(epochs=15, batch_size=512, lr=1e-3),
    "kl-tokenizer": dict(epochs=8, batch_size=256, lr=1e-3),
    # MAR's official AdamW (betas 0.9/0.95, wd 0.02, clip 3) at a higher peak for the short run; `seconds`
    # caps the run (fewer epochs, the cosine schedule fitted to them) so it fits one device call
    "mar": dict(epochs=40, batch_size=512, lr=1e-3, weight_decay=0.02, clip=3.0, seconds=300),
}
CLASS_DROPOUT = 0.1  # share of labels replaced by the null class, so the model also learns p(x) for CFG
# CFG scales swept per family. LlamaGen guides every token with weight cfg; VAR ramps the weight
# linearly to 1 + cfg at the last scale, RAR (cosine, exponent 1) from 1 to cfg: wider sweeps.
CFG_SWEEPS = {
    "llamagen": (1.0, 2.0, 3.0, 4.0),
    "var": (0.5, 1.0, 2.0, 3.0, 4.0),
    "rar": (1.0, 2.0, 3.0, 4.0, 6.0),
    "mar": (1.0, 2.0, 3.0, 4.0, 6.0),  # MAR's linear ramp: 1 at the first round, cfg at the last
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------


class Data:
    """Both splits as uint8 (N, 32, 32, 3) on the training device, with int64 labels."""

    def __init__(self, device: torch.device, root: str | None, limit: int | None):
        self.train, self.train_labels = self._split("train", device, root, limit)
        self.test, self.test_labels = self._split("test", device, root, limit)

    @staticmethod
    def _split(split, device, root, limit):
        images, labels = load_fashion_mnist(split, root)
        images, labels = to_rgb32(images[:limit]), labels[:limit].astype(np.int64)
        return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VQ's and classifier's input scaling."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the float batch (B, 3, H, W): garments are near-symmetric left to right."""
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Shuffled index batches of one epoch; the last partial batch is dropped."""
    order = torch.randperm(n, generator=gen, device=gen.device)
    for i in range(n // batch_size):
        yield order[i * batch_size : (i + 1) * batch_size]


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # decays to 10% of the peak


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def save_fp16(model: nn.Module, path: Path) -> None:
    """Store floating-point tensors as fp16 (half the bytes; the evaluation below runs on these)."""
    sd = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def record(out: Path, stage: str, entry: dict) -> None:
    """Merge one stage's record into out/training.json, under a lock: two generator stages may run at once."""
    with open(out / "training.json", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        data = json.loads(text) if text else {}
        data[stage] = entry
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------


def train_classifier(data: Data, out: Path, hp: dict, seed: int) -> dict:
    device = data.train.device
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    model = ProxyClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=5e-4)
    steps_per_epoch = data.train.shape[0] // hp["batch_size"]
    total, step = hp["epochs"] * steps_per_epoch, 0
    for epoch in range(hp["epochs"]):
        model.train()
        loss_sum = 0.0
        for idx in batches(data.train.shape[0], hp["batch_size"], gen):
            x = random_flip(to_float(data.train[idx]), gen)
            # A random shift of up to 2 px (the same for the whole batch): the padding makes room for it.
            dy, dx = torch.randint(-2, 3, (2,), generator=gen, device=device).tolist()
            x = torch.roll(x, (dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), data.train_labels[idx], label_smoothing=0.1)
            set_lr(opt, cosine_lr(step, total, hp["lr"], warmup=200))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        log(f"classifier epoch {epoch + 1}/{hp['epochs']} loss {loss_sum / steps_per_epoch:.4f}")
    save_fp16(model, out / "proxy-classifier.safetensors")
    stored = load_classifier(out / "proxy-classifier.safetensors", device)
    _, probs = proxy_features(stored, data.test)
    accuracy = float((probs.argmax(1) == data.test_labels.cpu().numpy()).mean())
    log(f"classifier test accuracy {accuracy:.4f}")
    return {"final_train_loss": loss_sum / steps_per_epoch, "test_accuracy": accuracy}


def vq_losses(vq: VQModel, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """LlamaGen's VQ objective without the GAN and perceptual terms: MSE reconstruction, codebook loss
    (codes move to the encoder outputs), commitment loss (beta 0.25; encoder outputs stay near their
    codes), a straight-through estimator past the lookup, and cosine matching on l2-normalised vectors.
    With `amp` the convolutions run in bf16; the code lookup and the losses stay in fp32.
    """
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        h = vq.encoder(x)
    z = F.normalize(vq.quant_conv(h.float()), dim=1)
    codes, ids = vq.quantize(z)  # unit-norm codes; their gradient reaches the codebook
    codebook_loss = F.mse_loss(codes, z.detach())
    commit_loss = F.mse_loss(z, codes.detach())
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        recon = vq.decode_codes(z + (codes - z).detach())  # straight-through: decoder gradient reaches z
    recon_loss = F.mse_loss(recon.float(), x)
    loss = recon_loss + codebook_loss + 0.25 * commit_loss
    parts = {"recon": recon_loss.item(), "codebook": codebook_loss.item(), "commit": commit_loss.item()}
    return loss, parts, ids


def vq_latents(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """The (N, D) vectors a zoo VQ's code lookup sees for images x."""
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def residual_quantize(vq: VQVAE, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """VAR's multi-scale residual quantization of latents f (B, C, h, w) as its training runs it
    (official `VectorQuantizer2.forward`): the f_hat after every scale (differentiable in the codes and
    the phi convs), the tokens (B, L), and the residual vectors each scale looked up (B * L, C)."""
    q = vq.quantize
    b, c = f.shape[:2]
    codes = q.embedding.weight
    rest, f_hat = f.detach(), torch.zeros_like(f)
    f_hats, ids, vectors = [], [], []
    last = len(q.patch_nums) - 1
    for si, pn in enumerate(q.patch_nums):
        z = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, c)
        with torch.no_grad():
            idx = torch.cdist(z, codes.detach()).argmin(1)
        h = q._upsampled(q.embedding(idx).view(b, pn, pn, c).permute(0, 3, 1, 2), si)  # phi(upsampled codes)
        f_hat = f_hat + h
        rest = rest - h.detach()
        f_hats.append(f_hat)
        ids.append(idx.view(b, pn * pn))
        vectors.append(z)
    return f_hats, torch.cat(ids, dim=1), torch.cat(vectors)


def var_vq_losses(vq: VQVAE, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """VAR's VQ-VAE objective without the GAN and perceptual terms: MSE reconstruction of the
    straight-through f_hat, and codebook + 0.25 commitment losses averaged over the f_hat after every
    scale (official), so that each coarse prefix of the token pyramid already approximates the latent."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        h = vq.encoder(x)
    f = vq.quant_conv(h.float())
    f_hats, ids, _ = residual_quantize(vq, f)
    codebook_loss = sum(F.mse_loss(f_hat, f.detach()) for f_hat in f_hats) / len(f_hats)
    commit_loss = sum(F.mse_loss(f, f_hat.detach()) for f_hat in f_hats) / len(f_hats)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        recon = vq.decoder(vq.post_quant_conv(f + (f_hats[-1] - f).detach()))  # straight-through
    recon_loss = F.mse_loss(recon.float(), x)
    loss = recon_loss + codebook_loss + 0.25 * commit_loss
    parts = {"recon": recon_loss.item(), "codebook": codebook_loss.item(), "commit": commit_loss.item()}
    return loss, parts, ids


def var_vq_latents(vq: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """The residuals of every scale: a restarted code lands where some scale needs one."""
    return residual_quantize(vq, vq.quant_conv(vq.encoder(x)))[2]


def maskgit_losses(vq: MaskGITVQGAN, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The MaskGIT VQGAN objective without the GAN and perceptual terms: MSE reconstruction, codebook
    and 0.25 commitment losses, straight-through past the plain-L2 lookup. The model reads and writes
    [0, 1]; the reconstruction loss is taken on the [-1, 1] scale like the other tokenizers'."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        z = vq.encoder((x + 1) / 2).float()
    with torch.no_grad():
        ids = vq.quantize(z)
    codes = vq.quantize.lookup(ids.view(z.shape[0], *z.shape[2:]))
    codebook_loss = F.mse_loss(codes, z.detach())
    commit_loss = F.mse_loss(z, codes.detach())
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        recon = vq.decoder(z + (codes - z).detach())
    recon_loss = F.mse_loss(recon.float() * 2 - 1, x)
    loss = recon_loss + codebook_loss + 0.25 * commit_loss
    parts = {"recon": recon_loss.item(), "codebook": codebook_loss.item(), "commit": commit_loss.item()}
    return loss, parts, ids


def maskgit_latents(vq: MaskGITVQGAN, x: torch.Tensor) -> torch.Tensor:
    z = vq.encoder((x + 1) / 2)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


class TokenizerStage(NamedTuple):
    name: str  # a key of quantcore.zoo.ZOO_TOKENIZERS: config, class and file name
    losses: Callable  # (model, x in [-1, 1], amp) -> (loss, loss parts, token ids)
    latents: Callable  # (model, x) -> the (N, D) vectors the code lookup sees, for dead-code restarts


TOKENIZER_STAGES = {
    "tokenizer": TokenizerStage(ZOO_VQ_NAME, vq_losses, vq_latents),
    "tokenizer-16": TokenizerStage(ZOO_VQ16_NAME, vq_losses, vq_latents),
    "var-tokenizer": TokenizerStage(ZOO_VAR_VQ_NAME, var_vq_losses, var_vq_latents),
    "rar-tokenizer": TokenizerStage(ZOO_MASKGIT_NAME, maskgit_losses, maskgit_latents),
}


@torch.no_grad()
def restart_dead_codes(
    vq: nn.Module, used: torch.Tensor, x: torch.Tensor, gen: torch.Generator, latents: Callable
) -> int:
    """Move codes that no vector picked this epoch onto random latents of images x, so the whole
    codebook stays in use (a common VQ-VAE remedy; LlamaGen relies on a large codebook instead)."""
    dead = (~used).nonzero().squeeze(1)
    if dead.numel():
        z = latents(vq, x)
        pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=gen, device=gen.device)
        vq.quantize.embedding.weight[dead] = z[pick]
    return int(dead.numel())


def train_tokenizer(data: Data, out: Path, hp: dict, seed: int, stage: TokenizerStage) -> dict:
    device = data.train.device
    config, model_class, weights = ZOO_TOKENIZERS[stage.name]
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    vq = model_class(config).to(device)
    codebook_size = vq.quantize.embedding.num_embeddings
    opt = torch.optim.AdamW(vq.parameters(), lr=hp["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = data.train.shape[0] // hp["batch_size"]
    total, step = hp["epochs"] * steps_per_epoch, 0
    for epoch in range(hp["epochs"]):
        vq.train()
        used = torch.zeros(codebook_size, dtype=torch.bool, device=device)
        sums = {"recon": 0.0, "codebook": 0.0, "commit": 0.0}
        for idx in batches(data.train.shape[0], hp["batch_size"], gen):
            x = random_flip(to_float(data.train[idx]), gen)
            loss, parts, ids = stage.losses(vq, x, amp=device.type == "cuda")
            set_lr(opt, cosine_lr(step, total, hp["lr"], warmup=200))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            used[ids.flatten()] = True
            sums = {k: sums[k] + parts[k] for k in sums}
            step += 1
        usage = float(used.float().mean())
        settling = epoch >= hp["epochs"] - 2  # no restarts in the last two epochs
        restarted = 0 if settling else restart_dead_codes(vq, used, x, gen, stage.latents)
        means = " ".join(f"{k} {v / steps_per_epoch:.4f}" for k, v in sums.items())
        log(f"{stage.name} epoch {epoch + 1}/{hp['epochs']} {means} usage {usage:.3f} restarted {restarted}")
    path = out / weights.name
    save_fp16(vq, path)

    stored = load_zoo_tokenizer(path, stage.name, device)
    tokens = torch.cat([stored.encode_to_tokens(part) for part in data.test.split(1000)])
    recon = torch.cat([stored.decode_tokens(t) for t in tokens.split(1000)])
    metrics = {
        "final_train_recon_mse": sums["recon"] / steps_per_epoch,
        **reconstruction_metrics(data, out, recon),
        "test_codebook_usage": float(torch.unique(tokens).numel() / codebook_size),
    }
    log(f"{stage.name} metrics {metrics}")
    return metrics


def reconstruction_metrics(data: Data, out: Path, recon: torch.Tensor) -> dict:
    """A tokenizer's uint8 reconstructions of the test split against it: MSE and PSNR on the [-1, 1]
    scale, and the proxy classifier's accuracy on them where out/ holds the classifier."""
    mse = float(((recon.float() - data.test.float()) / 127.5).pow(2).mean())
    metrics = {"test_recon_mse": mse, "test_psnr_db": 10 * math.log10(4.0 / mse)}  # [-1, 1] spans 2
    if (out / "proxy-classifier.safetensors").is_file():
        classifier = load_classifier(out / "proxy-classifier.safetensors", data.test.device)
        _, probs = proxy_features(classifier, recon)
        metrics["proxy_accuracy_on_reconstructions"] = float(
            (probs.argmax(1) == data.test_labels.cpu().numpy()).mean()
        )
    return metrics


KL_WEIGHT = 1e-6  # LDM's KL weight against the summed reconstruction error (MAR's KL-16 recipe)


def kl_losses(
    vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator, amp: bool
) -> tuple[torch.Tensor, dict]:
    """LDM's AutoencoderKL objective without the GAN and perceptual terms: MSE reconstruction of a
    posterior sample (reparameterised) plus KL_WEIGHT times the KL to N(0, I), both summed per image."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        h = vae.encoder(x)
    mean, logvar = vae.quant_conv(h.float()).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen, device=x.device)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        recon = vae.decoder(vae.post_quant_conv(z))
    recon_loss = F.mse_loss(recon.float(), x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / x.shape[0]
    loss = recon_loss + KL_WEIGHT * kl / x[0].numel()  # the summed objective, divided by pixels per image
    return loss, {"recon": recon_loss.item(), "kl": kl.item()}


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Scale the latent space so that MAR's 0.2325 gives unit-variance tokens, as it does KL-16's: the
    posterior mean and std times s in quant_conv, post_quant_conv's input weights divided by s (an exact
    reparameterisation: decoded images do not change). Returns s."""
    std = float(torch.cat([vae.encode_latents(part) for part in images.split(1000)]).std())
    s = 1.0 / (LATENT_SCALE * std)
    e = vae.config.embed_dim
    vae.quant_conv.weight[:e] *= s
    vae.quant_conv.bias[:e] *= s
    vae.quant_conv.bias[e:] += 2.0 * math.log(s)  # log-variance
    vae.post_quant_conv.weight /= s
    return s


def train_kl_tokenizer(data: Data, out: Path, hp: dict, seed: int) -> dict:
    device = data.train.device
    config, model_class, weights = ZOO_TOKENIZERS[ZOO_KL_NAME]
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    vae = model_class(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=hp["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = data.train.shape[0] // hp["batch_size"]
    total, step = hp["epochs"] * steps_per_epoch, 0
    for epoch in range(hp["epochs"]):
        vae.train()
        sums = {"recon": 0.0, "kl": 0.0}
        for idx in batches(data.train.shape[0], hp["batch_size"], gen):
            x = random_flip(to_float(data.train[idx]), gen)
            loss, parts = kl_losses(vae, x, gen, amp=device.type == "cuda")
            set_lr(opt, cosine_lr(step, total, hp["lr"], warmup=200))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums = {k: sums[k] + parts[k] for k in sums}
            step += 1
        means = " ".join(f"{k} {v / steps_per_epoch:.4f}" for k, v in sums.items())
        log(f"{ZOO_KL_NAME} epoch {epoch + 1}/{hp['epochs']} {means}")
    vae.eval()
    scale = rescale_latents(vae, data.train)
    path = out / weights.name
    save_fp16(vae, path)

    stored = load_zoo_tokenizer(path, ZOO_KL_NAME, device)
    latents = torch.cat([stored.encode_latents(part) for part in data.test.split(1000)])
    recon = torch.cat([stored.decode_latents(part) for part in latents.split(1000)])
    metrics = {
        "final_train_recon_mse": sums["recon"] / steps_per_epoch,
        **reconstruction_metrics(data, out, recon),
        "latent_rescale": scale,
        "test_token_std": float(latents.std() * LATENT_SCALE),  # MAR's tokens: ~1 by the rescale
    }
    log(f"{ZOO_KL_NAME} metrics {metrics}")
    return metrics


@torch.no_grad()
def tokenize(model: nn.Module, vq: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> `model`'s tokens (N, L) in the tokenizer's order (raster; VAR: scale by
    scale), or MAR's latents (N, L, C)."""
    encode = family(model.family).encode_images
    return torch.cat([encode(model, vq, part) for part in images.split(batch_size)])


HEADS = {"llamagen": "output", "var": "head", "rar": "lm_head"}


def init_generator(model: nn.Module) -> None:
    """LlamaGen's initialisation, for every family: N(0, 0.02) for linears and embeddings, zero biases,
    a zero output head. RAR's learned tables, zeros in its constructor, get N(0, 0.02) as in the
    official RAR; VAR keeps the position tables its constructor draws."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    if model.family == "rar":
        for table in (
            model.cls_token,
            model.pos_embed,
            model.target_aware_pos_embed,
            model.timesteps_embeddings,
        ):
            nn.init.trunc_normal_(table, std=0.02)
    nn.init.zeros_(getattr(model, HEADS[model.family]).weight)


@torch.no_grad()
def sequence_loss(
    model: nn.Module, classes: torch.Tensor, tokens: torch.Tensor, batch_size: int = 500
) -> float:
    """Mean teacher-forced cross-entropy (nats per token) of sequences in generation order; for a family
    with its own held-out loss (MAR's diffusion loss), that loss, seeded, per sequence."""
    held_out = family(model.family).teacher_forced_loss
    total = 0.0
    for c, t in zip(classes.split(batch_size), tokens.split(batch_size), strict=True):
        if held_out is not None:
            total += float(held_out(model, c, t, torch.Generator().manual_seed(0)).sum())
            continue
        logits = model.sequence_logits(c, t)
        total += float(F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum"))
    return total / (tokens.shape[0] if held_out is not None else tokens.numel())


def step_loss(model: nn.Module, objective, classes: torch.Tensor, tokens: torch.Tensor, gens) -> torch.Tensor:
    """One batch's training loss: next-token (next-scale) cross-entropy, or the family's own
    `objective` (MAR: a training mask from the CPU generator, the diffusion draws from the device one)."""
    if objective is not None:
        mask_gen, gen = gens
        return objective(model, classes, tokens, model.training_mask(tokens.shape[0], mask_gen), gen)
    logits = model.sequence_logits(classes, tokens)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())


def train_generator(data: Data, out: Path, hp: dict, seed: int, name: str, per_class: int) -> dict:
    """Teacher-forced next-token (VAR: next-scale) training of a bundled generator, in its generation
    order (RAR: raster only; the official RAR anneals from random permutations to raster, but our
    sampler decodes in raster order); MAR with its masked diffusion objective on the posterior means.
    With hp["seconds"], the epochs that fit in it at the first epoch's pace (the schedule refitted)."""
    device = data.train.device
    config, descriptor = BUNDLED_CONFIGS[name], family(FAMILIES[name])
    vq = trained_tokenizer(out, name, device)
    vq.requires_grad_(False)  # VAR's teacher-forced inputs run through its (frozen) quantizer
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    model = descriptor.build(config).to(device)
    if descriptor.name != "mar":  # MAR keeps its official initialisation (build)
        init_generator(model)
    bind_tokenizer(model, vq)
    mask_gen = torch.Generator().manual_seed(seed)
    # Training set: every image and its mirror image, tokenized once, in generation order.
    flipped = data.train.flip(2)
    train_tokens = torch.cat([tokenize(model, vq, data.train), tokenize(model, vq, flipped)])
    train_tokens = generation_order(model, train_tokens)
    train_labels = torch.cat([data.train_labels, data.train_labels])
    test_tokens = generation_order(model, tokenize(model, vq, data.test))
    log(f"{name}: {train_tokens.shape[0]} training sequences of {train_tokens.shape[1]} tokens")

    # Weight decay on the linears' weights only (embeddings, position tables and biases are exempt).
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay = [p for p in model.parameters() if id(p) in linear]
    rest = [p for p in model.parameters() if id(p) not in linear]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": hp.get("weight_decay", 0.05)},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=hp["lr"],
        betas=(0.9, 0.95),
    )
    amp = device.type == "cuda"  # bf16 autocast on the GPU; plain fp32 on CPU
    steps_per_epoch = train_tokens.shape[0] // hp["batch_size"]
    epochs = hp["epochs"]
    total, step = epochs * steps_per_epoch, 0
    start = time.time()
    epoch = 0
    while epoch < epochs:
        model.train()
        loss_sum = 0.0
        for idx in batches(train_tokens.shape[0], hp["batch_size"], gen):
            tokens, classes = train_tokens[idx], train_labels[idx]
            drop = torch.rand(classes.shape[0], generator=gen, device=device) < CLASS_DROPOUT
            classes = torch.where(drop, model.null_class, classes)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = step_loss(model, descriptor.training_loss, classes, tokens, (mask_gen, gen))
            set_lr(opt, cosine_lr(step, total, hp["lr"], warmup=500))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.get("clip", 1.0))
            opt.step()
            loss_sum += loss.item()
            step += 1
        model.eval()
        test_loss = sequence_loss(model, data.test_labels, test_tokens)
        rate = step / (time.time() - start)
        epoch += 1
        if epoch == 1 and hp.get("seconds"):
            fit = max(1, int(hp["seconds"] / (time.time() - start)))
            if fit < epochs:
                epochs, total = fit, fit * steps_per_epoch
                log(f"{name}: {epochs} epochs fit in {hp['seconds']} s; cosine schedule refitted to them")
        log(
            f"{name} epoch {epoch}/{epochs} train {loss_sum / steps_per_epoch:.4f} "
            f"test {test_loss:.4f} ({rate:.1f} steps/s)"
        )
    path = out / f"{name}.safetensors"
    save_fp16(model, path)

    stored = stored_generator(out, name, vq)  # fp16 storage, fp32 compute
    metrics = {
        "epochs": epochs,
        "final_train_loss": loss_sum / steps_per_epoch,
        "test_loss": sequence_loss(stored, data.test_labels, test_tokens),
        "cfg_sweep": evaluate_generator(stored, vq, data, out, per_class, SAMPLING[name]),
    }
    log(f"{name} metrics {json.dumps(metrics)}")
    return metrics


def trained_tokenizer(out: Path, name: str, device: torch.device) -> nn.Module:
    """The tokenizer a bundled generator trains on, as an earlier stage wrote it to out/."""
    tokenizer = BUNDLED_CONFIGS[name].tokenizer
    return load_zoo_tokenizer(out / ZOO_TOKENIZERS[tokenizer][2].name, tokenizer, device)


def stored_generator(out: Path, name: str, vq: nn.Module) -> nn.Module:
    """A bundled generator from its stored (fp16) weights in out/, on vq's device, bound to vq."""
    model = family(FAMILIES[name]).build(BUNDLED_CONFIGS[name])
    model = load_checkpoint(model, out / f"{name}.safetensors").to(next(vq.parameters()).device).eval()
    bind_tokenizer(model, vq)
    return model


def reevaluate_generator(data: Data, out: Path, name: str, per_class: int) -> dict:
    """The CFG sweep of a stored generator under today's sampling defaults (after a change to them),
    without training: what `--reevaluate` merges into the stage's metrics."""
    vq = trained_tokenizer(out, name, data.train.device)
    stored = stored_generator(out, name, vq)
    sweep = evaluate_generator(stored, vq, data, out, per_class, SAMPLING[name])
    return {"cfg_sweep": sweep, "cfg_sweep_sampling": SAMPLING[name].to_dict()}


@torch.no_grad()
def evaluate_generator(
    model: nn.Module, vq: nn.Module, data: Data, out: Path, per_class: int, sampling
) -> dict:
    """Proxy metrics of `per_class` images per class at each CFG scale of the family's sweep (seed =
    1000c + i), the other sampling settings from `sampling` (the bundled model's defaults)."""
    device = data.train.device
    descriptor = family(model.family)
    classifier = load_classifier(out / "proxy-classifier.safetensors", device)
    test_features, _ = proxy_features(classifier, data.test)
    labels = torch.arange(10, device=device).repeat_interleave(per_class)
    seeds = [1000 * int(c) + i % per_class for i, c in enumerate(labels.tolist())]
    sweep = {}
    for scale in CFG_SWEEPS[model.family]:
        settings = {**sampling.to_dict(), "cfg_scale": scale}
        images = []
        for c, s in zip(
            labels.split(500), [seeds[i : i + 500] for i in range(0, len(seeds), 500)], strict=True
        ):
            tokens = generate_tokens(model, c, s, **settings)
            images.append(descriptor.decode_images(model, vq, tokens))
        images = torch.cat(images)
        sweep[str(scale)] = proxy_metrics(classifier, images, labels.cpu().numpy(), test_features)
        log(f"  cfg {scale}: {sweep[str(scale)]}")
    return sweep


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


@torch.enable_grad()  # training, whatever grad mode an in-process caller left on
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m quantcore.zoo.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("stages", nargs="+", choices=(*STAGES, "all"), metavar="STAGE")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--epochs", type=int, default=None, help="override every run stage's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override every run stage's batch size")
    parser.add_argument(
        "--seconds", type=float, default=None, help="cap every generator stage's training time"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images per split")
    parser.add_argument("--eval-per-class", type=int, default=100, help="generated images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="generator stages: no training, re-run the CFG sweep of the stored weights and merge it in",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False  # seeded runs; GPU kernels still need not be bitwise repeatable
    args.out.mkdir(parents=True, exist_ok=True)
    data = Data(device, args.data, args.limit)
    log(f"data: train {tuple(data.train.shape)}, test {tuple(data.test.shape)} on {device_name(device)}")
    for stage in STAGES if "all" in args.stages else args.stages:
        hp = dict(DEFAULTS[stage])
        if args.epochs is not None:
            hp["epochs"] = args.epochs
        if args.batch_size is not None:
            hp["batch_size"] = args.batch_size
        if args.seconds is not None:
            hp["seconds"] = args.seconds
        start = time.time()
        if args.reevaluate:
            if stage not in GENERATORS:
                parser.error(
                    f"--reevaluate applies to generator stages ({', '.join(GENERATORS)}), not {stage!r}"
                )
            entry = json.loads((args.out / "training.json").read_text())[stage]
            entry["metrics"].update(
                reevaluate_generator(data, args.out, GENERATORS[stage], args.eval_per_class)
            )
            entry["reevaluated"] = {
                "seconds": round(time.time() - start, 1),
                "device": device_name(device),
                "eval_per_class": args.eval_per_class,
            }
            record(args.out, stage, entry)
            continue
        if stage == "classifier":
            metrics = train_classifier(data, args.out, hp, args.seed)
        elif stage == "kl-tokenizer":
            metrics = train_kl_tokenizer(data, args.out, hp, args.seed)
        elif stage in TOKENIZER_STAGES:
            metrics = train_tokenizer(data, args.out, hp, args.seed, TOKENIZER_STAGES[stage])
        else:
            metrics = train_generator(data, args.out, hp, args.seed, GENERATORS[stage], args.eval_per_class)
        seconds = time.time() - start
        log(f"{stage} done in {seconds:.0f} s")
        record(
            args.out,
            stage,
            {
                "settings": {
                    **hp,
                    "seed": args.seed,
                    "limit": args.limit,
                    "eval_per_class": args.eval_per_class,
                },
                "seconds": round(seconds, 1),
                "device": device_name(device),
                "torch": torch.__version__,
                "metrics": metrics,
            },
        )


if __name__ == "__main__":
    main()
