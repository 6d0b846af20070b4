"""The dashboard's session: a signed cookie holding the API key a person logged in with, and CSRF tokens.

The cookie is ``base64url(payload).base64url(HMAC-SHA256(secret, payload))`` with the payload
``{"n": nonce, "k": api key or null, "e": expiry}``. It is HttpOnly (scripts never see the key),
SameSite=Strict and Secure on https. Every visitor gets a session, anonymous until login, so the
login form is CSRF-protected too; login and logout start a new nonce (no session fixation).
A form's CSRF token is HMAC(secret, nonce): tied to the session, checked on every POST.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import time

from fastapi import HTTPException, Request, Response, status

from app.config import Settings

log = logging.getLogger(__name__)

COOKIE = "ptq4arvg_session"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf_token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_of(request: Request) -> bytes:
    """The signing secret: PTQ4ARVG_SESSION_SECRET, else one made for this process (sessions then end
    when it restarts and do not carry between API replicas; a warning says so once)."""
    state = request.app.state
    if not hasattr(state, "session_secret"):
        settings: Settings = state.settings
        if settings.session_secret:
            state.session_secret = settings.session_secret.encode()
        else:
            log.warning(
                "PTQ4ARVG_SESSION_SECRET is not set: dashboard sessions are signed with a per-process "
                "secret and end when this process restarts"
            )
            state.session_secret = secrets.token_bytes(32)
    return state.session_secret


def lifetime_s(settings: Settings) -> int:
    return int(settings.session_hours * 3600)


@dataclasses.dataclass
class WebSession:
    nonce: str
    api_key: str | None
    expires: int
    secret: bytes
    changed: bool = False  # the cookie must be (re)written on the response

    def _sign(self, data: bytes) -> str:
        return _b64(hmac.new(self.secret, data, hashlib.sha256).digest())

    @property
    def csrf_token(self) -> str:
        return self._sign(b"csrf:" + self.nonce.encode())

    def check_csrf(self, token: str | None) -> None:
        if not token or not hmac.compare_digest(token, self.csrf_token):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail="the form's CSRF token is missing or does not belong to this session; reload the "
                "page and submit it again",
            )

    def restart(self, api_key: str | None, lifetime_s: int) -> None:
        """A fresh session (new nonce, so new CSRF tokens) holding ``api_key``."""
        self.nonce = secrets.token_urlsafe(16)
        self.api_key = api_key
        self.expires = int(time.time()) + lifetime_s
        self.changed = True

    def cookie_value(self) -> str:
        payload = json.dumps({"n": self.nonce, "k": self.api_key, "e": self.expires}).encode()
        return f"{_b64(payload)}.{self._sign(payload)}"

    def write(self, request: Request, response: Response) -> None:
        if not self.changed:
            return
        response.set_cookie(
            COOKIE,
            self.cookie_value(),
            max_age=max(0, self.expires - int(time.time())),
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def load(request: Request) -> WebSession:
    """The request's session; a new anonymous one when the cookie is absent, forged, stale or expired."""
    secret = secret_of(request)
    lifetime = lifetime_s(request.app.state.settings)
    raw = request.cookies.get(COOKIE, "")
    session = WebSession("", None, 0, secret)
    payload_text, _, signature = raw.partition(".")
    try:
        payload = _unb64(payload_text)
        if hmac.compare_digest(_unb64(signature), _unb64(session._sign(payload))):
            data = json.loads(payload)
            if int(data["e"]) > time.time():
                return WebSession(str(data["n"]), data["k"], int(data["e"]), secret)
    except (binascii.Error, ValueError, KeyError, TypeError):
        pass  # an unreadable cookie is no session
    session.restart(None, lifetime)
    return session
