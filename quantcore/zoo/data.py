"""Fashion-MNIST, read from the IDX files that the Debian package `dataset-fashion-mnist` installs.

Images are uint8 (N, 28, 28) with labels uint8 (N,); `to_rgb32` makes them the (N, 32, 32, 3) uint8
images that the bundled tokenizer, generators and proxy classifier work on: zero-padded (the
background is already black) and replicated to three channels.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from quantcore.errors import ConfigError, DatasetError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "FASHION_MNIST_DIR"  # overrides DEFAULT_DIR, e.g. for a copy on a machine without the package
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SIZE = 32


def data_dir(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def read_idx(path: Path) -> np.ndarray:
    """One gzipped IDX file (unsigned-byte data only, as Fashion-MNIST uses) as an array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable gzip file: {exc}") from exc
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dims, then each dim as
    # a big-endian int32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(shape)):
        raise DatasetError(f"{path} holds {len(raw) - start} data bytes, its header says shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the "train" (60k) or "test" (10k) split."""
    if split not in FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = data_dir(root)
    paths = [folder / name for name in FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST files {missing} not found in {folder}. They come from the Debian package "
            f"dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`), or point {ENV_DIR} at a "
            "folder holding the four IDX .gz files"
        )
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DatasetError(f"{paths[1]} has label {int(labels.max())}; Fashion-MNIST has {len(CLASSES)}")
    return images, labels


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, 32, 32, 3): pad 2 pixels of black each side, gray in every channel."""
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.ascontiguousarray(np.repeat(padded[..., None], 3, axis=-1))
