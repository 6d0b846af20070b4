"""Embedded mode: `serve(embedded=True)` with no configuration runs SQLite, a local artifact folder
and its own worker child (solo pool, SQLAlchemy broker); bundled models are registered at start."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from .helpers import free_port, python_env, start_process, stop_process, tail, wait_http


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    return True


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    var = tmp_path_factory.mktemp("embedded") / "var"
    port = free_port()
    env = python_env(
        {"PTQ4ARVG_ENGINE_MODULE": "scripted_engine", "PTQ4ARVG_REGISTRY_MODULE": "scripted_engine"}
    )
    process = start_process(
        [sys.executable, "-m", "app.server", "--embedded", "--var-dir", str(var), "--port", str(port)],
        env,
        var.parent / "server.log",
    )
    worker_pid = None
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout=60)
        worker_pid = child_pids(process.pid)[0]
        yield {"url": f"http://127.0.0.1:{port}", "var": var, "process": process, "worker_pid": worker_pid}
    finally:
        stop_process(process, timeout=20)
        if worker_pid is not None and pid_alive(worker_pid):  # the server should have stopped it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker_pid, signal.SIGKILL)


def test_embedded_service_runs_jobs_end_to_end(embedded):
    var = embedded["var"]
    token = (var / "admin.token").read_text().strip()
    assert oct((var / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert (var / "ptq4arvg.db").exists()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=embedded["url"], headers=headers, timeout=30) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        assert checks["database"]["detail"] == "sqlite" and checks["broker"]["detail"] == "sqla"
        names = {m["name"] for m in client.get("/v1/models").json()["items"]}
        assert "scripted-fast" in names  # the registry was synced at startup

        r = client.post(
            "/v1/jobs", json={"model": "scripted-fast", "recipe": "rtn", "w_bits": 4, "a_bits": None}
        )
        assert r.status_code == 202, r.text
        deadline, job = time.monotonic() + 40, None
        while time.monotonic() < deadline:
            job = client.get(r.headers["location"]).json()
            if job["state"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.2)
        assert job["state"] == "succeeded", (job, tail(embedded["process"]))
        assert job["worker"].startswith("embedded@")
        art = client.get(f"/v1/artifacts/{job['artifact_id']}").json()
        assert (var / "artifacts" / job["artifact_id"] / "manifest.json").is_file()
        assert {f["name"] for f in art["files"]} == {"manifest.json", "model.safetensors"}


def test_stopping_the_server_stops_its_worker(embedded):
    assert pid_alive(embedded["worker_pid"])
    os.killpg(embedded["process"].pid, signal.SIGTERM)
    embedded["process"].wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and pid_alive(embedded["worker_pid"]):
        time.sleep(0.2)
    assert not pid_alive(embedded["worker_pid"])


def test_the_worker_exits_if_the_server_is_killed(tmp_path):
    """A SIGKILLed server cannot stop its worker: the worker notices its parent is gone and stops."""
    var = tmp_path / "var"
    port = free_port()
    env = python_env(
        {"PTQ4ARVG_ENGINE_MODULE": "scripted_engine", "PTQ4ARVG_REGISTRY_MODULE": "scripted_engine"}
    )
    process = start_process(
        [sys.executable, "-m", "app.server", "--embedded", "--var-dir", str(var), "--port", str(port)],
        env,
        tmp_path / "server.log",
    )
    worker_pid = None
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout=60)
        worker_pid = child_pids(process.pid)[0]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pid_alive(worker_pid):
            time.sleep(0.2)
        assert not pid_alive(worker_pid)
    finally:
        stop_process(process)
        if worker_pid is not None and pid_alive(worker_pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker_pid, signal.SIGKILL)
