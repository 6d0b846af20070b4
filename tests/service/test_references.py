"""GET/POST /v1/references: reference sets of the Inception metrics, registered like checkpoints, and
the job spec's `evaluation.reference` resolved to the registered file."""

from __future__ import annotations

import hashlib

import numpy as np
from sqlalchemy import create_engine, select

from app.db.models import Job

from .helpers import submit


def test_register_list_and_use_a_reference(service, keys, workers, tmp_path, pg_url):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
    body = {"name": "tiny-ref", "path": str(path)}
    r = service.client.post("/v1/references", json=body, headers=service.auth(keys["root"]))
    assert r.status_code == 201, r.text
    ref = r.json()
    assert (
        ref["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and ref["size"] == path.stat().st_size
    )
    assert ref["info"] == {"arrays": ["arr_0", "mu", "sigma"], "num_images": 3}
    assert (
        service.client.post("/v1/references", json=body, headers=service.auth(keys["root"])).status_code
        == 409
    )
    # only admins register; every key lists
    assert (
        service.client.post("/v1/references", json=body, headers=service.auth(keys["alice"])).status_code
        == 403
    )
    listed = service.client.get("/v1/references", headers=service.auth(keys["carol"])).json()
    assert "tiny-ref" in [r["name"] for r in listed["items"]] and listed["builtin"] == ["fashion-mnist-test"]

    # a job names it (by name or sha256); the engine receives the file's path
    workers.ensure()
    evaluation = {"num_images": 4, "metrics": ["fid", "precision"], "reference": "tiny-ref"}
    job = submit(service, keys["alice"], model="scripted-fast", evaluation=evaluation)
    by_sha = submit(
        service, keys["alice"], model="scripted-fast", evaluation={**evaluation, "reference": ref["sha256"]}
    )
    builtin = submit(
        service,
        keys["alice"],
        model="scripted-fast",
        evaluation={**evaluation, "reference": "fashion-mnist-test"},
    )
    engine = create_engine(pg_url)
    with engine.connect() as c:
        specs = {row.id: row.engine_spec for row in c.execute(select(Job.id, Job.engine_spec))}
    engine.dispose()
    assert (
        specs[job["id"]]["evaluation"]["reference"]
        == str(path)
        == specs[by_sha["id"]]["evaluation"]["reference"]
    )
    assert specs[builtin["id"]]["evaluation"]["reference"] == "fashion-mnist-test"
    assert job["spec"]["evaluation"]["reference"] == "tiny-ref"  # the record keeps what the client said
    assert service.wait_job(job["id"], keys["alice"])["state"] == "succeeded"


def test_bad_references_are_refused_naming_the_field(service, keys, tmp_path):
    root = service.auth(keys["root"])
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((3, 8, 8), np.uint8))
    cases = {
        "relative.npz": "absolute path",
        str(tmp_path / "missing.npz"): "cannot read",
        str(tmp_path / "text.npz"): "not an .npz file",
        str(tmp_path / "labels.npz"): "neither statistics",
        str(tmp_path / "gray.npz"): "uint8 images",
    }
    for i, (path, message) in enumerate(cases.items()):
        r = service.client.post("/v1/references", json={"name": f"bad-{i}", "path": path}, headers=root)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "path"], r.text
        assert message in r.json()["detail"][0]["msg"]
    r = service.client.post(
        "/v1/jobs",
        json={
            "model": "scripted-fast",
            "evaluation": {"num_images": 4, "metrics": ["fid"], "reference": "nope"},
        },
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "evaluation", "reference"]
    r = service.client.post(
        "/v1/jobs",
        json={"model": "scripted-fast", "evaluation": {"num_images": 2, "metrics": ["precision"]}},
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 422 and "too few" in r.text
