"""Helpers of the service tests: processes, the CLI, a client for the running API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PG_ADMIN_URL = os.environ.get(
    "PTQ4ARVG_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PTQ4ARVG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WEBHOOK_SECRET = "test-deployment-webhook-secret"


# ------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - closed by stop_process
    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    process._log_file = log  # type: ignore[attr-defined]
    process._log_path = log_path  # type: ignore[attr-defined]
    return process


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """TERM the process group, wait, then KILL the group (a hung worker dies only with SIGKILL)."""
    if process.poll() is None:
        kill_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(process.pid, signal.SIGKILL)  # children left in the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    log = getattr(process, "_log_file", None)
    if log is not None:
        log.close()


def tail(process: subprocess.Popen, n: int = 60) -> str:
    path = getattr(process, "_log_path", None)
    if path is None or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def wait_http(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{tail(process)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server not up after {timeout}s:\n{tail(process)}")


def python_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTQ4ARVG_")}
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # e.g. a --target site
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), *inherited])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_key(env: dict[str, str], owner: str, scopes: str) -> str:
    result = cli(env, "create-key", "--owner", owner, "--scopes", scopes, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["token"]


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path, timeout: float = 30.0):
    """A real API server (``python -m app.server``, settings from ``env``) on a free port, as a Service."""
    port = free_port()
    cmd = [sys.executable, "-m", "app.server", "--host", "127.0.0.1", "--port", str(port)]
    process = start_process([*cmd, "--log-level", "warning"], env, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout=timeout)
        service = Service(f"http://127.0.0.1:{port}", env, process)
        yield service
        service.client.close()
    finally:
        stop_process(process)


class Service:
    """A running API server (and its settings) plus helpers for the tests."""

    def __init__(self, base_url: str, env: dict[str, str], process: subprocess.Popen):
        self.base_url = base_url
        self.env = env
        self.process = process
        self.client = httpx.Client(base_url=base_url, timeout=30)

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def wait_job(
        self, job_id: str, token: str, states=("succeeded", "failed", "canceled"), timeout=30.0
    ) -> dict:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            r = self.client.get(f"/v1/jobs/{job_id}", headers=self.auth(token))
            assert r.status_code == 200, r.text
            body = r.json()
            if body["state"] in states:
                return body
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {body}")


def service_settings(env: dict[str, str]):
    """The Settings that the server and workers of ``env`` use, for in-process checks."""
    from app.config import ENV_PREFIX, Settings

    values = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    return Settings(**values)


def sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def submit(service: Service, token: str, **spec) -> dict:
    r = service.client.post("/v1/jobs", json=spec, headers=service.auth(token))
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def raw_get(base_url: str, path: str, token: str) -> tuple[int, bytes]:
    """GET a path exactly as written (httpx would normalise '..' segments before sending)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def forget_queue(redis_url: str, queue: str) -> None:
    """Delete a test queue's Redis keys (the queue list and kombu's bindings)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)
    finally:
        client.close()


class WorkerPool:
    """Starts worker subprocesses on demand; every one is stopped at the end of the session.

    ``ensure()`` returns a live worker, starting one if the last was killed by a crash test.
    """

    def __init__(self, env: dict[str, str], run_dir: Path):
        self.env = env
        self.run_dir = run_dir
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        name = name or f"w{len(self.processes)}"
        process = start_process(
            [sys.executable, "-m", "app.worker_cmd", "--hostname", f"{name}@%h", "--loglevel", "info"],
            {**self.env, **(env or {})},
            self.run_dir / f"worker-{name}.log",
        )
        process.node_name = name  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def wait_ready(self, process: subprocess.Popen, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}:\n{tail(process)}")
            if " ready." in Path(process._log_path).read_text(errors="replace"):  # type: ignore[attr-defined]
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{tail(process)}")

    def ensure(self, count: int = 1) -> subprocess.Popen:
        """The newest live worker, after starting workers until ``count`` are alive."""
        alive = [p for p in self.processes if p.poll() is None]
        for _ in range(count - len(alive)):
            alive.append(self.start())
            self.wait_ready(alive[-1])
        return alive[-1]

    def by_node(self, node: str) -> subprocess.Popen:
        """The process whose Celery node name is ``node`` (``name@host``)."""
        return next(p for p in self.processes if node.startswith(p.node_name + "@"))

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process(process)
