"""Artifacts and jobs over real HTTP: list, show, delete (owners, 409 while a job lives), retention by the
workers' reconciler, and `ptq4arvg artifacts` against the server and a local folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from .helpers import REPO, submit


@pytest.fixture(scope="module")
def db(pg_url):
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def _artifact(service, token: str, **spec) -> dict:
    job = submit(service, token, model="scripted-fast", **spec)
    done = service.wait_job(job["id"], token)
    assert done["state"] == "succeeded", done
    return done


def _folder(service, artifact_id: str) -> Path:
    return Path(service.env["PTQ4ARVG_ARTIFACT_DIR"]) / artifact_id


def test_list_filters_paginates_and_shows_only_your_own(service, keys, worker):
    alice, bob, root = (service.auth(keys[k]) for k in ("alice", "bob", "root"))
    first = _artifact(service, keys["alice"], recipe="rtn", w_bits=8, a_bits=None)
    second = _artifact(service, keys["alice"], recipe="smoothquant")
    theirs = _artifact(service, keys["bob"], recipe="rtn")

    r = service.client.get("/v1/artifacts", params={"recipe": "rtn", "limit": 100}, headers=alice)
    assert r.status_code == 200, r.text
    ids = [a["id"] for a in r.json()["items"]]
    assert first["artifact_id"] in ids and second["artifact_id"] not in ids
    assert theirs["artifact_id"] not in ids  # bob's
    item = next(a for a in r.json()["items"] if a["id"] == first["artifact_id"])
    assert item["model"] == "scripted-fast" and item["a_bits"] is None and item["job_id"] == first["id"]
    assert item["owner"] == "alice" and item["total_bytes"] > 0

    page = service.client.get("/v1/artifacts", params={"limit": 1, "offset": 0}, headers=alice).json()
    assert len(page["items"]) == 1 and page["total"] >= 2 and page["limit"] == 1
    assert page["items"][0]["id"] == second["artifact_id"]  # newest first
    after = service.client.get("/v1/artifacts", params={"limit": 1, "offset": 1}, headers=alice).json()
    assert after["items"][0]["id"] != page["items"][0]["id"]
    none = service.client.get("/v1/artifacts", params={"model": "scripted-slow"}, headers=alice).json()
    assert all(a["model"] == "scripted-slow" for a in none["items"])

    everyone = service.client.get("/v1/artifacts", params={"limit": 100}, headers=root).json()
    assert {first["artifact_id"], theirs["artifact_id"]} <= {a["id"] for a in everyone["items"]}

    shown = service.client.get(f"/v1/artifacts/{first['artifact_id']}", headers=alice).json()
    assert shown["recipe"] == "rtn" and {f["name"] for f in shown["files"]} == {
        "model.safetensors",
        "manifest.json",
    }
    assert service.client.get(f"/v1/artifacts/{first['artifact_id']}", headers=bob).status_code == 404
    r = service.client.get("/v1/artifacts", params={"limit": 0}, headers=alice)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]


def test_delete_artifact_removes_record_and_files_and_keeps_the_job(service, keys, worker):
    alice, bob = service.auth(keys["alice"]), service.auth(keys["bob"])
    done = _artifact(service, keys["alice"])
    artifact_id = done["artifact_id"]
    assert _folder(service, artifact_id).is_dir()

    assert service.client.delete(f"/v1/artifacts/{artifact_id}", headers=bob).status_code == 404
    assert _folder(service, artifact_id).is_dir()  # bob's attempt changed nothing

    r = service.client.delete(f"/v1/artifacts/{artifact_id}", headers=alice)
    assert r.status_code == 204, r.text
    assert not _folder(service, artifact_id).exists()
    assert service.client.get(f"/v1/artifacts/{artifact_id}", headers=alice).status_code == 404
    assert service.client.delete(f"/v1/artifacts/{artifact_id}", headers=alice).status_code == 404
    job = service.client.get(f"/v1/jobs/{done['id']}", headers=alice).json()
    assert job["state"] == "succeeded" and job["artifact_id"] is None


def test_admin_deletes_any_artifact(service, keys, worker):
    done = _artifact(service, keys["bob"])
    r = service.client.delete(f"/v1/artifacts/{done['artifact_id']}", headers=service.auth(keys["root"]))
    assert r.status_code == 204
    assert not _folder(service, done["artifact_id"]).exists()


def test_a_live_jobs_artifact_and_a_live_job_cannot_be_deleted(service, keys, worker, db):
    alice = service.auth(keys["alice"])
    done = _artifact(service, keys["alice"])
    with db.begin() as c:  # an attempt that runs again (a re-delivery mid-publication, say)
        c.execute(text("UPDATE jobs SET state = 'running' WHERE id = :id"), {"id": done["id"]})
    try:
        r = service.client.delete(f"/v1/artifacts/{done['artifact_id']}", headers=alice)
        assert r.status_code == 409, r.text
        assert "running" in r.json()["detail"] and done["id"] in r.json()["detail"]
        assert _folder(service, done["artifact_id"]).is_dir()
    finally:
        with db.begin() as c:
            c.execute(text("UPDATE jobs SET state = 'succeeded' WHERE id = :id"), {"id": done["id"]})

    slow = submit(service, keys["alice"], model="scripted-slow", calibration={"num_samples": 60})
    service.wait_job(slow["id"], keys["alice"], states=("running",))
    r = service.client.delete(f"/v1/jobs/{slow['id']}", headers=alice)
    assert r.status_code == 409 and "cancel" in r.json()["detail"], r.text
    service.client.post(f"/v1/jobs/{slow['id']}/cancel", headers=alice)
    assert service.wait_job(slow["id"], keys["alice"])["state"] == "canceled"
    assert service.client.delete(f"/v1/jobs/{slow['id']}", headers=alice).status_code == 204


def test_delete_job_removes_its_events_artifact_and_files(service, keys, worker, db):
    alice, bob = service.auth(keys["alice"]), service.auth(keys["bob"])
    done = _artifact(service, keys["alice"])
    assert service.client.delete(f"/v1/jobs/{done['id']}", headers=bob).status_code == 404
    r = service.client.delete(f"/v1/jobs/{done['id']}", headers=alice)
    assert r.status_code == 204, r.text
    assert service.client.get(f"/v1/jobs/{done['id']}", headers=alice).status_code == 404
    assert service.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=alice).status_code == 404
    assert not _folder(service, done["artifact_id"]).exists()
    with db.connect() as c:
        left = c.execute(text("SELECT count(*) FROM job_events WHERE job_id = :id"), {"id": done["id"]})
        assert left.scalar() == 0


def test_an_interrupted_delete_is_finished_by_the_sweep(service, keys, worker):
    """A kill between the rename into .trash and the record's deletion: the reconciler finishes it."""
    alice = service.auth(keys["alice"])
    done = _artifact(service, keys["alice"])
    trash = Path(service.env["PTQ4ARVG_ARTIFACT_DIR"]) / ".trash"
    trash.mkdir(exist_ok=True)
    _folder(service, done["artifact_id"]).rename(trash / done["artifact_id"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (trash / done["artifact_id"]).exists():
        time.sleep(0.2)
    assert not (trash / done["artifact_id"]).exists()
    assert service.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=alice).status_code == 404


def test_retention_expires_old_artifacts_only(service, keys, workers, db):
    """A worker with PTQ4ARVG_ARTIFACT_RETENTION_DAYS=1 deletes an artifact made two days ago, not a new one."""
    keeper = workers.start("retention", env={"PTQ4ARVG_ARTIFACT_RETENTION_DAYS": "1"})
    try:
        workers.wait_ready(keeper)
        old = _artifact(service, keys["alice"])
        new = _artifact(service, keys["alice"])
        with db.begin() as c:
            c.execute(
                text("UPDATE artifacts SET created_at = created_at - interval '2 days' WHERE id = :id"),
                {"id": old["artifact_id"]},
            )
        alice = service.auth(keys["alice"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if service.client.get(f"/v1/artifacts/{old['artifact_id']}", headers=alice).status_code == 404:
                break
            time.sleep(0.3)
        assert service.client.get(f"/v1/artifacts/{old['artifact_id']}", headers=alice).status_code == 404
        assert not _folder(service, old["artifact_id"]).exists()
        assert service.client.get(f"/v1/artifacts/{new['artifact_id']}", headers=alice).status_code == 200
        job = service.client.get(f"/v1/jobs/{old['id']}", headers=alice).json()
        assert job["state"] == "succeeded" and job["artifact_id"] is None  # the record of the job stays
    finally:
        from .helpers import stop_process

        stop_process(keeper)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.entry", "artifacts", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_artifacts_cli_against_the_server(service, keys, worker):
    done = _artifact(service, keys["alice"], recipe="gps")
    env = {**service.env, "PTQ4ARVG_SERVER": service.base_url, "PTQ4ARVG_TOKEN": keys["alice"]}
    listed = _cli("list", "--recipe", "gps", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert done["artifact_id"] in [a["id"] for a in json.loads(listed.stdout)]
    table = _cli("list", env=env)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["id", "model", "recipe"]
    shown = _cli("show", done["artifact_id"], env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["job_id"] == done["id"]
    assert _cli("rm", done["artifact_id"], env=env).returncode == 0
    again = _cli("show", done["artifact_id"], env=env)
    assert again.returncode == 1 and "404" in again.stderr and "Traceback" not in again.stderr
    wrong = _cli("list", env={**env, "PTQ4ARVG_TOKEN": "ptq_wrong"})
    assert wrong.returncode == 1 and "401" in wrong.stderr.splitlines()[-1]
    nobody = _cli("list", "--server", "http://127.0.0.1:1", env=env)
    assert nobody.returncode == 1 and "cannot reach" in nobody.stderr and "Traceback" not in nobody.stderr


def test_artifacts_cli_on_a_local_folder(tmp_path, service_env):
    for name, recipe, created in (
        ("a1", "rtn", "2026-12-01T00:00:00Z"),
        ("a2", "ptq4arvg", "2026-12-02T00:00:00Z"),
    ):
        (tmp_path / name).mkdir()
        manifest = {
            "format": "ptq4arvg-artifact/3",
            "model": {"name": "tiny-llamagen"},
            "recipe": {"name": recipe, "w_bits": 8, "a_bits": 8},
            "created_at": created,
            "files": {"model.safetensors": {"sha256": "0" * 64, "size": 10}},
        }
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "not-an-artifact").mkdir()
    env = {k: v for k, v in service_env.items() if k not in ("PTQ4ARVG_SERVER", "PTQ4ARVG_TOKEN")}
    listed = _cli("list", "--dir", str(tmp_path), "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [a["id"] for a in json.loads(listed.stdout)] == ["a2", "a1"]
    only = json.loads(_cli("list", "--dir", str(tmp_path), "--recipe", "rtn", "--json", env=env).stdout)
    assert [a["id"] for a in only] == ["a1"] and only[0]["model"] == "tiny-llamagen"
    assert _cli("rm", "a1", "--dir", str(tmp_path), env=env).returncode == 0
    assert not (tmp_path / "a1").exists() and (tmp_path / "a2").exists()
    refused = _cli("rm", "not-an-artifact", "--dir", str(tmp_path), env=env)
    assert refused.returncode == 1 and "not an artifact" in refused.stderr
    assert (tmp_path / "not-an-artifact").exists()
    both = _cli("list", env=env)
    assert both.returncode == 1 and "give one of --server" in both.stderr
