"""The probes behind GET /readyz: database, broker, artifact storage and live workers.

Each probe runs in a thread of its own small pool (never the HTTP thread pool, which busy sync routes
may fill) and is given up after ``PROBE_TIMEOUT_S``: readiness answers within that bound whatever the
load, and a dependency that hangs reads as failed.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
from kombu import Connection
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app import schemas
from app.config import Settings
from app.db import recovery
from app.db.models import utcnow

PROBE_TIMEOUT_S = 2.0
PROBE_THREADS = 8


def database(sessions: sessionmaker[Session]) -> str:
    with sessions() as db:
        db.execute(text("SELECT 1"))
        return db.get_bind().dialect.name


def broker(settings: Settings) -> str:
    with Connection(settings.broker_url, connect_timeout=2, transport_options={"max_retries": 1}) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        client = getattr(conn.default_channel, "client", None)
        if client is not None and hasattr(client, "ping"):
            client.ping()  # Redis: a real round trip
        return conn.transport_cls if isinstance(conn.transport_cls, str) else conn.transport.driver_name


def storage(settings: Settings) -> str:
    root = Path(settings.artifact_dir)
    root.mkdir(parents=True, exist_ok=True)
    probe_file = root / f".ready-{uuid.uuid4().hex}"
    probe_file.write_bytes(b"ok")
    probe_file.unlink()
    free = os.statvfs(root)
    return f"{root} writable, {free.f_bavail * free.f_frsize / 2**30:.1f} GiB free"


def workers(sessions: sessionmaker[Session], settings: Settings) -> str:
    """The workers that beat within three reconcile periods; raises when there is none."""
    window = 3 * settings.reconcile_seconds
    with sessions() as db:
        alive = recovery.live_workers(db, within_seconds=window)
    if not alive:
        raise RuntimeError(
            f"no worker beat in the last {window:.0f}s: jobs would wait; start one (`ptq4arvg worker`)"
        )
    now = utcnow()
    return f"{len(alive)} alive: " + ", ".join(
        f"{w.name} ({(now - w.heartbeat_at).total_seconds():.1f}s ago)" for w in alive
    )


class Readiness:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings):
        self.probes: dict[str, Callable[[], str]] = {
            "database": lambda: database(sessions),
            "broker": lambda: broker(settings),
            "storage": lambda: storage(settings),
            "workers": lambda: workers(sessions, settings),
        }
        self._limiter: anyio.CapacityLimiter | None = None

    async def _check(self, probe: Callable[[], str]) -> schemas.Check:
        if self._limiter is None:  # made inside the event loop that uses it
            self._limiter = anyio.CapacityLimiter(PROBE_THREADS)
        start = time.perf_counter()
        try:
            work = anyio.to_thread.run_sync(probe, limiter=self._limiter, abandon_on_cancel=True)
            detail, ok = await asyncio.wait_for(work, PROBE_TIMEOUT_S), True
        except TimeoutError:
            detail, ok = f"no answer within {PROBE_TIMEOUT_S:.0f}s", False
        except Exception as e:
            detail, ok = f"{type(e).__name__}: {e}", False
        return schemas.Check(ok=ok, detail=detail, latency_ms=round(1000 * (time.perf_counter() - start), 2))

    async def check(self) -> schemas.Readiness:
        results = await asyncio.gather(*(self._check(p) for p in self.probes.values()))
        checks = dict(zip(self.probes, results, strict=True))
        ok = all(c.ok for c in checks.values())
        return schemas.Readiness(status="ok" if ok else "unavailable", checks=checks)
