"""Reference sets for FID/sFID/precision/recall, in the ADM evaluator's `.npz` format.

An ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`, which users supply) holds
  arr_0  uint8 (N, H, W, 3) images,   mu / sigma  pool_3 statistics (2048),   mu_s / sigma_s  sFID (2023).
The files this module writes are such batches plus `pool_features` (N, 2048 float32: the reference
manifold for precision/recall, so it is not recomputed) and `info` (JSON: source, network, count); the
ADM evaluator ignores both. `arr_0` is read and written in batches, never whole, so a 50,000-image
reference needs memory for its features only (8 KiB per image).

Sources for `build_reference`: a folder of images (PNG/JPEG/BMP/WebP, searched recursively, sorted; all
the same size), or an `.npz` whose `arr_0` holds uint8 images. The bundled Fashion-MNIST models default
to the test split (`fashion_mnist_reference`), built once and cached under `PTQ4ARVG_CACHE` (default
~/.cache/ptq4arvg).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from quantcore.checkpoint import file_sha256
from quantcore.errors import ConfigError
from quantcore.eval.frechet import Gaussian
from quantcore.eval.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures
from quantcore.spec import FASHION_MNIST_REFERENCE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST = FASHION_MNIST_REFERENCE
FASHION_MNIST_IMAGES = 10_000
ENV_CACHE = "PTQ4ARVG_CACHE"
READ_BATCH = 256
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
Progress = Callable[[float], None]


class ReferenceError(ConfigError):
    """A reference file or image source that is missing or malformed."""


@dataclass
class Reference:
    """What samples are measured against: pool_3 and sFID statistics, and the pool features for P/R."""

    name: str
    num_images: int
    pool: Gaussian
    spatial: Gaussian | None
    pool_features: torch.Tensor | None
    sha256: str | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "num_images": self.num_images,
            "sfid": self.spatial is not None,
        }


# ---------------------------------------------------------------------------------------------------
# .npz members, read and written in batches
# ---------------------------------------------------------------------------------------------------


def _zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ReferenceError(f"reference {path} not found")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ReferenceError(f"reference {path} is not an .npz file: {exc}") from None


@contextmanager
def _member(archive: zipfile.ZipFile, key: str):
    """(file object positioned at the data, shape, dtype) of `key`.npy inside an npz."""
    try:
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = HEADER_READERS.get(version)
            if read_header is None:
                raise ReferenceError(f"{archive.filename}: {key} has unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject:
                raise ReferenceError(f"{archive.filename}: {key} must be a plain C-order array")
            yield f, shape, dtype
    except ReferenceError:
        raise
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:  # not .npy, corrupt or cut off
        raise ReferenceError(f"{archive.filename}: {key} cannot be read: {exc}") from None


def _keys(archive: zipfile.ZipFile) -> set[str]:
    return {n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")}


def _read(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    with _member(archive, key) as (f, shape, dtype):
        data = f.read()
    count = int(np.prod(shape))
    if len(data) != count * dtype.itemsize:
        raise ReferenceError(f"{archive.filename}: {key} is truncated")
    return np.frombuffer(data, dtype).reshape(shape)


def image_count(archive: zipfile.ZipFile, key: str = "arr_0") -> tuple[int, int, int]:
    """(N, H, W) of uint8 RGB images stored under `key`; a clear error otherwise."""
    with _member(archive, key) as (_, shape, dtype):
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ReferenceError(
                f"{archive.filename}: {key} must hold uint8 images (N, H, W, 3), got {dtype} {shape}"
            )
        return shape[0], shape[1], shape[2]


def read_image_batches(
    archive: zipfile.ZipFile, key: str = "arr_0", batch: int = READ_BATCH
) -> Iterator[np.ndarray]:
    n, h, w = image_count(archive, key)
    size = h * w * 3
    with _member(archive, key) as (f, _, _):
        for start in range(0, n, batch):
            count = min(batch, n - start)
            data = f.read(count * size)
            if len(data) != count * size:
                raise ReferenceError(f"{archive.filename}: {key} is truncated at image {start}")
            yield np.frombuffer(data, np.uint8).reshape(count, h, w, 3)


def _write_array(archive: zipfile.ZipFile, key: str, array: np.ndarray) -> None:
    with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _statistics(archive: zipfile.ZipFile, mean_key: str, cov_key: str, dim: int) -> Gaussian:
    mu, sigma = _read(archive, mean_key), _read(archive, cov_key)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ReferenceError(
            f"{archive.filename}: {mean_key}/{cov_key} have shapes {mu.shape}/{sigma.shape}, "
            f"expected ({dim},)/({dim}, {dim})"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceError(f"{archive.filename}: {mean_key}/{cov_key} hold non-finite values")
    return Gaussian.from_moments(mu.astype(np.float64), sigma.astype(np.float64))


def load_reference(
    path: str | Path,
    features: InceptionFeatures | None = None,
    need_manifold: bool = False,
    progress: Progress | None = None,
) -> Reference:
    """Read an ADM-format reference. Its images go through `features` (batch by batch) when it has no
    statistics, or when precision/recall are wanted (`need_manifold`) and no pool features are stored."""
    path = Path(path)
    with _zip(path) as archive:
        keys = _keys(archive)
        has_stats = {"mu", "sigma"} <= keys
        count = image_count(archive)[0] if "arr_0" in keys else None
        pool = spatial = None
        if has_stats and need_manifold and "pool_features" in keys:
            pool = torch.from_numpy(_read(archive, "pool_features").astype(np.float32))
            if pool.ndim != 2 or pool.shape[1] != POOL_DIM:
                raise ReferenceError(f"{path}: pool_features {tuple(pool.shape)}, expected (N, {POOL_DIM})")
        elif not has_stats or need_manifold:
            if count is None:
                missing = "statistics (mu, sigma)" if not has_stats else "images (arr_0) for precision/recall"
                raise ReferenceError(
                    f"reference {path} has no {missing}; it holds: {', '.join(sorted(keys)) or 'nothing'}"
                )
            if features is None:
                raise ReferenceError(f"reference {path}: reading its images needs the Inception network")
            pool, spatial = _features_of(read_image_batches(archive), count, features, progress)
        if has_stats:
            pool_stats = _statistics(archive, "mu", "sigma", POOL_DIM)
            has_spatial = {"mu_s", "sigma_s"} <= keys
            spatial_stats = _statistics(archive, "mu_s", "sigma_s", SPATIAL_DIM) if has_spatial else None
        else:
            pool_stats, spatial_stats = _gaussians(pool, spatial, path)
    return Reference(
        name=path.name,
        num_images=count if count is not None else (pool.shape[0] if pool is not None else 0),
        pool=pool_stats,
        spatial=spatial_stats,
        pool_features=pool if need_manifold else None,
        sha256=file_sha256(path),
    )


def _gaussians(pool: torch.Tensor, spatial: torch.Tensor, source) -> tuple[Gaussian, Gaussian]:
    if pool.shape[0] < 2:
        raise ReferenceError(
            f"{source}: a reference needs at least 2 images for a covariance, got {pool.shape[0]}"
        )
    return Gaussian.of(pool), Gaussian.of(spatial)


def _features_of(
    batches, total: int, features: InceptionFeatures, progress
) -> tuple[torch.Tensor, torch.Tensor]:
    pool = torch.empty(total, POOL_DIM)
    spatial = torch.empty(total, SPATIAL_DIM)
    done = 0
    for batch in batches:
        p, s = features(torch.from_numpy(np.array(batch, np.uint8)))
        pool[done : done + len(batch)], spatial[done : done + len(batch)] = p.cpu(), s.cpu()
        done += len(batch)
        if progress is not None:
            progress(done / total)
    return pool, spatial


# ---------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------


def _folder_images(folder: Path) -> tuple[list[Path], tuple[int, int]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ReferenceError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files, _open_rgb(files[0]).shape[:2]


def _open_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ReferenceError(f"{path} is not a readable image: {exc}") from None


def _folder_batches(files: list[Path], size: tuple[int, int]) -> Iterator[np.ndarray]:
    for start in range(0, len(files), READ_BATCH):
        batch = []
        for path in files[start : start + READ_BATCH]:
            image = _open_rgb(path)
            if image.shape[:2] != size:
                raise ReferenceError(
                    f"{path} is {image.shape[1]}x{image.shape[0]}, the first image "
                    f"{size[1]}x{size[0]}: a reference's images share one size (arr_0 is one array)"
                )
            batch.append(image)
        yield np.stack(batch)


def image_source(source: str | Path) -> tuple[str, int, tuple[int, int], Callable[[], Iterator[np.ndarray]]]:
    """(name, N, (H, W), a function returning batches) of a folder of images or an .npz's arr_0."""
    source = Path(source)
    if source.is_dir():
        files, size = _folder_images(source)
        return source.name, len(files), size, lambda: _folder_batches(files, size)
    with _zip(source) as archive:
        if "arr_0" not in _keys(archive):
            raise ReferenceError(f"{source} has no arr_0 (uint8 images (N, H, W, 3))")
        n, h, w = image_count(archive)
    return source.name, n, (h, w), lambda: _npz_batches(source)


