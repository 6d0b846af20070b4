"""What is refused before any route runs, and how a refusal is written.

- Bodies over ``max_bytes``: 413, whether declared by Content-Length or streamed (chunked).
- Text no database column can hold: a NUL character or a lone surrogate, in the path, the query or
  any JSON string; and numbers JSON cannot carry (NaN, Infinity, 1e999): 422 naming where.
- Validation errors are encoded whatever their input was (bytes, non-finite floats, surrogates),
  so a 422 can never turn into a 500; a database that cannot be reached is a 503.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _NotJson(Exception):
    """A constant (NaN, Infinity) that the JSON standard does not have."""


def _reject_constant(name: str):
    raise _NotJson(name)


def _problem(value: Any, loc: tuple) -> tuple[tuple, str] | None:
    """The first place in a parsed JSON document holding something no column can store."""
    if isinstance(value, str):
        if "\x00" in value:
            return loc, "NUL characters are not accepted"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return loc, "not valid Unicode text (a lone surrogate)"
    elif isinstance(value, float) and not math.isfinite(value):
        return loc, "numbers must be finite"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _problem(key, loc) or _problem(item, (*loc, key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _problem(item, (*loc, i))
            if found:
                return found
    return None


def _json_problem(body: bytes) -> tuple[tuple, str] | None:
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except _NotJson as e:
        return ("body",), f"numbers must be finite ({e} is not JSON)"
    except ValueError:  # not JSON at all: the route's own parser says so (422 json_invalid)
        return None
    return _problem(document, ("body",))


async def _send_json(send: Send, status: int, content: Any) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _field_error(loc: tuple, msg: str) -> dict:
    return {"detail": [{"type": "value_error", "loc": list(loc), "msg": msg}]}


class EdgeMiddleware:
    """Pure ASGI: reads the whole body (bounded) before the app, checks it, then replays it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for part, raw in (
            ("path", scope.get("raw_path") or b""),
            ("query", scope.get("query_string") or b""),
        ):
            if b"%00" in raw:
                await _send_json(send, 422, _field_error((part,), "NUL characters are not accepted"))
                return
        too_large = {"detail": f"request body larger than {self.max_bytes} bytes"}
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, too_large)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            found = _json_problem(body)
            if found:
                await _send_json(send, 422, _field_error(*found))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _encodable(value: Any) -> Any:
    """Any value as something json.dumps writes (strict: no NaN) and UTF-8 can encode."""
    if isinstance(value, dict):
        return {str(_encodable(k)): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _encodable(exc.errors())}, status_code=422)


async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
    """The database cannot be reached (restarting, network): 503 and when to try again, not a 500."""
    detail = f"the database is unavailable ({type(exc.orig).__name__}); try again shortly"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})
