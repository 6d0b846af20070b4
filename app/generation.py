"""Image generation for POST /v1/generate: one device thread, a bounded queue, generators kept under a
byte budget, and every file verified against the hashes recorded in the database before it is served.

- Requests wait on asyncio futures, never in the HTTP thread pool, so a busy device cannot starve
  other routes (health answers in milliseconds whatever the generate load). At most
  ``max_generate_queue`` requests wait; more get 503 with Retry-After.
- Requests of the same source and sampling settings that wait together are served in one batch. The
  engine seeds every image with its own generator, so an image's bytes depend on its class and seed
  only, never on the batch it was served in.
- Loaded generators are kept in LRU order while their weights fit in ``generator_memory_bytes``; a
  source whose estimate (or, once loaded, real size) exceeds the budget is refused with 503.
- Before a load the files are hashed and compared with the database (artifact files, a registered
  checkpoint); a cached generator is served only while its files' stat fingerprints are unchanged,
  otherwise they are verified again.

The engine is imported on first use (never at import time of this module).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import importlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.storage import sha256_file
from quantcore.images import to_numpy

log = logging.getLogger(__name__)

FP32_BYTES = 4  # generators hold float32 weights: the estimate before loading is parameters x 4


class Refused(Exception):
    """A request the service will not serve now: an HTTP status, a message saying why, headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass(frozen=True)
