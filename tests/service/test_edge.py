"""Input no column can hold and bodies over the limit are refused at the edge, with the right status
and a field named, and the connection stays usable (no 5xx drops keep-alive)."""

from __future__ import annotations

import pytest


def post_raw(service, token, path, content: bytes, **headers):
    return service.client.post(
        path,
        content=content,
        headers={**service.auth(token), "Content-Type": "application/json", **headers},
    )


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/v1/jobs", b'{"model": "scripted-fast\\u0000"}', ["body", "model"]),
        ("/v1/jobs", b'{"model": "\\ud800"}', ["body", "model"]),  # a lone surrogate
        ("/v1/jobs", b'{"model": "scripted-fast", "w_bits": Infinity}', ["body"]),
        ("/v1/jobs", b'{"model": "scripted-fast", "w_bits": NaN}', ["body"]),
        ("/v1/jobs", b'{"model": "scripted-fast", "w_bits": 1e999}', ["body", "w_bits"]),
        (
            "/v1/jobs",
            b'{"model": "scripted-fast", "calibration": {"seed": -1e999}}',
            ["body", "calibration", "seed"],
        ),
        (
            "/v1/generate",
            b'{"model": "scripted-fast", "classes": [1], "sampling": {"k\\u0000": 1}}',
            ["body", "sampling"],
        ),
        (
            "/v1/models",
            b'{"name": "n", "base_model": "b", "checkpoint_path": "/x\\u0000"}',
            ["body", "checkpoint_path"],
        ),
    ],
)
def test_text_and_numbers_no_column_can_hold_are_422(service, keys, path, body, loc):
    r = post_raw(service, keys["root"], path, body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    assert service.client.get("/healthz").status_code == 200  # the same connection still serves


def test_nul_in_the_query_or_path_is_422(service, keys):
    r = service.client.get("/v1/jobs", params={"model": "a\x00b"}, headers=service.auth(keys["alice"]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query"]
    r = service.client.get("/v1/jobs/abc%00def", headers=service.auth(keys["alice"]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path"]


@pytest.mark.parametrize("offset", [2**63, 10**30])
def test_integers_beyond_int64_are_422(service, keys, offset):
    r = service.client.get("/v1/jobs", params={"offset": offset}, headers=service.auth(keys["alice"]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "offset"]


def test_a_validation_error_echoing_odd_input_is_still_json(service, keys):
    # the input is echoed back in the error: bytes that are not UTF-8 must not break the encoder
    r = post_raw(service, keys["alice"], "/v1/jobs", b'{"model": "scripted-fast", "w_bits": "\xff\xfe"}')
    assert r.status_code in (400, 422), r.text


def test_a_chunked_body_over_the_limit_is_413(service, keys):
    def chunks():
        for _ in range(40):
            yield b" " * 32_768  # 1.25 MiB in all, no Content-Length

    r = service.client.post(
        "/v1/jobs",
        content=chunks(),
        headers={**service.auth(keys["alice"]), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_openapi_refs_resolve_and_error_statuses_are_documented(service):
    import json
    import re

    spec = service.client.get("/openapi.json").json()
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(spec))):
        node = spec
        for part in ref.split("/"):
            node = node[part]  # KeyError = a reference nothing resolves
    paths = spec["paths"]
    assert {"401", "403", "413", "422", "503"} <= set(paths["/v1/jobs"]["post"]["responses"])
    assert {"401", "403", "404", "409", "413", "422", "503"} <= set(
        paths["/v1/generate"]["post"]["responses"]
    )
    assert "409" in paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "503" in paths["/readyz"]["get"]["responses"]
