"""Fixtures of the service tests: real PostgreSQL, Redis, uvicorn and Celery worker processes.

- a fresh PostgreSQL database per test session (created with a unique name, dropped at the end),
  migrated with `python -m app.cli migrate`;
- Redis at 127.0.0.1:6379 with a queue name unique to the session;
- the API as a real `uvicorn` subprocess and workers as real `python -m app.worker_cmd` subprocesses,
  each in its own process group (start_new_session=True), stopped with TERM, then KILL;
- API keys made with the real CLI (`python -m app.cli create-key`).

Workers here run the scripted stand-in engine (tests/service/scripted_engine.py); the tests of the
real engine (test_engine_e2e.py) start their own server and worker.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripted_engine, for in-process runs

from .helpers import (
    PG_ADMIN_URL,
    REDIS_URL,
    WEBHOOK_SECRET,
    Service,
    WorkerPool,
    cli,
    create_key,
    forget_queue,
    python_env,
    running_server,
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; dropped at the end."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
    name = f"ptq4arvg_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        from app.db.session import get_engine

        with contextlib.suppress(Exception):
            get_engine(url).dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    return REDIS_URL


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def service_env(pg_url, redis_url, run_dir) -> Iterator[dict[str, str]]:
    """Environment of the session's server and workers (scripted engine, own queue, short lease)."""
    env = python_env(
        {
            "PTQ4ARVG_DATABASE_URL": pg_url,
            "PTQ4ARVG_BROKER_URL": redis_url,
            "PTQ4ARVG_QUEUE": f"ptq4arvg-test-{uuid.uuid4().hex[:8]}",
            "PTQ4ARVG_ARTIFACT_DIR": str(run_dir / "artifacts"),
            "PTQ4ARVG_CHECKPOINT_ROOTS": str(run_dir / "checkpoints"),
            "PTQ4ARVG_ENGINE_MODULE": "scripted_engine",
            "PTQ4ARVG_REGISTRY_MODULE": "scripted_engine",
            "PTQ4ARVG_JOB_LEASE_SECONDS": "2",
            "PTQ4ARVG_RECONCILE_SECONDS": "1",
            "PTQ4ARVG_VISIBILITY_TIMEOUT": "6",
            "PTQ4ARVG_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PTQ4ARVG_WEBHOOK_RETRY_SECONDS": "0.3",
            "SCRIPTED_ENGINE_LOG": str(run_dir / "engine-runs.jsonl"),
        }
    )
    (run_dir / "checkpoints").mkdir()
    result = cli(env, "migrate")
    assert result.returncode == 0, result.stderr
    yield env
    forget_queue(redis_url, env["PTQ4ARVG_QUEUE"])


@pytest.fixture(scope="session")
def service(service_env, run_dir) -> Iterator[Service]:
    # app.server.serve(embedded=False): settings from the environment, as in production
    with running_server(service_env, run_dir / "uvicorn.log") as svc:
        yield svc


@pytest.fixture(scope="session")
def workers(service_env, run_dir) -> Iterator[WorkerPool]:
    pool = WorkerPool(service_env, run_dir)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def worker(workers) -> subprocess.Popen:
    """A live worker (solo pool, scripted engine), shared by the tests while it lives."""
    return workers.ensure()


@pytest.fixture(scope="session")
def keys(service_env) -> dict[str, str]:
    """Tokens by role: alice and bob (jobs, generate), carol (jobs only), root (admin)."""
    return {
        "alice": create_key(service_env, "alice", "jobs,generate"),
        "bob": create_key(service_env, "bob", "jobs,generate"),
        "carol": create_key(service_env, "carol", "jobs"),
        "root": create_key(service_env, "root", "admin"),
    }


def pytest_collection_modifyitems(config, items):
    """Every test here needs the local PostgreSQL/Redis services (marker declared in pyproject.toml)."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.services)
