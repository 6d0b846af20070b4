"""The Celery worker as a real process: ping, the job lifecycle, cancel, failures, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select

from app.db import jobs
from app.db.models import Artifact, Job, JobEvent
from app.db.session import session_scope
from worker import runner
from worker.celery_app import TASK_PING, TASK_RUN_JOB, make_celery

from .helpers import service_settings, sha256, submit


def staging_entries(service) -> list[Path]:
    staging = Path(service.env["PTQ4ARVG_ARTIFACT_DIR"]) / ".staging"
    return list(staging.iterdir()) if staging.exists() else []


def test_ping_task_runs_in_a_real_worker(service_env, worker):
    celery = make_celery(service_settings(service_env))
    result = celery.send_task(TASK_PING, queue=service_env["PTQ4ARVG_QUEUE"])
    answer = result.get(timeout=30)
    assert answer["pong"] is True
    assert answer["torch_imported"] is False  # nothing imported torch in the worker
    # solo pool: the task runs in a worker process itself, not in a pool child forked from one (another
    # worker of this test session may be the one that answered)
    parent = Path(f"/proc/{answer['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1]
    assert b"app.worker_cmd" in Path(f"/proc/{answer['pid']}/cmdline").read_bytes()
    assert b"app.worker_cmd" not in Path(f"/proc/{parent}/cmdline").read_bytes()


def test_job_succeeds_with_progress_events_and_a_verified_artifact(service, keys, worker):
    job = submit(service, keys["alice"], model="scripted-fast", w_bits=8, a_bits=8)
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == {
        "stage": "done",
        "stage_percent": 100.0,
        "percent": 100.0,
        "eta_seconds": None,
        "heartbeat_at": done["progress"]["heartbeat_at"],
    }
    assert done["metrics"] == {"proxy_fid": 1.23, "token_agreement": 0.98, "timings": None}
    assert done["device"] == {"device": "cpu", "name": "scripted"}  # the engine's answer for "auto"
    assert done["attempt"] == 1 and done["worker"].endswith("@" + os.uname().nodename)
    assert [(e["from_state"], e["to_state"]) for e in done["events"]] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert done["started_at"] <= done["finished_at"]

    art = service.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=service.auth(keys["alice"]))
    assert art.status_code == 200
    body = art.json()
    assert body["job_id"] == job["id"] and body["manifest"]["w_bits"] == 8
    assert {f["name"] for f in body["files"]} == {"manifest.json", "model.safetensors"}
    for entry in body["files"]:
        r = service.client.get(entry["url"], headers=service.auth(keys["alice"]))
        assert r.status_code == 200
        assert sha256(r.content) == entry["sha256"] == r.headers["x-content-sha256"]
        assert len(r.content) == entry["size"]
    manifest = service.client.get(
        f"/v1/artifacts/{done['artifact_id']}/files/manifest.json", headers=service.auth(keys["alice"])
    ).json()
    assert manifest == body["manifest"]
    assert staging_entries(service) == []


def test_progress_and_eta_are_visible_while_running(service, keys, worker):
    job = submit(service, keys["alice"], model="scripted-slow", calibration={"num_samples": 30})
    deadline = time.monotonic() + 20
    seen = None
    while time.monotonic() < deadline:
        seen = service.client.get(f"/v1/jobs/{job['id']}", headers=service.auth(keys["alice"])).json()
        if seen["state"] == "running" and seen["progress"]["percent"] > 10:
            break
        time.sleep(0.1)
    assert seen["state"] == "running", seen
    assert seen["progress"]["stage"] == "calibration"
    assert 0 < seen["progress"]["percent"] < 100
    assert seen["progress"]["eta_seconds"] is not None and 0 < seen["progress"]["eta_seconds"] < 10
    assert service.wait_job(job["id"], keys["alice"])["state"] == "succeeded"


def test_user_error_is_recorded_with_its_message(service, keys, worker):
    job = submit(service, keys["alice"], model="scripted-usererror", w_bits=4)
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "failed"
    assert done["error"]["kind"] == "ConfigError"
    assert "use w_bits=8" in done["error"]["message"]
    assert done["events"][-1]["to_state"] == "failed" and "use w_bits=8" in done["events"][-1]["message"]
    assert done["artifact_id"] is None


def test_internal_error_is_recorded_actionably(service, keys, worker):
    job = submit(service, keys["alice"], model="scripted-crash")
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "failed"
    assert done["error"]["kind"] == "internal"
    message = done["error"]["message"]
    assert "RuntimeError" in message and "scripted crash" in message
    assert "worker" in message and job["id"] in message  # where to find the traceback


def test_cancel_running_job_within_5s_leaves_no_partial_artifact(service, keys, worker):
    root = Path(service.env["PTQ4ARVG_ARTIFACT_DIR"])
    before = {p.name for p in root.iterdir()}
    job = submit(service, keys["alice"], model="scripted-slow", calibration={"num_samples": 300})
    service.wait_job(job["id"], keys["alice"], states=("running",), timeout=20)
    time.sleep(0.5)
    t0 = time.monotonic()
    r = service.client.post(f"/v1/jobs/{job['id']}/cancel", headers=service.auth(keys["alice"]))
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    done = service.wait_job(job["id"], keys["alice"], timeout=5)
    assert time.monotonic() - t0 < 5
    assert done["state"] == "canceled" and done["artifact_id"] is None
    assert "canceled on request" in done["events"][-1]["message"]
    assert {p.name for p in root.iterdir()} == before
    assert staging_entries(service) == []


def test_redelivered_task_for_a_finished_job_does_nothing(service, service_env, keys, worker):
    job = submit(service, keys["alice"], model="scripted-fast")
    done = service.wait_job(job["id"], keys["alice"])
    celery = make_celery(service_settings(service_env))
    result = celery.send_task(TASK_RUN_JOB, args=[job["id"]], queue=service_env["PTQ4ARVG_QUEUE"])
    assert result.get(timeout=30) == "noop:succeeded"
    again = service.client.get(f"/v1/jobs/{job['id']}", headers=service.auth(keys["alice"])).json()
    assert again["events"] == done["events"] and again["attempt"] == 1
    assert again["artifact_id"] == done["artifact_id"]


def busy_worker(service, token, workers, seed: int) -> tuple[dict, subprocess.Popen]:
    """With two workers alive, a slow job past 5 %: the job as seen then, and the worker running it."""
    workers.ensure(count=2)
    job = submit(service, token, model="scripted-slow", calibration={"num_samples": 30, "seed": seed})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = service.client.get(f"/v1/jobs/{job['id']}", headers=service.auth(token)).json()
        if seen["state"] == "running" and seen["progress"]["percent"] > 5:
            return seen, workers.by_node(seen["worker"])
        time.sleep(0.1)
    raise AssertionError(f"job {job['id']} not running past 5% after 20s: {seen}")


def test_kill_9_of_a_busy_worker_the_other_live_worker_completes_it_exactly_once(
    service, service_env, keys, workers, pg_url
):
    seed = 777_001
    seen, victim = busy_worker(service, keys["alice"], workers, seed)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.monotonic()

    done = service.wait_job(seen["id"], keys["alice"], timeout=60)
    lease = float(service_env["PTQ4ARVG_JOB_LEASE_SECONDS"])
    assert done["state"] == "succeeded", done
    assert time.monotonic() - killed_at < lease + 30
    assert done["attempt"] == 2 and done["worker"] != seen["worker"]
    transitions = [(e["from_state"], e["to_state"]) for e in done["events"]]
    assert transitions == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert "lease expired" in done["events"][2]["message"] and seen["worker"] in done["events"][2]["message"]

    runs = [json.loads(line) for line in Path(service_env["SCRIPTED_ENGINE_LOG"]).read_text().splitlines()]
    assert sum(1 for r in runs if r["seed"] == seed) == 1  # the engine completed once
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == seen["id"])) == 1
        succeeded = (
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == seen["id"], JobEvent.to_state == "succeeded")
        )
        assert c.scalar(succeeded) == 1
    engine.dispose()
    # the killed attempt's staging folder is gone (removed when the next attempt started)
    assert [p for p in staging_entries(service) if seen["id"] in p.name] == []
    # Redis re-delivers the killed worker's message after the visibility timeout: it must be a no-op.
    time.sleep(float(service_env["PTQ4ARVG_VISIBILITY_TIMEOUT"]) + 2)
    final = service.client.get(f"/v1/jobs/{seen['id']}", headers=service.auth(keys["alice"])).json()
    assert final["events"] == done["events"]


def test_claims_are_compare_and_set(service_env, keys):
    """In-process, against PostgreSQL: of two claims of one queued job, exactly one wins."""
    settings = service_settings(service_env)
    with session_scope(settings.database_url) as db:
        job = jobs.create_job(
            db,
            owner="alice",
            spec={"model": "scripted-fast", "recipe": "rtn", "w_bits": 8},
            recipe="rtn",
            engine_spec={"model": "scripted-fast"},
        )
        first = jobs.claim_job(db, job.id, expected_state="queued", expected_attempt=0, worker="a")
        second = jobs.claim_job(db, job.id, expected_state="queued", expected_attempt=0, worker="b")
        assert (first, second) == (1, None)
        assert not jobs.transition(db, job.id, ("running",), "succeeded", expected_attempt=0)
        assert jobs.transition(db, job.id, ("running",), "failed", expected_attempt=1, error_message="x")
        assert not jobs.transition(db, job.id, ("running",), "canceled", expected_attempt=1)
        events = [(e.from_state, e.to_state) for e in jobs.list_events(db, job.id)]
        assert events == [(None, "queued"), ("queued", "running"), ("running", "failed")]


def test_cancel_of_a_queued_job_wins_over_a_later_delivery(service_env):
    settings = service_settings(service_env)
    with session_scope(settings.database_url) as db:
        job = jobs.create_job(
            db,
            owner="alice",
            spec={"model": "scripted-fast", "recipe": "rtn", "w_bits": 8},
            recipe="rtn",
            engine_spec={"model": "scripted-fast"},
        )
        assert jobs.request_cancel(db, job).state == "canceled"
    assert runner.run_job(job.id, settings=settings, worker_name="inproc") == "noop:canceled"
    with session_scope(settings.database_url) as db:
        stored = db.scalar(select(Job).where(Job.id == job.id))
        assert stored.state == "canceled" and stored.attempt == 0