def _npz_batches(path: Path) -> Iterator[np.ndarray]:
    with _zip(path) as archive:
        yield from read_image_batches(archive)


def build_reference(
    source: str | Path,
    out: str | Path,
    features: InceptionFeatures,
    progress: Progress | None = None,
) -> Reference:
    """Write an ADM-format reference (+ pool features) of a folder or .npz of images to `out`."""
    name, count, size, batches = image_source(source)
    return write_reference(out, name, count, size, batches(), features, progress)


def write_reference(
    out: str | Path,
    name: str,
    count: int,
    size: tuple[int, int],
    batches: Iterator[np.ndarray],
    features: InceptionFeatures,
    progress: Progress | None = None,
) -> Reference:
    """Stream `count` images (batches of uint8 (n, H, W, 3)) into `out` with their statistics."""
    if count < 2:
        raise ReferenceError(f"{name}: a reference needs at least 2 images for a covariance, got {count}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    pool = torch.empty(count, POOL_DIM)
    spatial = torch.empty(count, SPATIAL_DIM)
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (count, *size, 3)}
            np.lib.format.write_array_header_2_0(f, header)
            done = 0
            for batch in batches:
                f.write(np.ascontiguousarray(batch, np.uint8).tobytes())
                p, s = features(torch.from_numpy(np.array(batch, np.uint8)))
                pool[done : done + len(batch)], spatial[done : done + len(batch)] = p.cpu(), s.cpu()
                done += len(batch)
                if progress is not None:
                    progress(done / count)
        if done != count:
            raise ReferenceError(f"{name}: {done} images read, {count} expected")
        pool_stats, spatial_stats = _gaussians(pool, spatial, name)
        for key, value in (
            ("mu", pool_stats.mu),
            ("sigma", pool_stats.sigma),
            ("mu_s", spatial_stats.mu),
            ("sigma_s", spatial_stats.sigma),
        ):
            _write_array(archive, key, value.cpu().numpy())
        _write_array(archive, "pool_features", pool.numpy())
        info = {"source": name, "num_images": count, **features.describe()}
        _write_array(archive, "info", np.array(json.dumps(info)))
    os.replace(partial, out)
    return Reference(name, count, pool_stats, spatial_stats, pool, file_sha256(out))


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "ptq4arvg")


