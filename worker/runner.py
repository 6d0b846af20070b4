"""What a worker does with a job id: claim it, run the engine, publish the artifact, record the end.

Everything here is safe under duplicate delivery:
- the claim is a compare-and-set (queued -> running, or running -> running when the previous
  attempt's heartbeat is older than the lease), and every later write checks the attempt number;
- the engine writes into a private staging folder; the transaction that marks the job succeeded
  records the artifact, then one os.replace moves the folder into place (worker/disk.py: a kill in
  between is finished by the next worker's sweep);
- a delivery for a finished job, or for a job another live worker holds, does nothing (if that
  worker dies, the reconciler of a live one queues the job again: worker/reconciler.py).

The engine (worker.engine: ``quantcore.api`` unless settings say otherwise) is imported lazily,
inside the task, so no torch code runs in a process before the worker forks. Jobs run on the device
the settings name (``PTQ4ARVG_DEVICE``, auto = the first visible CUDA device).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings
from app.db import jobs
from app.db.models import TERMINAL_STATES, utcnow
from app.db.session import session_scope
from app.storage import sha256_file
from worker import disk
from worker.engine import EngineUnavailable, load_engine

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_S = 0.5
PROGRESS_REFRESH_S = 1.0
CANCEL_CHECK_INTERVAL_S = 0.2


class _JobFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def run_job(job_id: str, *, settings: Settings, worker_name: str) -> str:
    url = settings.database_url
    with session_scope(url) as session:
        job = jobs.get_job(session, job_id)
        if job is None:
            log.error("job %s does not exist; dropping the task", job_id)
            return "missing"
        if job.state in TERMINAL_STATES:
            log.info("job %s is already %s; nothing to do", job_id, job.state)
            return f"noop:{job.state}"
        if job.state == "queued":
            if job.cancel_requested:
                jobs.transition(session, job_id, ("queued",), "canceled", message="canceled before start")
                return "canceled"
            attempt = jobs.claim_job(
                session,
                job_id,
                expected_state="queued",
                expected_attempt=job.attempt,
                worker=worker_name,
                message="started",
            )
        else:
            age = (utcnow() - (job.heartbeat_at or job.updated_at)).total_seconds()
            if age < settings.job_lease_seconds:
                log.info("job %s is held by %s (heartbeat %.0fs ago); nothing to do", job_id, job.worker, age)
                return f"busy:{job.worker}"
            attempt = jobs.claim_job(
                session,
                job_id,
                expected_state="running",
                expected_attempt=job.attempt,
                worker=worker_name,
                message=(
                    f"taken over: attempt {job.attempt} on {job.worker} sent no heartbeat for {age:.0f}s "
                    "(worker lost); restarting from the beginning"
                ),
            )
        if attempt is None:  # another delivery won the race
            return "busy"
        engine_spec = dict(job.engine_spec)
        owner = job.owner
        checkpoint_sha256 = job.checkpoint_sha256
    return _Execution(settings, job_id, attempt, worker_name).run(engine_spec, owner, checkpoint_sha256)


def fail_unclaimed(settings: Settings, job_id: str, error: Exception) -> None:
    """Record an internal failure on a job that is still queued (the error came before its claim)."""
    message = (
        f"internal error before the job started: {type(error).__name__}: {error}. "
        "The traceback is in the worker log; please report it."
    )
    try:
        with session_scope(settings.database_url) as session:
            jobs.transition(
                session,
                job_id,
                ("queued",),
                "failed",
                error_kind="internal",
                error_message=message,
                message=message,
            )
    except Exception:
        log.exception("could not record the failure of job %s", job_id)


class _Execution:
    def __init__(self, settings: Settings, job_id: str, attempt: int, worker_name: str):
        self.settings = settings
        self.url = settings.database_url
        self.job_id = job_id
        self.attempt = attempt
        self.worker = worker_name
        self.lost = threading.Event()
        self.stage = "starting"
        self.stage_started = utcnow()
        self.started = time.monotonic()
        self.overall = 0.0
        self.stage_fraction = 0.0
        self._last_progress_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel_seen = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ callbacks given to the engine

    def progress(self, stage: str, fraction: float, overall: float | None = None) -> None:
        """The engine's report: the stage, its fraction and the job's overall fraction (the ETA's base)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        overall = self.overall if overall is None else min(max(float(overall), self.overall), 1.0)
        now = time.monotonic()
        with self._lock:
            changed = stage != self.stage
            if changed:
                self.stage, self.stage_started = stage, utcnow()
            if not changed and now - self._last_progress_write < PROGRESS_MIN_INTERVAL_S and fraction < 1.0:
                return
            self._last_progress_write, self.overall, self.stage_fraction = now, overall, fraction
            elapsed = time.monotonic() - self.started
            eta = elapsed * (1.0 - overall) / overall if overall > 0 else None
            try:
                with session_scope(self.url) as session:
                    owned = jobs.update_progress(
                        session,
                        self.job_id,
                        self.attempt,
                        stage=stage[:64],
                        stage_progress=fraction,
                        progress=overall,
                        eta_seconds=eta,
                        stage_started_at=self.stage_started,
                        stage_changed=changed,
                    )
            except SQLAlchemyError as e:  # the database is away: keep working, the lease decides
                log.warning("job %s: progress not recorded (%s)", self.job_id, type(e).__name__)
                return
        if not owned:
            self.lost.set()

    def should_cancel(self) -> bool:
        if self.lost.is_set() or self._cancel_seen:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_INTERVAL_S:
            return False
        self._last_cancel_check = now
        try:
            with session_scope(self.url) as session:
                self._cancel_seen = jobs.should_stop(session, self.job_id, self.attempt)
        except SQLAlchemyError as e:  # the database is away: keep working, the lease decides
            log.warning("job %s: cancel flag not read (%s)", self.job_id, type(e).__name__)
        return self._cancel_seen

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Every second the record's progress (and so its ETA and heartbeat) is refreshed, also while
        one engine step runs long between its reports; the bare heartbeat covers a database hiccup."""
        interval = max(0.2, self.settings.job_lease_seconds / 3.0)
        last_beat = time.monotonic()
        while not stop.wait(PROGRESS_REFRESH_S):
            if time.monotonic() - self._last_progress_write >= PROGRESS_REFRESH_S:
                self.progress(self.stage, self.stage_fraction)
            if self.lost.is_set():
                return
            if time.monotonic() - last_beat < interval:
                continue
            last_beat = time.monotonic()
            try:
                with session_scope(self.url) as session:
                    if not jobs.heartbeat(session, self.job_id, self.attempt):
                        self.lost.set()
                        return
            except Exception:
                log.exception("heartbeat of job %s failed", self.job_id)

    # ---------------------------------------------------------------------------------- the run

    def run(self, engine_spec: dict[str, Any], owner: str, checkpoint_sha256: str | None) -> str:
        root = Path(self.settings.artifact_dir)
        staging = disk.staging_folder(root, self.job_id, self.attempt)
        staging.parent.mkdir(parents=True, exist_ok=True)
        disk.clear_staging(root, self.job_id)  # from attempts that died

        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(stop,), daemon=True)
        beat.start()
        try:
            try:
                outcome = self._run_engine(engine_spec, owner, checkpoint_sha256, root, staging)
            except _Canceled:
                outcome = self._end_canceled()
            except _JobFailed as e:
                outcome = self._end_failed(e.kind, e.message)
            except Exception as e:  # an internal failure: a bug, OOM, a broken install
                log.exception("job %s failed with an internal error", self.job_id)
                outcome = self._end_failed(
                    "internal",
                    f"internal error during stage '{self.stage}': {type(e).__name__}: {e}. "
                    f"The traceback is in the log of worker {self.worker} (job {self.job_id}, "
                    f"attempt {self.attempt}); the same spec will likely fail again, please report it.",
                )
        finally:
            stop.set()
            beat.join(timeout=5)
            shutil.rmtree(staging, ignore_errors=True)
        return outcome

    def _run_engine(
        self,
        engine_spec: dict[str, Any],
        owner: str,
        checkpoint_sha256: str | None,
        root: Path,
        staging: Path,
    ) -> str:
        errors = _engine_errors()
        try:
            engine = load_engine(self.settings.engine_module)
        except EngineUnavailable as e:
            raise _JobFailed(
                "engine_unavailable",
                f"{e} on worker {self.worker}; install the ptq4arvg package with its engine on the worker.",
            ) from e
        try:
            device = engine.describe_device(self.settings.device)
        except errors.user as e:  # e.g. PTQ4ARVG_DEVICE=cuda on a worker without a GPU
            raise _JobFailed("DeviceError", f"worker {self.worker}: {e}") from e
        with session_scope(self.url) as session:
            if not jobs.set_device(session, self.job_id, self.attempt, device):
                return "lost"

        if engine_spec.get("checkpoint") and checkpoint_sha256:
            self.progress("verifying checkpoint", 0.0)
            _verify_checkpoint(Path(engine_spec["checkpoint"]), checkpoint_sha256)

        if self.should_cancel():
            raise _Canceled
        try:
            manifest = engine.quantize_job(
                engine_spec, staging, self.progress, self.should_cancel, device=device["device"]
            )
        except errors.canceled as e:
            raise _Canceled from e
        except errors.user as e:
            raise _JobFailed(type(e).__name__, str(e) or type(e).__name__) from e
        if self.lost.is_set():
            return "lost"

        files = _list_files(staging)
        manifest = json.loads(json.dumps(manifest or {}, default=str))
        artifact_id = disk.artifact_id_for(self.job_id, self.attempt)
        with session_scope(self.url) as session:
            ok = jobs.finish_succeeded(
                session,
                self.job_id,
                self.attempt,
                worker=self.worker,
                artifact_id=artifact_id,
                owner=owner,
                path=artifact_id,
                manifest=manifest,
                files=files,
                metrics={**(manifest.get("metrics") or {}), "timings": self._timings(manifest)},
            )
        if not ok:  # someone else owns the job now: our staging folder is removed on the way out
            return "lost"
        disk.publish(staging, root, artifact_id)
        return "succeeded"

    def _timings(self, manifest: dict[str, Any]) -> dict[str, float] | None:
        """The engine's seconds per stage, and the whole attempt's on this worker (write included)."""
        if "timings" not in manifest:
            return None
        return {**manifest["timings"], "total": round(time.monotonic() - self.started, 3)}

    def _end_canceled(self) -> str:
        if self.lost.is_set():
            return "lost"
        with session_scope(self.url) as session:
            ok = jobs.transition(
                session,
                self.job_id,
                ("running",),
                "canceled",
                expected_attempt=self.attempt,
                actor=self.worker,
                message=f"canceled on request during stage '{self.stage}'",
            )
        return "canceled" if ok else "lost"

    def _end_failed(self, kind: str, message: str) -> str:
        with session_scope(self.url) as session:
            ok = jobs.transition(
                session,
                self.job_id,
                ("running",),
                "failed",
                expected_attempt=self.attempt,
                actor=self.worker,
                message=message,
                error_kind=kind[:64],
                error_message=message,
            )
        return "failed" if ok else "lost"


class _Canceled(Exception):
    pass


@dataclasses.dataclass
class _EngineErrors:
    canceled: type[BaseException] | tuple
    user: type[BaseException] | tuple


def _engine_errors() -> _EngineErrors:
    try:
        from quantcore.errors import Canceled, QuantcoreError
    except ImportError:
        return _EngineErrors(canceled=(), user=())
    return _EngineErrors(canceled=Canceled, user=QuantcoreError)


def _verify_checkpoint(path: Path, expected: str) -> None:
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise _JobFailed(
            "CheckpointError",
            f"checkpoint {path} cannot be read on this worker ({e}); make it readable here or register "
            "a copy that is.",
        ) from e
    if actual != expected:
        raise _JobFailed(
            "CheckpointError",
            f"checkpoint {path} changed since it was registered (sha256 {actual[:12]}…, registered "
            f"{expected[:12]}…); register it again with POST /v1/models.",
        )


def _list_files(folder: Path) -> list[dict[str, Any]]:
    if not folder.is_dir():
        raise RuntimeError(f"the engine returned without writing its output folder {folder}")
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            files.append({"name": entry.name, "size": entry.stat().st_size, "sha256": sha256_file(entry)})
        else:
            log.warning("artifact entry %s is not a plain file; it will not be downloadable", entry)
    return files
