from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from app import schemas, webhooks
from app.deps import SettingsDep
from app.security import JobsPrincipal

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=schemas.error_responses(401, 403))


@router.get(
    "/default/secret",
    response_model=schemas.WebhookSecret,
    responses={503: {"model": schemas.ErrorOut, "description": "This server signs no webhooks."}},
)
def webhook_secret(settings: SettingsDep, principal: JobsPrincipal) -> schemas.WebhookSecret:
    """The secret that signs your jobs' webhook calls (the same path as Replicate's). Verify a call by
    computing base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}")), key = the base64
    after `whsec_`, and comparing it with the `v1,` value of its `webhook-signature` header."""
    if not settings.webhook_secret:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="this server signs no webhooks: set PTQ4ARVG_WEBHOOK_SECRET",
        )
    return schemas.WebhookSecret(key=webhooks.owner_secret(settings.webhook_secret, principal.owner))