def fashion_mnist_reference(
    features: InceptionFeatures,
    count: int = FASHION_MNIST_IMAGES,
    progress: Progress | None = None,
) -> Reference:
    """The first `count` Fashion-MNIST test images as the bundled models see them (32x32 RGB), built
    once per Inception weights file and cached."""
    from quantcore.zoo.data import load_fashion_mnist, to_rgb32

    if not 2 <= count <= FASHION_MNIST_IMAGES:
        raise ReferenceError(
            f"the Fashion-MNIST reference takes 2..{FASHION_MNIST_IMAGES} images, got {count}"
        )
    path = cache_dir() / "references" / f"{FASHION_MNIST}-{count}-{features.sha256[:12]}.npz"
    if not path.is_file():
        images = to_rgb32(load_fashion_mnist("test")[0][:count])
        batches = (images[i : i + READ_BATCH] for i in range(0, count, READ_BATCH))
        write_reference(path, FASHION_MNIST, count, images.shape[1:3], batches, features, progress)
    reference = load_reference(path, need_manifold=True)
    reference.name = FASHION_MNIST if count == FASHION_MNIST_IMAGES else f"{FASHION_MNIST}[:{count}]"
    return reference


def read_info(path: str | Path) -> dict:
    """The `info` record of a reference this module wrote ({} for other ADM files)."""
    with _zip(Path(path)) as archive:
        if "info" not in _keys(archive):
            return {}
        return json.loads(np.load(io.BytesIO(archive.read("info.npy")), allow_pickle=False).item())
