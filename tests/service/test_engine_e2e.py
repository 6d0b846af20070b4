"""End to end with the real engine (quantcore.api): a W8A8 ptq4arvg job on a bundled model, the
artifact verified after download, deterministic generation, crash recovery and cancel.

"""

from __future__ import annotations

import base64
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from app.db.models import Artifact, JobEvent
from conftest import needs_fashion_mnist

from .helpers import (
    Service,
    WorkerPool,
    forget_queue,
    free_port,
    python_env,
    sha256,
    start_process,
    stop_process,
    wait_http,
)

# Sizes of the e2e jobs: small enough for 2 CPU cores, big enough to be interrupted mid-way.
QUICK = {
    "calibration": {"num_samples": 32, "selection": "dgc-official", "seed": 0, "batch_size": 32},
    "evaluation": {"num_images": 16, "seed": 5},
}
LONG = {
    "calibration": {"num_samples": 256, "selection": "dgc-official", "seed": 1},
    "evaluation": {"num_images": 64},
}


@pytest.fixture(scope="module")
def engine_env(pg_url, redis_url, tmp_path_factory) -> Iterator[dict[str, str]]:
    run = tmp_path_factory.mktemp("engine")
    env = python_env(
        {
            "PTQ4ARVG_DATABASE_URL": pg_url,
            "PTQ4ARVG_BROKER_URL": redis_url,
            "PTQ4ARVG_QUEUE": f"ptq4arvg-e2e-{uuid.uuid4().hex[:8]}",
            "PTQ4ARVG_ARTIFACT_DIR": str(run / "artifacts"),
            "PTQ4ARVG_JOB_LEASE_SECONDS": "5",
            "PTQ4ARVG_VISIBILITY_TIMEOUT": "3600",
            "RUN_DIR": str(run),
        }
    )
    yield env
    forget_queue(redis_url, env["PTQ4ARVG_QUEUE"])


