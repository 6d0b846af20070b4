"""Embedded mode: `serve(embedded=True)` with no configuration runs SQLite, a local artifact folder
and its own worker child (solo pool, SQLAlchemy broker); bundled models are registered at start."""

from __future__ import annotations

import concurrent.futures
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


@contextlib.contextmanager
def embedded_server(var: Path, log: Path):
    """``app.server --embedded`` on ``var`` (scripted engine, 2 s lease) and its worker child's pid."""
    port = free_port()
    env = python_env(
        {
            "PTQ4ARVG_ENGINE_MODULE": "scripted_engine",
            "PTQ4ARVG_REGISTRY_MODULE": "scripted_engine",
            "PTQ4ARVG_JOB_LEASE_SECONDS": "2",
            "PTQ4ARVG_RECONCILE_SECONDS": "1",
        }
    )
    process = start_process(
        [sys.executable, "-m", "app.server", "--embedded", "--var-dir", str(var), "--port", str(port)],
        env,
        log,
    )
    state = {"url": f"http://127.0.0.1:{port}", "var": var, "process": process, "worker_pid": None}
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout=60)
        state["worker_pid"] = child_pids(process.pid)[0]
        yield state
    finally:
        stop_process(process, timeout=20)
        if state["worker_pid"] is not None and pid_alive(state["worker_pid"]):  # the server should have
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state["worker_pid"], signal.SIGKILL)


def client(state) -> httpx.Client:
    token = (state["var"] / "admin.token").read_text().strip()
    return httpx.Client(base_url=state["url"], headers={"Authorization": f"Bearer {token}"}, timeout=30)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} after {timeout}s")


def wait_done(c: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    def done():
        job = c.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "canceled") else None

    return wait_for(done, timeout, f"job {job_id} not done")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    var = tmp_path_factory.mktemp("embedded") / "var"
    with embedded_server(var, var.parent / "server.log") as state:
        yield state


def test_embedded_service_runs_jobs_end_to_end(embedded):
    var = embedded["var"]
    token = (var / "admin.token").read_text().strip()
    assert oct((var / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert (var / "ptq4arvg.db").exists()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=embedded["url"], headers=headers, timeout=30) as client:
        ready = wait_for(lambda: (r := client.get("/readyz")).status_code == 200 and r, 30, "not ready")
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


def test_a_dead_worker_child_is_restarted_and_takes_its_job_over(embedded):
    with client(embedded) as c:
        job = c.post("/v1/jobs", json={"model": "scripted-slow", "calibration": {"num_samples": 20}}).json()
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] == "running", 30, "job not running")
        old = embedded["worker_pid"]
        os.killpg(old, signal.SIGKILL)
        new = wait_for(
            lambda: [p for p in child_pids(embedded["process"].pid) if p != old], 30, "no new child"
        )
        embedded["worker_pid"] = new[0]
        done = wait_done(c, job["id"])
        assert done["state"] == "succeeded" and done["attempt"] == 2, done
        assert "lease expired" in done["events"][2]["message"]
        ready = c.get("/readyz").json()["checks"]["workers"]
        assert ready["ok"] and ready["detail"].startswith("1 alive: embedded@")


def test_sigterm_stops_the_server_within_10s_and_its_job_resumes_after_a_restart(embedded):
    with client(embedded) as c:
        job = c.post("/v1/jobs", json={"model": "scripted-slow", "calibration": {"num_samples": 60}}).json()
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] == "running", 30, "job not running")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"model": "scripted-fast", "classes": [1], "sampling": {"delay_s": 60.0}}
            busy = pool.submit(c.post, "/v1/generate", json=body)  # holds the device for a minute
            time.sleep(0.5)
            t0 = time.monotonic()
            os.killpg(embedded["process"].pid, signal.SIGTERM)
            embedded["process"].wait(timeout=15)
            stopped = time.monotonic() - t0
            assert stopped < 10, stopped
            assert not pid_alive(embedded["worker_pid"])
            with contextlib.suppress(httpx.HTTPError):
                assert busy.result().status_code == 503  # told, or its connection closed
    with (
        embedded_server(embedded["var"], embedded["var"].parent / "server-2.log") as again,
        client(again) as c,
    ):
        done = wait_done(c, job["id"], timeout=90)
    assert done["state"] == "succeeded" and done["attempt"] == 2, done


def test_the_worker_exits_if_the_server_is_killed(tmp_path):
    """A SIGKILLed server cannot stop its worker: the worker notices its parent is gone and stops."""
    with embedded_server(tmp_path / "var", tmp_path / "server.log") as state:
        os.kill(state["process"].pid, signal.SIGKILL)
        state["process"].wait(timeout=10)
        wait_for(lambda: not pid_alive(state["worker_pid"]), 30, "the worker still runs")
