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


def test_generation_and_jobs_each_reserve_gpus():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("api", "worker"):  # the API serves /v1/generate: it needs a GPU as much as the worker
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["device_ids"], name
    assert services["worker"]["command"][-2:] == ["--gpus", "all"]


@pytest.mark.parametrize(
    ("text", "visible", "expected"),
    [("all", 2, [0, 1]), ("1", 2, [1]), ("0,1", 4, [0, 1])],
)
def test_gpu_selection(text, visible, expected):
    from app.worker_cmd import parse_gpus

    assert parse_gpus(text, visible) == expected


@pytest.mark.parametrize(
    ("text", "visible", "message"),
    [
        ("all", 0, "no CUDA GPU is visible"),
        ("0,x", 2, "comma-separated GPU indices"),
        ("2", 2, "GPU 2 is not visible"),
        ("0,0", 2, "distinct GPU indices"),
    ],
)
def test_bad_gpu_selection_says_why(text, visible, message):
    from app.worker_cmd import GpuSelectionError, parse_gpus

    with pytest.raises(GpuSelectionError, match=message):
        parse_gpus(text, visible)


def test_a_bad_device_setting_is_refused():
    from pydantic import ValidationError

    from app.config import Settings

    assert Settings(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError, match="device"):
        Settings(device="gpu")
