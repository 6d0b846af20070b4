"""Image generation for POST /v1/generate: loaded generators in an LRU cache, and request batching.

Requests for the same source and sampling settings that arrive while the device is busy are served
together in one batch. The engine seeds every image with its own generator, so an image's bytes
depend on its class and seed only, never on the batch it was served in. The engine is imported on
first use (never at import time of this module).
"""

from __future__ import annotations

import collections
import importlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.config import Settings
from quantcore.images import to_numpy


@dataclass
class _Request:
    classes: list[int]
    seeds: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    images: list[np.ndarray] | None = None
    error: BaseException | None = None


class GeneratorCache:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._items: collections.OrderedDict[tuple[str, str | None], Any] = collections.OrderedDict()
        self._device = threading.Lock()  # one load or batch at a time: they use the whole device
        self._queue_lock = threading.Lock()
        self._queues: dict[tuple, list[_Request]] = collections.defaultdict(list)
        self.batches_served = 0  # engine calls, and the requests they served (/metrics)
        self.requests_served = 0

    def _engine(self):
        return importlib.import_module(self.settings.engine_module)

    def _generator(self, source: str, checkpoint: str | None):
        key = (source, checkpoint)
        generator = self._items.get(key)
        if generator is None:
            generator = self._engine().load_generator(
                source, checkpoint=checkpoint, device=self.settings.device
            )
            if self.settings.generator_cache_size > 0:
                self._items[key] = generator
                while len(self._items) > self.settings.generator_cache_size:
                    self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return generator

    def _take_batch(self, key: tuple) -> list[_Request]:
        """Queued requests of `key`, oldest first, up to the per-batch image limit (at least one)."""
        with self._queue_lock:
            queue = self._queues[key]
            batch, images = [], 0
            while queue and (
                not batch or images + len(queue[0].classes) <= self.settings.max_generate_images
            ):
                images += len(queue[0].classes)
                batch.append(queue.pop(0))
            if not queue:
                del self._queues[key]
        return batch

    def generate(
        self,
        source: str,
        checkpoint: str | None,
        classes: list[int],
        seeds: list[int],
        sampling: dict[str, Any],
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Images for one request; blocks (in a worker thread) until its batch has run."""
        key = (source, checkpoint, json.dumps(sampling, sort_keys=True))
        request = _Request(list(classes), list(seeds))
        with self._queue_lock:
            self._queues[key].append(request)
        with self._device:
            if not request.done.is_set():  # nobody served it while we waited: serve our key's queue
                self._serve(key, source, checkpoint, sampling)
        request.done.wait()
        if request.error is not None:
            raise request.error
        generator = self._items.get((source, checkpoint))
        defaults = dict(getattr(generator, "default_sampling", {}) or {})
        return request.images, {**defaults, **sampling}

    def _serve(self, key: tuple, source: str, checkpoint: str | None, sampling: dict[str, Any]) -> None:
        batch = self._take_batch(key)
        try:
            self._run(batch, source, checkpoint, sampling)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:  # one request's bad input must not fail the others: serve them one by one
                for r in batch:
                    try:
                        self._run([r], source, checkpoint, sampling)
                    except Exception as single:
                        r.error = single
        finally:
            for r in batch:
                r.done.set()

    def _run(
        self, batch: list[_Request], source: str, checkpoint: str | None, sampling: dict[str, Any]
    ) -> None:
        generator = self._generator(source, checkpoint)
        classes = [c for r in batch for c in r.classes]
        seeds = [s for r in batch for s in r.seeds]
        images = to_uint8_images(generator.generate(classes, seeds, **sampling))
        self.batches_served += 1
        self.requests_served += len(batch)
        start = 0
        for r in batch:
            r.images = images[start : start + len(r.classes)]
            start += len(r.classes)

    def clear(self) -> None:
        with self._device:
            self._items.clear()


def to_uint8_images(images: Any) -> list[np.ndarray]:
    """(B, H, W, 3) uint8 tensor or array -> list of HxWx3 uint8 arrays."""
    array = to_numpy(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"the generator returned {array.dtype} {array.shape}, expected uint8 (B, H, W, 3)")
    return [np.ascontiguousarray(a) for a in array]
