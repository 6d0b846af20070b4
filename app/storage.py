"""The artifact folder: safe file names, paths of artifact files, hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path


class UnsafeName(ValueError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_file_name(name: str) -> str:
    """Reject anything that is not one plain file name (no separators, no '..', no hidden files)."""
    if (
        not name
        or len(name) > 255
        or ".." in name
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
    ):
        raise UnsafeName(f"'{name}' is not a plain file name")
    return name


def artifact_file(root: Path, artifact_path: str, name: str) -> Path:
    """The path of one file of an artifact, checked to lie inside the artifact's folder."""
    check_file_name(name)
    folder = (Path(root) / artifact_path).resolve()
    target = (folder / name).resolve()
    if target.parent != folder:
        raise UnsafeName(f"'{name}' resolves outside the artifact")
    return target
