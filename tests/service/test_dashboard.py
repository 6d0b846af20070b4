"""The dashboard over plain HTTP against the real server: session cookie flags, CSRF refusals, login,
scopes and owner isolation (the same as the REST API's), form errors naming their field."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from .helpers import Service, cli, create_key, submit

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
SMALL = {"model": "scripted-fast", "recipe": "rtn", "w_bits": 8, "a_bits": 8}


def browser(service: Service) -> httpx.Client:
    return httpx.Client(base_url=service.base_url, timeout=30, follow_redirects=False)


def csrf_of(client: httpx.Client, path: str = "/ui/login") -> str:
    r = client.get(path)
    assert r.status_code == 200, r.text
    return CSRF.search(r.text).group(1)


def logged_in(service: Service, token: str) -> httpx.Client:
    client = browser(service)
    r = client.post("/ui/login", data={"csrf_token": csrf_of(client), "api_key": token, "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text
    return client


def test_session_cookie_flags_and_login_starts_a_new_session(service, keys):
    client = browser(service)
    r = client.get("/ui/login")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("ptq4arvg_session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path=/ui", "samesite=strict"} <= flags
    assert "secure" not in flags  # plain http here; https sets Secure
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    before = client.cookies["ptq4arvg_session"]
    token = CSRF.search(r.text).group(1)
    r = client.post("/ui/login", data={"csrf_token": token, "api_key": keys["alice"], "next": "/ui/jobs"})
    assert r.status_code == 303
    assert client.cookies["ptq4arvg_session"] != before
    # the old session's CSRF token is dead after login (a new nonce)
    r = client.post("/ui/logout", data={"csrf_token": token})
    assert r.status_code == 403
    assert client.get("/ui/jobs").status_code == 200


def test_anonymous_pages_redirect_to_login(service):
    r = browser(service).get("/ui/jobs?state=running")
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstate%3Drunning"


def test_wrong_key_is_refused(service):
    client = browser(service)
    r = client.post("/ui/login", data={"csrf_token": csrf_of(client), "api_key": "ptq_not-a-key"})
    assert r.status_code == 401
    assert "invalid or revoked API key" in r.text
    assert client.get("/ui/jobs").status_code == 303


def test_forms_without_the_sessions_csrf_token_are_refused(service, keys, worker):
    alice = logged_in(service, keys["alice"])
    total = service.client.get("/v1/jobs", headers=service.auth(keys["alice"])).json()["total"]
    form = {"model": "scripted-fast", "recipe": "rtn", "w_bits": "8", "a_bits": "8"}
    for token in (None, "forged", csrf_of(browser(service))):  # none, made up, another session's
        data = form if token is None else {**form, "csrf_token": token}
        r = alice.post("/ui/jobs", data=data)
        assert r.status_code == 403, r.text
        assert "CSRF token" in r.text
    assert service.client.get("/v1/jobs", headers=service.auth(keys["alice"])).json()["total"] == total
    # login too: another visitor's token does not log this one in
    r = browser(service).post(
        "/ui/login", data={"csrf_token": csrf_of(alice, "/ui/jobs"), "api_key": keys["bob"]}
    )
    assert r.status_code == 403


def test_a_tampered_cookie_is_no_session(service, keys):
    alice = logged_in(service, keys["alice"])
    payload, signature = alice.cookies["ptq4arvg_session"].split(".")
    forged = httpx.Client(base_url=service.base_url, follow_redirects=False)
    forged.cookies.set("ptq4arvg_session", payload + "." + signature[::-1], path="/ui")
    assert forged.get("/ui/jobs").status_code == 303


def test_submit_and_cancel_through_forms(service, keys, worker):
    alice = logged_in(service, keys["alice"])
    token = csrf_of(alice, "/ui/jobs")
    form = {
        "csrf_token": token,
        "model": "scripted-slow",
        "recipe": "rtn",
        "w_bits": "8",
        "a_bits": "8",
        "calibration_num_samples": "200",
        "evaluation_num_images": "0",
    }
    r = alice.post("/ui/jobs", data=form)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job = service.client.get(f"/v1/jobs/{job_id}", headers=service.auth(keys["alice"])).json()
    assert job["owner"] == "alice" and job["spec"]["calibration"]["num_samples"] == 200
    r = alice.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert r.status_code == 303
    done = service.wait_job(job_id, keys["alice"])
    assert done["state"] == "canceled"
    page = alice.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and "canceled" in page.text
    live = alice.get("/ui/live/jobs", params={"id": job_id}).json()["jobs"]
    assert [j["state"] for j in live] == ["canceled"]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"w_bits": "9"}, "w_bits", "less than or equal to 8"),
        ({"recipe_text": "passes: [oops"}, "recipe", "not valid JSON/YAML"),
        ({"recipe_text": "name: x\nw_bits: 8\na_bits: 8\npasses: [{kind: nope}]"}, "recipe", "nope"),
        ({"model": "no-such-model"}, "model", "unknown model"),
    ],
)
def test_a_bad_form_is_answered_422_naming_the_field(service, keys, change, field, message):
    alice = logged_in(service, keys["alice"])
    form = {
        "csrf_token": csrf_of(alice, "/ui/jobs"),
        "model": "scripted-fast",
        "recipe": "rtn",
        "w_bits": "8",
        "a_bits": "8",
        **change,
    }
    r = alice.post("/ui/jobs", data=form)
    assert r.status_code == 422
    errors = re.search(r'id="form-errors">(.*?)</div>', r.text, re.S).group(1)
    assert f"<li>{field}" in errors and message in errors, errors


def test_scopes_are_the_apis(service, service_env, keys):
    carol = logged_in(service, keys["carol"])  # jobs only
    assert carol.get("/ui/jobs").status_code == 200
    r = carol.get("/ui/generate")
    assert r.status_code == 403 and "lacks the &#39;generate&#39; scope" in r.text
    assert (
        carol.get("/ui/grid.png", params={"source": "model:scripted-fast", "classes": "0"}).status_code == 403
    )
    painter = logged_in(service, create_key(service_env, "ui-painter", "generate"))  # generate only
    assert painter.get("/ui/jobs").status_code == 403
    assert painter.get("/ui/live/jobs").status_code == 403
    assert painter.get("/ui/generate").status_code == 200


def test_another_owners_jobs_and_artifacts_are_not_visible(service, keys, worker):
    bobs = submit(service, keys["bob"], **SMALL)
    done = service.wait_job(bobs["id"], keys["bob"])
    assert done["state"] == "succeeded", done
    alice = logged_in(service, keys["alice"])
    assert bobs["id"] not in alice.get("/ui/jobs").text
    assert alice.get(f"/ui/jobs/{bobs['id']}").status_code == 404
    assert alice.get("/ui/live/jobs", params={"id": bobs["id"]}).json() == {"jobs": []}
    assert done["artifact_id"] not in alice.get("/ui/artifacts").text
    assert alice.get(f"/ui/compare?artifact={done['artifact_id']}").status_code == 404
    r = alice.get(f"/ui/artifacts/{done['artifact_id']}/files/manifest.json")
    assert r.status_code == 404
    grid = {"source": f"artifact:{done['artifact_id']}", "classes": "0"}
    assert alice.get("/ui/grid.png", params=grid).status_code == 404
    # bob and the admin see it, with its report and its files
    for token in (keys["bob"], keys["root"]):
        client = logged_in(service, token)
        assert bobs["id"] in client.get("/ui/jobs").text
        report = client.get(f"/ui/jobs/{bobs['id']}")
        assert report.status_code == 200 and done["artifact_id"] in report.text
        f = client.get(f"/ui/artifacts/{done['artifact_id']}/files/model.safetensors")
        assert f.status_code == 200 and len(f.content) > 0


def test_a_revoked_key_ends_its_sessions(service, service_env):
    result = cli(service_env, "create-key", "--owner", "ui-revoked", "--scopes", "jobs", "--json")
    key = json.loads(result.stdout)
    erin = logged_in(service, key["token"])
    assert erin.get("/ui/jobs").status_code == 200
    assert cli(service_env, "revoke-key", str(key["id"])).returncode == 0
    r = erin.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


def test_behind_https_the_cookie_is_secure(service):
    # the server trusts X-Forwarded-Proto from 127.0.0.1 (uvicorn's proxy headers), as behind a proxy
    r = browser(service).get("/ui/login", headers={"X-Forwarded-Proto": "https"})
    flags = {part.strip().lower() for part in r.headers["set-cookie"].split(";")[1:]}
    assert "secure" in flags


def generate_count(service: Service, admin: str) -> int:
    text = service.client.get("/metrics", headers=service.auth(admin)).text
    return int(float(re.search(r"^ptq4arvg_generate_requests_total ([0-9.e+]+)$", text, re.M).group(1)))


def test_the_reports_grids_come_from_the_generation_service_once(service, keys, worker):
    job = submit(service, keys["alice"], **SMALL)
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "succeeded", done
    alice = logged_in(service, keys["alice"])
    report = alice.get(f"/ui/jobs/{job['id']}").text
    plan = re.search(r'<table class="data" id="execution">(.*?)</table>', report, re.S).group(1)
    assert "int8-cpu: 1, simulated: 1" in plan and "logit_kl: 0.0004, top1_agreement: 0.99" in plan
    sources = [s.replace("&amp;", "&") for s in re.findall(r'<img src="(/ui/grid\.png\?[^"]+)"', report)]
    assert len(sources) == 2 and "model%3Ascripted-fast" in sources[0] and done["artifact_id"] in sources[1]
    before = generate_count(service, keys["root"])
    first = [alice.get(s) for s in sources]
    assert [r.status_code for r in first] == [200, 200]
    assert all(r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG") for r in first)
    assert generate_count(service, keys["root"]) == before + 2
    again = [alice.get(s).content for s in sources]
    assert again == [r.content for r in first]
    assert generate_count(service, keys["root"]) == before + 2  # served from the cache


def test_compare_puts_artifacts_of_one_model_in_one_table(service, keys, worker):
    made = []
    for model, bits in (("scripted-fast", 8), ("scripted-fast", 6), ("scripted-slow", 8)):
        job = submit(service, keys["alice"], **{**SMALL, "model": model, "w_bits": bits, "a_bits": bits})
        done = service.wait_job(job["id"], keys["alice"], timeout=60)
        assert done["state"] == "succeeded", done
        made.append(done["artifact_id"])
    alice = logged_in(service, keys["alice"])
    r = alice.get("/ui/compare", params={"artifact": made[:2]})
    assert r.status_code == 200
    table = re.search(r'<table class="data" id="compare">(.*?)</table>', r.text, re.S).group(1)
    rows = re.findall(r"<tr><th scope=\"row\">.*?</tr>", table, re.S)
    assert [a[:8] in row for a, row in zip(made[:2], rows, strict=True)] == [True, True]
    assert "W8A8" in rows[0] and "W6A6" in rows[1] and "Token agreement with FP" in table
    assert r.text.count('<img src="/ui/grid.png?') == 3  # the FP grid and one per artifact
    r = alice.get("/ui/compare", params={"artifact": [made[0], made[2]]})
    assert r.status_code == 422 and "artifact: compare artifacts of one model" in r.text
