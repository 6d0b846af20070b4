"""The workers' webhook delivery thread: sends the outbox's due calls (app/db/webhooks.py), retrying
failures with exponential backoff. It runs beside the job task and never touches a job, so a
receiver that is slow, down or failing cannot delay or fail a job. A worker killed mid-call leaves
its claim to run out; another worker (or this one restarted) sends the call again."""

from __future__ import annotations

import logging
import threading
import time

import httpx

from app import webhooks
from app.config import Settings
from app.db import jobs
from app.db import webhooks as outbox
from app.db.models import WebhookDelivery
from app.db.session import session_scope

log = logging.getLogger(__name__)

POLL_S = 0.5
BATCH = 16
MAX_BACKOFF_S = 3600.0


def backoff_seconds(settings: Settings, attempts_made: int) -> float:
    """Wait before the next try after ``attempts_made`` failed ones: 1x, 2x, 4x, ... the base, capped."""
    return min(settings.webhook_retry_seconds * 2 ** (attempts_made - 1), MAX_BACKOFF_S)


class WebhookSender:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_timeout_seconds + 1)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.send_due()
            except Exception as e:  # the database is down: try again on the next tick
                log.warning("webhook delivery failed: %s: %s", type(e).__name__, e)
                sent = 0
            if not sent:
                self._stop.wait(POLL_S)

    def send_due(self) -> int:
        """Send the calls due now (those this worker claims); how many it tried."""
        url = self.settings.database_url
        with session_scope(url) as session:
            candidates = outbox.due(session, limit=BATCH)
        tried = 0
        for delivery in candidates:
            with session_scope(url) as session:
                hold = self.settings.webhook_timeout_seconds + 30
                if not outbox.claim(session, delivery, hold_seconds=hold):
                    continue  # another worker took it
            self._attempt(delivery)
            tried += 1
        return tried

    def _attempt(self, delivery: WebhookDelivery) -> None:
        if not self.settings.webhook_secret:
            status, error = None, "this worker has no PTQ4ARVG_WEBHOOK_SECRET to sign with"
        else:
            status, error = self._post(delivery)
        attempts = delivery.attempts + 1
        retry = None
        if error is not None and attempts < self.settings.webhook_max_attempts:
            retry = backoff_seconds(self.settings, attempts)
        if error is not None:
            outcome = f"retry in {retry:.1f}s" if retry is not None else "given up"
            log.warning(
                "webhook %s of job %s to %s, attempt %d: %s; %s",
                delivery.event,
                delivery.job_id,
                delivery.url,
                attempts,
                error,
                outcome,
            )
        with session_scope(self.settings.database_url) as session:
            outbox.record_attempt(session, delivery.id, status=status, error=error, retry_in_seconds=retry)

    def _post(self, delivery: WebhookDelivery) -> tuple[int | None, str | None]:
        """(HTTP status, error or None when the receiver took it: any 2xx)."""
        job = _owner_of(self.settings, delivery.job_id)
        if job is None:
            return None, "the job was deleted"
        secret = webhooks.owner_secret(self.settings.webhook_secret, job)
        headers = webhooks.headers(
            secret, f"{delivery.job_id}.{delivery.id}", int(time.time()), delivery.body, delivery.event
        )
        try:
            response = self._client.post(delivery.url, content=delivery.body.encode(), headers=headers)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"the receiver answered {response.status_code}"


def _owner_of(settings: Settings, job_id: str) -> str | None:
    with session_scope(settings.database_url) as session:
        job = jobs.get_job(session, job_id)
        return job.owner if job is not None else None