@pytest.fixture(scope="module")
def engine_service(engine_env, service_env) -> Service:  # service_env: the database is migrated
    run = Path(engine_env["RUN_DIR"])
    port = free_port()
    process = start_process(
        [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(port)],
        engine_env,
        run / "uvicorn.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout=120)
        svc = Service(f"http://127.0.0.1:{port}", engine_env, process)
        svc.client.timeout = 300
        yield svc
        svc.client.close()
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def engine_workers(engine_env):
    pool = WorkerPool(engine_env, Path(engine_env["RUN_DIR"]))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def bundled_model(engine_service, keys) -> str:
    items = engine_service.client.get("/v1/models", headers=engine_service.auth(keys["alice"])).json()[
        "items"
    ]
    registry = [m for m in items if m["source"] == "registry" and m["family"] != "scripted"]
    bundled = [m for m in registry if m["bundled"]]
    assert bundled, "the registry lists no bundled model"
    return min(bundled, key=lambda m: m["parameters"] or 0)["name"]


def test_the_api_job_spec_is_the_engines():
    """One definition: the REST schema adds examples and the service's own delivery fields (webhooks), so
    what it hands the engine has the engine's fields and defaults."""
    from app.schemas import SERVICE_FIELDS
    from app.schemas import JobSpec as RestJobSpec
    from quantcore.spec import JobSpec

    assert issubclass(RestJobSpec, JobSpec)
    assert set(RestJobSpec.model_fields) - set(JobSpec.model_fields) == set(SERVICE_FIELDS)
    assert RestJobSpec(model="m").engine_dict() == JobSpec(model="m").model_dump(mode="json")


def submit(svc: Service, token: str, spec: dict) -> dict:
    r = svc.client.post("/v1/jobs", json=spec, headers=svc.auth(token))
    assert r.status_code == 202, r.text
    return r.json()


def wait_running(svc: Service, job_id: str, token: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = svc.client.get(f"/v1/jobs/{job_id}", headers=svc.auth(token)).json()
        if job["state"] != "queued" and (job["state"] != "running" or job["progress"]["percent"] > 0):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not start making progress")


def test_w8a8_job_artifact_verifies_and_generation_is_deterministic(
    engine_service, engine_workers, keys, bundled_model, tmp_path
):
    from quantcore.artifact import verify_artifact

    svc, token = engine_service, keys["alice"]
    engine_workers.ensure()
    spec = {"model": bundled_model, "recipe": "ptq4arvg", "w_bits": 8, "a_bits": 8, **QUICK}
    job = submit(svc, token, spec)
    done = svc.wait_job(job["id"], token, timeout=600)
    assert done["state"] == "succeeded", done
    assert done["metrics"]["timings"]["calibration-pool"] > 0 and done["metrics"]["timings"]["total"] > 0
    assert done["device"]["device"] == "cpu"  # auto on a machine without CUDA

    art = svc.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=svc.auth(token)).json()
    local = tmp_path / "artifact"
    local.mkdir()
    for entry in art["files"]:
        r = svc.client.get(entry["url"], headers=svc.auth(token))
        assert r.status_code == 200 and sha256(r.content) == entry["sha256"]
        (local / entry["name"]).write_bytes(r.content)
    assert verify_artifact(local) == art["manifest"]

    body = {"artifact_id": done["artifact_id"], "classes": [1], "seed": 123}
    first = svc.client.post("/v1/generate", json=body, headers=svc.auth(token))
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png" and first.content[:4] == b"\x89PNG"
    second = svc.client.post("/v1/generate", json=body, headers=svc.auth(token))
    assert second.content == first.content
    other = svc.client.post("/v1/generate", json={**body, "seed": 124}, headers=svc.auth(token))
    assert other.content != first.content
    # several images: JSON with one base64 PNG and one seed per image; the same seed, the same bytes
    several = svc.client.post("/v1/generate", json={**body, "classes": [2, 1]}, headers=svc.auth(token))
    assert several.headers["content-type"] == "application/json"
    images = several.json()["images"]
    assert [(im["class_label"], im["seed"]) for im in images] == [(2, 123), (1, 124)]
    assert base64.b64decode(images[1]["png_base64"]) == other.content


def test_a_mar_job_over_rest_reports_the_continuous_token_metrics(engine_service, engine_workers, keys):
    """MAR (continuous latents, a diffusion head) goes through the same job contract as the others."""
    svc, token = engine_service, keys["alice"]
    engine_workers.ensure()
    spec = {
        "model": "mar-tiny",
        "recipe": "ptq4arvg",
        "w_bits": 6,
        "a_bits": 6,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 2},
    }
    done = svc.wait_job(submit(svc, token, spec)["id"], token, timeout=300)
    assert done["state"] == "succeeded", done
    metrics = done["metrics"]
    assert {"latent_rel_error", "condition_rel_error", "diffusion_loss"} <= metrics.keys()
    assert "token_agreement" not in metrics
    art = svc.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=svc.auth(token)).json()
    assert art["manifest"]["model"]["family"] == "mar"


def test_kill_9_mid_job_then_a_new_worker_completes_it_exactly_once(
    engine_service, engine_workers, keys, bundled_model, pg_url
):
    svc, token = engine_service, keys["alice"]
    victim = engine_workers.ensure()
    job = submit(svc, token, {"model": bundled_model, "recipe": "ptq4arvg", "w_bits": 8, "a_bits": 8, **LONG})
    seen = wait_running(svc, job["id"], token)
    if seen["state"] != "running":
        pytest.skip(f"the job ended ({seen['state']}) before it could be interrupted; enlarge LONG")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    rescuer = engine_workers.start("rescuer")
    engine_workers.wait_ready(rescuer, timeout=120)
    done = svc.wait_job(job["id"], token, timeout=900)
    assert done["state"] == "succeeded", done
    assert done["attempt"] == 2
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job["id"])) == 1
        succeeded = (
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == job["id"], JobEvent.to_state == "succeeded")
        )
        assert c.scalar(succeeded) == 1
    engine.dispose()
    root = Path(svc.env["PTQ4ARVG_ARTIFACT_DIR"])
    assert [p for p in (root / ".staging").iterdir()] == []


def test_cancel_running_job_ends_canceled_within_5s(engine_service, engine_workers, keys, bundled_model):
    svc, token = engine_service, keys["alice"]
    engine_workers.ensure()
    root = Path(svc.env["PTQ4ARVG_ARTIFACT_DIR"])
    before = {p.name for p in root.iterdir()} if root.exists() else set()
    job = submit(svc, token, {"model": bundled_model, "recipe": "ptq4arvg", "w_bits": 8, "a_bits": 8, **LONG})
    seen = wait_running(svc, job["id"], token)
    if seen["state"] != "running":
        pytest.skip(f"the job ended ({seen['state']}) before it could be canceled; enlarge LONG")
    t0 = time.monotonic()
    assert svc.client.post(f"/v1/jobs/{job['id']}/cancel", headers=svc.auth(token)).status_code == 202
    done = svc.wait_job(job["id"], token, timeout=5)
    assert time.monotonic() - t0 < 5
    assert done["state"] == "canceled" and done["artifact_id"] is None
    assert {p.name for p in root.iterdir()} == before
    assert [p for p in (root / ".staging").iterdir()] == []


