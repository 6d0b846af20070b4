"""Image grids and PNG files, with numpy and PIL only (torchvision does not run beside the CPU torch)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image


def to_numpy(images) -> np.ndarray:
    """A torch tensor or array-like as a numpy array (torch itself is not imported here)."""
    return images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)


def make_grid(images, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (B, H, W, 3) into one (rows*H, cols*W, 3) array with `pad` pixels of white."""
    arr = to_numpy(images)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (B, H, W, C), got {arr.dtype} {arr.shape}")
    b, h, w, c = arr.shape
    ncol = ncol or math.ceil(math.sqrt(b))
    nrow = math.ceil(b / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one uint8 (H, W, 3) image as PNG; the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


def compact_png(path: str | Path) -> None:
    """Rewrite a PNG as an adaptive 256-colour one (about half the bytes), for the committed figures and
    grids that only need looking at; idempotent (a palette image is left as it is)."""
    image = Image.open(path)
    if image.mode != "P":
        image.convert("RGB").quantize(256).save(path, format="PNG", optimize=True)
