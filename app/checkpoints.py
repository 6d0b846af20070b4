"""Which files POST /v1/models may register: regular files below PTQ4ARVG_CHECKPOINT_ROOTS, resolved
without following a link out of them, that parse as a checkpoint (and fit the base model, when the
engine's registry knows it). Nothing is unpickled: the engine reads with ``weights_only`` and
memory-maps, so a large file costs no memory here.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class Refused(ValueError):
    """Why a file may not be registered (the API answers 422 naming ``checkpoint_path``)."""


@dataclass(frozen=True)
class Registered:
    path: Path  # the resolved path, inside a root
    size: int
    sha256: str


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_file(given: str, roots: list[Path], base_model: str) -> Registered:
    """The resolved file, its size and sha256; Refused otherwise."""
    if not roots:
        raise Refused(
            "checkpoint registration is off on this server: an administrator must list the folders "
            "it may read in PTQ4ARVG_CHECKPOINT_ROOTS",
        )
    path = Path(given)
    if not path.is_absolute():
        raise Refused("give an absolute path on the server")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    allowed = ", ".join(map(str, roots))
    resolved = Path(os.path.realpath(path))
    if not _inside(resolved, real_roots):
        raise Refused(f"'{given}' is not inside the checkpoint folders of this server ({allowed})")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise Refused(f"the server cannot read '{given}': {e.strerror}") from e
    try:
        # what was opened, whatever a link swapped in meanwhile, must still lie inside a root
        opened = Path(os.path.realpath(f"/proc/self/fd/{fd}"))
        info = os.fstat(fd)
        if not _inside(opened, real_roots):
            raise Refused(f"'{given}' is not inside the checkpoint folders of this server ({allowed})")
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"'{given}' is not a regular file")
        _check_parses(opened, base_model)
        with os.fdopen(os.dup(fd), "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if os.fstat(fd).st_mtime_ns != info.st_mtime_ns:
            raise Refused(f"'{given}' changed while it was being read; register it again")
    finally:
        os.close(fd)
    return Registered(opened, info.st_size, digest)


def _check_parses(path: Path, base_model: str) -> None:
    from quantcore.checkpoint import check_state_dict, read_state_dict
    from quantcore.errors import CheckpointError, ConfigError
    from quantcore.registry import get_spec, suggest_fit

    try:
        state = read_state_dict(path, lazy=True)
        try:
            model = get_spec(base_model).build("meta")
        except ConfigError:  # a base model of another engine registry: parsing is all we can check
            return
        check_state_dict(model, state, path.name, suggest=suggest_fit)
    except CheckpointError as e:
        raise Refused(str(e).replace(str(path), path.name)) from e