@needs_fashion_mnist
def test_a_job_with_a_registered_reference_records_fid_sfid_precision_recall(
    engine_service, engine_workers, keys, bundled_model, tmp_path
):
    """Over REST: a reference registered like a model, a job that names it, FID/sFID/P/R in its record."""
    import numpy as np

    from quantcore.eval.inception import InceptionFeatures
    from quantcore.eval.reference import build_reference
    from quantcore.zoo.data import load_fashion_mnist, to_rgb32

    svc, token = engine_service, keys["alice"]
    np.savez(tmp_path / "images.npz", arr_0=to_rgb32(load_fashion_mnist("train")[0][:8]))
    built = build_reference(tmp_path / "images.npz", tmp_path / "ref.npz", InceptionFeatures("cpu"))
    r = svc.client.post(
        "/v1/references",
        json={"name": "fmnist-train-8", "path": str(tmp_path / "ref.npz")},
        headers=svc.auth(keys["root"]),
    )
    assert r.status_code == 201, r.text
    engine_workers.ensure()
    evaluation = {
        "num_images": 4,
        "seed": 5,
        "metrics": ["fid", "sfid", "precision", "recall", "fid_vs_fp"],
        "reference": "fmnist-train-8",
        "bootstrap": 5,
    }
    spec = {
        "model": bundled_model,
        "recipe": "rtn",
        "w_bits": 8,
        "a_bits": 8,
        **QUICK,
        "evaluation": evaluation,
    }
    spec["calibration"] = {**QUICK["calibration"], "num_samples": 4}
    done = svc.wait_job(submit(svc, token, spec)["id"], token, timeout=600)
    assert done["state"] == "succeeded", done
    inception = done["metrics"]["inception"]
    assert inception["reference"]["sha256"] == built.sha256 == r.json()["sha256"]
    metrics = inception["metrics"]
    assert set(metrics) == {"fid", "sfid", "precision", "recall", "fid_vs_fp"}
    for name, entry in metrics.items():
        assert {"value", "ci95", "noise_floor"} <= entry.keys(), name
    assert 0 <= metrics["precision"]["value"] <= 1 and metrics["fid"]["value"] > 0
    art = svc.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=svc.auth(token)).json()
    assert art["manifest"]["metrics"]["inception"] == inception


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        # values of the right type that only the engine's rules refuse
        ({"sampling": {"top_p": 2.0}}, ["body", "sampling", "top_p"]),
        ({"sampling": {"temperature": 0.0}}, ["body", "sampling", "temperature"]),
        ({"classes": [1, 10]}, ["body", "classes", 1]),  # the bundled models have classes 0..9
    ],
)
def test_engine_errors_of_generate_point_at_their_field(engine_service, keys, bundled_model, patch, loc):
    body = {"model": bundled_model, "classes": [1], **patch}
    r = engine_service.client.post("/v1/generate", json=body, headers=engine_service.auth(keys["alice"]))
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [loc], r.json()


def test_a_bundled_models_artifact_records_its_weights(engine_service, engine_workers, keys, bundled_model):
    """Provenance: trained (bundled) weights, not random, with the sha256 of the files loaded."""
    from quantcore import zoo
    from quantcore.checkpoint import file_sha256

    svc, token = engine_service, keys["alice"]
    engine_workers.ensure()
    spec = {
        "model": bundled_model,
        "recipe": "rtn",
        "calibration": {"num_samples": 2, "batch_size": 2},
        "evaluation": {"num_images": 0},
    }
    done = svc.wait_job(submit(svc, token, spec)["id"], token, timeout=600)
    assert done["state"] == "succeeded", done
    model = svc.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=svc.auth(token)).json()[
        "manifest"
    ]["model"]
    bundled = zoo.BUNDLED[bundled_model]
    assert model["weights"] == "bundled" and model["random_weights"] is False
    assert model["checkpoint_sha256"] == file_sha256(bundled.checkpoint)
    assert model["tokenizer_sha256"] == file_sha256(bundled.tokenizer_checkpoint)