class RecordedFile:
    """A file with the size and sha256 the database recorded for it."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    key: str  # cache key: the same key, the same files and weights
    label: str  # what the caller named (model name or artifact id)
    engine_source: str  # what load_generator takes: a model name or an artifact folder
    checkpoint: str | None
    files: tuple[RecordedFile, ...]
    estimated_bytes: int | None

    def redact(self, message: str) -> str:
        """The message without server paths (for keys that may not see them)."""
        for path in (self.engine_source, self.checkpoint, *(str(f.path) for f in self.files)):
            if path and os.path.isabs(path):
                message = message.replace(path, self.label)
        return message


def _fingerprint(path: Path) -> tuple[int, int, int, int]:
    # ctime cannot be set from user space: a rewrite that restores size and mtime still changes it
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def verify_files(source: Source) -> tuple:
    """Hash every recorded file; the fingerprints they had, or Refused(409) naming what differs."""
    fingerprints = []
    for f in source.files:
        name = f.path.name
        try:
            before = _fingerprint(f.path)
            if before[1] != f.size:
                raise Refused(
                    409,
                    f"{source.label}: {name} is {before[1]} bytes, {f.size} were recorded (truncated or "
                    "replaced); it will not be served",
                )
            digest = sha256_file(f.path)
            after = _fingerprint(f.path)
        except OSError as e:
            raise Refused(409, f"{source.label}: {name} cannot be read ({e.strerror or e})") from e
        if digest != f.sha256 or after != before:
            raise Refused(
                409,
                f"{source.label}: {name} no longer matches the sha256 recorded when it was made or "
                "registered (modified?); it will not be served",
            )
        fingerprints.append(after)
    return tuple(fingerprints)


def fingerprints(source: Source) -> tuple | None:
    try:
        return tuple(_fingerprint(f.path) for f in source.files)
    except OSError:
        return None


def generator_bytes(generator: Any) -> int:
    """Bytes of the tensors a generator holds (model and tokenizer; shared storage counted once)."""
    seen, total = set(), 0
    for module in (getattr(generator, "model", None), getattr(generator, "tokenizer", None)):
        if module is None:
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            ptr = tensor.data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Loaded:
    generator: Any
    nbytes: int
    fingerprints: tuple | None


@dataclass
class _Request:
    source: Source
    sampling: dict[str, Any]
    classes: list[int]
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    batch_key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.batch_key = (self.source.key, json.dumps(self.sampling, sort_keys=True))

    def _settle(self, method: str, value) -> None:
        def apply() -> None:
            if not self.future.done():
                getattr(self.future, method)(value)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the event loop is closed: the server is stopping, nobody waits
            pass

    def resolve(self, value) -> None:
        self._settle("set_result", value)

    def fail(self, error: BaseException) -> None:
        self._settle("set_exception", error)


class GeneratorCache:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running: list[_Request] = []  # the batch on the device
        self._thread: threading.Thread | None = None
        self._closed = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        # (requests, images, seconds) of each engine call: /metrics sets it
        self.on_batch: Callable[[int, int, float], None] | None = None

    # ------------------------------------------------------------------------------ the caller side

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def loaded_bytes(self) -> int:
        return sum(e.nbytes for e in list(self._loaded.values()))

    @property
    def loaded_count(self) -> int:
        return len(self._loaded)

    async def generate(
        self, source: Source, classes: list[int], seeds: list[int], sampling: dict[str, Any]
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Images for one request and the sampling settings used; waits without holding a thread."""
        loop = asyncio.get_running_loop()
        request = _Request(source, dict(sampling), list(classes), list(seeds), loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise Refused(503, "the server is shutting down", {"Retry-After": "5"})
            if len(self._pending) >= self.settings.max_generate_queue:
                wait = math.ceil(self._seconds_per_request * len(self._pending))
                raise Refused(
                    503,
                    f"{len(self._pending)} generate requests are already waiting for the device "
                    f"(PTQ4ARVG_MAX_GENERATE_QUEUE={self.settings.max_generate_queue}); try again later",
                    {"Retry-After": str(max(1, wait))},
                )
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._device_loop, name="generate", daemon=True)
                self._thread.start()
            self._cond.notify()
        return await request.future

    def close(self) -> None:
        """Refuse new requests and fail the waiting and running ones (SIGTERM): their connections close
        at once; the device thread (a daemon) is abandoned with its batch."""
        with self._cond:
            self._closed = True
            waiting, self._pending = self._pending + self._running, []
            self._cond.notify_all()
        for r in waiting:
            r.fail(Refused(503, "the server is shutting down", {"Retry-After": "5"}))

    # ------------------------------------------------------------------------------ the device side

    def _device_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._running = self._take_batch()
            if not batch:
                continue
            started = time.monotonic()
            self._serve(batch)
            per_request = (time.monotonic() - started) / len(batch)
            self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * per_request

    def _take_batch(self) -> list[_Request]:
        """The oldest request and the later ones of its source and settings, up to the image limit."""
        # a done future here means its caller went away (disconnect, shutdown): skip it
        self._pending = [r for r in self._pending if not r.future.done()]
        if not self._pending:
            return []
        key = self._pending[0].batch_key
        batch, rest, images = [], [], 0
        for r in self._pending:
            if r.batch_key == key and (
                not batch or images + len(r.classes) <= self.settings.max_generate_images
            ):
                batch.append(r)
                images += len(r.classes)
            else:
                rest.append(r)
        self._pending = rest
        return batch

    def _serve(self, batch: list[_Request]) -> None:
        try:
            self._run(batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].fail(exc)
                return
            for r in batch:  # one request's bad input must not fail the others: serve them one by one
                try:
                    self._run([r])
                except Exception as single:
                    r.fail(single)

    def _run(self, batch: list[_Request]) -> None:
        first = batch[0]
        generator = self._generator(first.source)
        classes = [c for r in batch for c in r.classes]
        seeds = [s for r in batch for s in r.seeds]
        started = time.perf_counter()
        images = to_uint8_images(generator.generate(classes, seeds, **first.sampling))
        if self.on_batch is not None:
            self.on_batch(len(batch), len(classes), time.perf_counter() - started)
        used = {**dict(getattr(generator, "default_sampling", {}) or {}), **first.sampling}
        start = 0
        for r in batch:
            r.resolve((images[start : start + len(r.classes)], used))
            start += len(r.classes)

    # -------------------------------------------------------------------------------- the cache

    def _generator(self, source: Source):
        entry = self._loaded.get(source.key)
        if entry is not None:
            if entry.fingerprints == fingerprints(source):
                self._loaded.move_to_end(source.key)
                return entry.generator
            log.warning("files of %s changed since they were verified; verifying again", source.label)
            self._drop(source.key)
        budget = self.settings.generator_memory_bytes
        if source.estimated_bytes is not None and source.estimated_bytes > budget:
            raise Refused(503, self._too_large(source, source.estimated_bytes, "needs about"))
        verified = verify_files(source)
        self._make_room(source.estimated_bytes or 0)
        engine = importlib.import_module(self.settings.engine_module)
        generator = engine.load_generator(
            source.engine_source, checkpoint=source.checkpoint, device=self.settings.device
        )
        nbytes = generator_bytes(generator)
        if nbytes > budget:
            del generator
            gc.collect()
            raise Refused(503, self._too_large(source, nbytes, "holds"))
        self._make_room(nbytes)
        self._loaded[source.key] = _Loaded(generator, nbytes, verified)
        return generator

    def _too_large(self, source: Source, nbytes: int, verb: str) -> str:
        return (
            f"{source.label} {verb} {nbytes / 2**20:.1f} MiB of weights, more than this server keeps "
            f"loaded for generation ({self.settings.generator_memory_bytes / 2**20:.1f} MiB, "
            "PTQ4ARVG_GENERATOR_MEMORY_BYTES)"
        )

    def _make_room(self, nbytes: int) -> None:
        while self._loaded and self.loaded_bytes + nbytes > self.settings.generator_memory_bytes:
            self._drop(next(iter(self._loaded)))

    def _drop(self, key: str) -> None:
        self._loaded.pop(key, None)
        gc.collect()  # generators hold reference cycles (model <-> tokenizer): free their tensors now


def to_uint8_images(images: Any) -> list[np.ndarray]:
    """(B, H, W, 3) uint8 tensor or array -> list of HxWx3 uint8 arrays."""
    array = to_numpy(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"the generator returned {array.dtype} {array.shape}, expected uint8 (B, H, W, 3)")
    return [np.ascontiguousarray(a) for a in array]
