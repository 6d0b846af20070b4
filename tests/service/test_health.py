"""/healthz, /readyz against the real PostgreSQL and Redis (and unreachable ones), /metrics."""

from __future__ import annotations

import re
import sys

import httpx

from .helpers import free_port, start_process, stop_process, wait_http


def test_readyz_checks_database_broker_and_storage(service):
    r = service.client.get("/readyz")
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert set(checks) == {"database", "broker", "storage"}
    assert all(c["ok"] for c in checks.values())
    assert checks["database"]["detail"] == "postgresql"
    assert checks["broker"]["detail"] == "redis"
    assert "writable" in checks["storage"]["detail"]


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
    assert re.search(r'^ptq4arvg_jobs\{state="queued"\} \d+$', text, re.M)
    assert 'ptq4arvg_http_request_duration_seconds_bucket{method="GET",route="/v1/jobs",le="+Inf"}' in text
