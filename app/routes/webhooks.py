from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from app import schemas, webhooks
from app.deps import SettingsDep
from app.security import JobsPrincipal

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=schemas.error_responses(401, 403))


@router.get(
    "/default/secret",
    response_model=schemas.WebhookSecret,
    responses={404: {"model": schemas.ErrorOut, "description": "This server signs no webhooks."}},
)
def webhook_secret(settings: SettingsDep, principal: JobsPrincipal) -> schemas.WebhookSecret:
    """The secret that signs your jobs' webhook calls (the same path as Replicate's). Verify a call by
    computing base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}")), key = the base64
    after `whsec_`, and comparing it with the `v1,` value of its `webhook-signature` header."""
    if not settings.webhook_secret:  # a deployment setting, not an outage: there is no secret to show
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail="this server signs no webhooks: its operator sets PTQ4ARVG_WEBHOOK_SECRET to enable them",
        )
    return schemas.WebhookSecret(key=webhooks.owner_secret(settings.webhook_secret, principal.owner))
