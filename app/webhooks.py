"""Webhooks as Replicate sends them, signed as Standard Webhooks specifies.

A job spec may name a `webhook` URL and a `webhook_events_filter` (default: every event):
- ``start``: a worker started the job (again after a lost worker);
- ``output``: the job entered a new stage (calibration-pool, quantize, evaluate, write, ...);
- ``logs``: a state change that is neither (a job queued again after its worker was lost);
- ``completed``: the job ended: succeeded (with its artifact), failed or canceled.

The body is ``{"event": ..., "job": <the job as GET /v1/jobs/{id} shows it to its owner>}``, rendered
when the event happens and sent as is on every retry. Each call carries ``webhook-id`` (the same on
every retry: receivers drop duplicates), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``:
``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")) where key is the base64 part of the
owner's secret ``whsec_...`` (GET /v1/webhooks/default/secret). Each owner's secret is derived from the
deployment's PTQ4ARVG_WEBHOOK_SECRET, so no owner can sign calls to another's receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from sqlalchemy.orm import Session

EVENTS = ("start", "output", "logs", "completed")
SECRET_PREFIX = "whsec_"


def wants(spec: dict[str, Any], event: str) -> bool:
    """Whether a job of this spec reports ``event`` to a webhook."""
    if not spec.get("webhook"):
        return False
    chosen = spec.get("webhook_events_filter")
    return event in (EVENTS if chosen is None else chosen)


def body_of(session: Session, job, event: str) -> str:
    """The call's body: the event and the job as its owner sees it (a non-admin view: redacted)."""
    from app import redact, services
    from app.security import Principal

    owner_view = Principal(key_id=0, owner=job.owner, scopes=frozenset())
    out = redact.job(services.job_out(job), redact.secrets_of(session, job, owner_view))
    return json.dumps({"event": event, "job": out.model_dump(mode="json")}, separators=(",", ":"))


def owner_secret(deployment_secret: str, owner: str) -> str:
    """The signing secret of ``owner``'s webhooks (``whsec_`` + base64 of a 32-byte key)."""
    key = hmac.new(deployment_secret.encode(), f"ptq4arvg-webhook:{owner}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(key).decode()


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.{body}".encode()
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(secret: str, message_id: str, timestamp: int, body: str, event: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "ptq4arvg-webhooks",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
        "webhook-event": event,
    }
