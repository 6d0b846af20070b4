"""/healthz, /readyz against the real PostgreSQL and Redis (and unreachable ones), /metrics."""

from __future__ import annotations

import collections
import re
import sys
import time

import httpx

from .helpers import cli, free_port, running_server, start_process, stop_process, wait_http


def test_readyz_checks_database_broker_storage_and_workers(service, worker):
    r = service.client.get("/readyz")
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert set(checks) == {"database", "broker", "storage", "workers"}
    assert all(c["ok"] for c in checks.values())
    assert checks["database"]["detail"] == "postgresql"
    assert checks["broker"]["detail"] == "redis"
    assert "writable" in checks["storage"]["detail"]
    assert checks["workers"]["detail"].startswith(("1 alive", "2 alive", "3 alive"))
    assert worker.node_name + "@" in checks["workers"]["detail"]


def test_readyz_is_503_without_a_live_worker(service_env, run_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"  # a database no worker ever beat into
    env = {**service_env, "PTQ4ARVG_DATABASE_URL": url, "PTQ4ARVG_REGISTER_MODELS_AT_STARTUP": "false"}
    assert cli(env, "migrate").returncode == 0
    with running_server(env, run_dir / "uvicorn-noworker.log") as alone:
        r = alone.client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"] and checks["storage"]["ok"]
    assert not checks["workers"]["ok"] and "no worker beat" in checks["workers"]["detail"]


def test_health_answers_in_milliseconds_while_50_clients_generate(service, keys):
    """Every client asks for its own sampling settings, so nothing batches: the device stays busy."""
    import threading

    stop = threading.Event()
    answered = []

    def client(i: int) -> None:
        body = {
            "model": "scripted-fast",
            "classes": [1],
            "sampling": {"delay_s": 0.05, "temperature": 1 + i / 100},
        }
        with httpx.Client(base_url=service.base_url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", json=body, headers=service.auth(keys["alice"]))
                answered.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    latencies = {"/healthz": [], "/readyz": []}
    try:
        time.sleep(1.0)  # let the queue fill
        with httpx.Client(base_url=service.base_url, timeout=30) as probe:
            for _ in range(40):
                for path, seen in latencies.items():
                    t0 = time.perf_counter()
                    assert probe.get(path).status_code in (200, 503)
                    seen.append(time.perf_counter() - t0)
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    codes = collections.Counter(answered)
    assert codes[200] > 50 and set(codes) <= {200, 503}, codes  # the device was serving meanwhile
    healthz = sorted(latencies["/healthz"])
    # the budget of /readyz is its probes' timeout; /healthz does no I/O at all
    assert healthz[len(healthz) // 2] < 0.05 and healthz[-1] < 0.5, healthz
    assert max(latencies["/readyz"]) < 2.5, latencies["/readyz"]


def test_readyz_is_503_when_dependencies_are_down(service_env, run_dir):
    port = free_port()
    env = {
        **service_env,
        "PTQ4ARVG_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/nothing",
        "PTQ4ARVG_BROKER_URL": "redis://127.0.0.1:1/0",
        "PTQ4ARVG_ARTIFACT_DIR": "/proc/no-such-place",
        "PTQ4ARVG_REGISTER_MODELS_AT_STARTUP": "false",
    }
    process = start_process(
        [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(port)],
        env,
        run_dir / "uvicorn-down.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process)
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable"
        assert not any(c["ok"] for c in body["checks"].values()), body
        assert "OperationalError" in body["checks"]["database"]["detail"]
        # a route that needs the database says it is unavailable, not a 500
        r = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": "Bearer x"}, timeout=30)
        assert r.status_code == 503 and "database is unavailable" in r.json()["detail"], r.text
    finally:
        stop_process(process)


def test_metrics_in_prometheus_text_format(service, keys):
    service.client.get("/v1/jobs", headers=service.auth(keys["alice"]))
    service.client.get("/v1/jobs/some-id", headers=service.auth(keys["alice"]))
    r = service.client.get("/metrics", headers=service.auth(keys["root"]))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? [-+0-9.eInf]+$')
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'ptq4arvg_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text  # templates, not raw ids
    assert "some-id" not in text
    assert re.search(r'^ptq4arvg_jobs\{state="queued"\} \d+(\.\d+)?$', text, re.M)
    assert 'ptq4arvg_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/v1/jobs"}' in text
