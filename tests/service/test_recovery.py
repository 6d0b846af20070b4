"""Recovery by the live workers' reconcilers: split brain, lost broker messages, a broker that is down
at submission, cancel of an orphaned job, and the disk a killed worker leaves behind."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path

import httpx
from sqlalchemy import update

from app.db import jobs
from app.db.models import Job
from app.db.session import session_scope
from worker import disk

from .helpers import running_server, service_settings, submit
from .test_worker import busy_worker


def engine_runs(service_env, seed: int) -> int:
    lines = Path(service_env["SCRIPTED_ENGINE_LOG"]).read_text().splitlines()
    return sum(1 for line in lines if json.loads(line)["seed"] == seed)


def new_job(service_env, model: str = "scripted-fast", seed: int = 0) -> str:
    """A job in the database only, as if its broker message had been lost."""
    with session_scope(service_settings(service_env).database_url) as db:
        spec = {"model": model, "recipe": "rtn", "w_bits": 8, "a_bits": 8}
        engine_spec = {**spec, "calibration": {"num_samples": 20, "seed": seed}}
        return jobs.create_job(db, owner="alice", spec=spec, recipe="rtn", engine_spec=engine_spec).id


def test_split_brain_a_stopped_worker_that_resumes_does_not_duplicate(service, service_env, keys, workers):
    seed = 881_001
    seen, frozen = busy_worker(service, keys["alice"], workers, seed)
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        done = service.wait_job(seen["id"], keys["alice"], timeout=60)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    assert done["state"] == "succeeded" and done["worker"] != seen["worker"], done
    time.sleep(2)  # the resumed worker finds it lost the job and stops
    final = service.client.get(f"/v1/jobs/{seen['id']}", headers=service.auth(keys["alice"])).json()
    assert final["events"] == done["events"] and final["artifact_id"] == done["artifact_id"]
    assert engine_runs(service_env, seed) == 1
    assert frozen.poll() is None  # it lives on, and takes jobs again


def test_a_queued_job_whose_message_was_lost_is_sent_again(service, service_env, keys, workers):
    workers.ensure()
    job_id = new_job(service_env, seed=881_002)
    done = service.wait_job(job_id, keys["root"], timeout=30)
    assert done["state"] == "succeeded", done
    assert engine_runs(service_env, 881_002) == 1


def test_submission_with_the_broker_down_fails_fast_and_the_job_is_kept(service_env, run_dir, keys, workers):
    workers.ensure()  # its reconciler reaches the real broker
    env = {**service_env, "PTQ4ARVG_BROKER_URL": "redis://127.0.0.1:1/0"}
    with running_server(env, run_dir / "uvicorn-nobroker.log") as down:
        spec = {"model": "scripted-fast", "calibration": {"seed": 881_003}}
        t0 = time.monotonic()
        r = down.client.post("/v1/jobs", json=spec, headers=down.auth(keys["alice"]))
        elapsed = time.monotonic() - t0
        assert r.status_code == 503 and elapsed <= 2.0, (r.status_code, elapsed, r.text)
        assert "do not submit it again" in r.json()["detail"] and r.headers["retry-after"]
        location = r.headers["location"]
        # the job was kept: the reconciler of a worker that reaches the broker sends it
        job_id = location.rsplit("/", 1)[-1]
        done = down.wait_job(job_id, keys["alice"], timeout=30)
    assert done["state"] == "succeeded", done


def test_cancel_ends_a_job_whose_worker_is_gone(service, service_env, keys):
    settings = service_settings(service_env)
    job_id = new_job(service_env, model="scripted-slow")
    with session_scope(settings.database_url) as db:
        assert jobs.claim_job(db, job_id, expected_state="queued", expected_attempt=0, worker="ghost@nowhere")
        old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        db.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))
        db.commit()
    t0 = time.monotonic()
    r = service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.auth(keys["root"]))
    assert r.status_code == 202, r.text
    done = service.wait_job(job_id, keys["root"], timeout=5)
    assert done["state"] == "canceled" and time.monotonic() - t0 < 5
    assert "canceled" in done["events"][-1]["message"]


def test_the_sweep_removes_dead_staging_and_finishes_a_publication(service, service_env, keys, workers):
    """What a kill leaves at each instant: staging of a dead attempt (with the engine's temp folder),
    and an artifact committed in the database whose folder was not yet moved into place."""
    workers.ensure()
    root = Path(service_env["PTQ4ARVG_ARTIFACT_DIR"])
    dead = new_job(service_env, model="scripted-usererror")  # ends failed quickly when it is run
    leftovers = [disk.staging_folder(root, dead, 7), root / disk.STAGING / f".{dead}.7.k2j3h4"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")

    job = submit(service, keys["alice"], model="scripted-fast", calibration={"seed": 881_004})
    done = service.wait_job(job["id"], keys["alice"])
    artifact = root / done["artifact_id"]
    assert done["artifact_id"] == disk.artifact_id_for(job["id"], done["attempt"])
    unmoved = disk.staging_folder(root, job["id"], done["attempt"])
    os.replace(artifact, unmoved)  # as if killed between the commit and the rename

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not artifact.is_dir() or any(p.exists() for p in leftovers)):
        time.sleep(0.2)
    assert artifact.is_dir() and not unmoved.exists()
    assert not any(p.exists() for p in leftovers)
    files = service.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=service.auth(keys["alice"]))
    for entry in files.json()["files"]:
        assert (
            httpx.get(service.base_url + entry["url"], headers=service.auth(keys["alice"])).status_code == 200
        )
