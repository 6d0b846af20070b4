"""Artifact manifest and downloads, and file names that try to leave the artifact."""

from __future__ import annotations

import pytest

from .helpers import raw_get, submit


@pytest.fixture(scope="module")
def artifact(service, keys, workers):
    workers.ensure()
    job = submit(service, keys["alice"], model="scripted-fast")
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "succeeded"
    return done["artifact_id"]


@pytest.mark.parametrize(
    ("name", "codes"),
    [
        ("..", (400, 404)),
        ("%2E%2E", (400, 404)),
        ("..%2F..%2Fetc%2Fpasswd", (400, 404)),
        ("..%5C..%5Cetc", (400,)),
        ("a..b", (400,)),
        (".staging", (400,)),
        ("sub%2Fmanifest.json", (400, 404)),
        ("manifest.json%00.txt", (422,)),  # NUL: refused at the edge
        ("not-there.bin", (404,)),
    ],
)
def test_bad_file_names(service, keys, artifact, name, codes):
    status, content = raw_get(service.base_url, f"/v1/artifacts/{artifact}/files/{name}", keys["alice"])
    assert status in codes, (name, status, content)
    assert b"root:" not in content


def test_raw_traversal_paths_are_not_served(service, keys, artifact):
    for raw in (
        f"/v1/artifacts/{artifact}/files/../../../../etc/passwd",
        f"/v1/artifacts/{artifact}/files/x/../../manifest.json",
        f"/v1/artifacts/{artifact}/files/sub/manifest.json",
    ):
        status, content = raw_get(service.base_url, raw, keys["alice"])
        assert status in (400, 404), (raw, status, content)
        assert b"root:" not in content


def test_unknown_artifact_is_404(service, keys):
    r = service.client.get(
        "/v1/artifacts/00000000-0000-0000-0000-000000000000", headers=service.auth(keys["alice"])
    )
    assert r.status_code == 404


def test_download_has_a_content_type_and_file_name(service, keys, artifact):
    r = service.client.get(
        f"/v1/artifacts/{artifact}/files/model.safetensors", headers=service.auth(keys["alice"])
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert 'filename="model.safetensors"' in r.headers["content-disposition"]
