"""docker-compose.yml and the Dockerfile, validated offline (no Docker engine on this machine)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from .helpers import REPO

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_is_valid():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose not installed (apt-get install docker-compose); structure is checked below"
        )
    result = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_services_and_healthchecks(compose):
    services = compose["services"]
    assert set(services) >= {"api", "worker", "redis", "postgres"}
    for name in ("api", "worker", "redis", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_shared_artifact_volume_and_production_settings(compose):
    services = compose["services"]
    assert "artifacts" in compose["volumes"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        mounts = dict(v.split(":")[:2][::-1] for v in services[name]["volumes"])
        assert mounts[env["PTQ4ARVG_ARTIFACT_DIR"]] == "artifacts", name
        assert env["PTQ4ARVG_DATABASE_URL"].startswith("postgresql+psycopg2://")
        assert env["PTQ4ARVG_BROKER_URL"].startswith("redis://redis:6379")
        assert int(env["PTQ4ARVG_VISIBILITY_TIMEOUT"]) >= 3600


def test_dockerfile_has_api_and_worker_targets():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.M)
    assert re.search(r"^FROM base AS api$", text, re.M)
    assert re.search(r"^FROM base AS worker$", text, re.M)
    assert "app.cli migrate" in text and "app.worker_cmd" in text
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        if not path.startswith("--"):
            assert (REPO / path).exists() or path == "README.md", path
