"""API keys: Bearer auth on every route but health, scopes, revocation, the CLI."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import create_engine, text

from .helpers import cli, create_key

PROTECTED = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
    ("POST", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel"),
    ("GET", "/v1/artifacts/x"),
    ("GET", "/v1/artifacts/x/files/manifest.json"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("POST", "/v1/generate"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_route_but_health_needs_a_key(service, method, path):
    r = service.client.request(method, path, json={})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    r = service.client.request(method, path, json={}, headers=service.auth("ptq_not-a-real-key"))
    assert r.status_code == 401
    r = service.client.request(method, path, json={}, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401


def test_health_needs_no_key(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    assert service.client.get("/readyz").status_code == 200


def test_scopes(service, keys):
    # carol has `jobs` only
    r = service.client.post(
        "/v1/generate", json={"model": "scripted-fast", "classes": [1]}, headers=service.auth(keys["carol"])
    )
    assert r.status_code == 403 and "generate" in r.json()["detail"]
    r = service.client.get("/metrics", headers=service.auth(keys["alice"]))
    assert r.status_code == 403
    r = service.client.post(
        "/v1/models",
        json={"name": "x", "base_model": "scripted-fast", "checkpoint_path": "/etc/hostname"},
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    assert service.client.get("/v1/jobs", headers=service.auth(keys["carol"])).status_code == 200
    # admin has every scope
    assert service.client.get("/v1/jobs", headers=service.auth(keys["root"])).status_code == 200


def test_keys_are_stored_hashed_and_can_be_revoked(service, service_env, pg_url):
    result = cli(service_env, "create-key", "--owner", "dave", "--scopes", "jobs", "--name", "laptop")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("ptq_") and len(token) > 40
    assert "shown only once" in result.stderr

    engine = create_engine(pg_url)
    with engine.connect() as c:
        row = c.execute(text("SELECT id, token_hash, prefix FROM api_keys WHERE owner = 'dave'")).one()
        dump = " ".join(str(v) for r in c.execute(text("SELECT * FROM api_keys")) for v in r)
    engine.dispose()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in dump

    assert service.client.get("/v1/jobs", headers=service.auth(token)).status_code == 200
    listing = cli(service_env, "list-keys", "--owner", "dave")
    assert "dave" in listing.stdout and token not in listing.stdout
    assert cli(service_env, "revoke-key", str(row.id)).returncode == 0
    assert service.client.get("/v1/jobs", headers=service.auth(token)).status_code == 401
    assert cli(service_env, "revoke-key", str(row.id)).returncode == 1


def test_cli_rejects_unknown_scopes(service_env):
    result = cli(service_env, "create-key", "--owner", "eve", "--scopes", "jobs,root")
    assert result.returncode != 0 and "scopes" in result.stderr


def test_create_key_helper_roundtrip(service, service_env):
    token = create_key(service_env, "frank", "generate")
    assert service.client.get("/v1/models", headers=service.auth(token)).status_code == 200
