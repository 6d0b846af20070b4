"""Webhooks (a local receiver checks each call's Standard-Webhooks signature and sees the retry after it
answered 500) and Idempotency-Key on POST /v1/jobs, over real HTTP with a real worker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .helpers import WEBHOOK_SECRET, submit


class Receiver:
    """An HTTP server on a free port that records every call and answers 500 to the first ``fail`` ones."""

    def __init__(self, fail: int = 0):
        self.calls: list[dict] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server interface
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append({"headers": dict(self.headers.items()), "body": body})
                status = 500 if len(receiver.calls) <= receiver.fail else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate(self.calls):
            time.sleep(0.1)
        assert predicate(self.calls), [
            (c["headers"].get("webhook-event"), c["body"][:80]) for c in self.calls
        ]


@pytest.fixture
def receiver():
    r = Receiver(fail=1)
    yield r
    r.close()


def verify(secret: str, call: dict) -> dict:
    """The receiver's side of Standard Webhooks, written from the spec (not with the server's code)."""
    h = {k.lower(): v for k, v in call["headers"].items()}
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + call["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = dict(part.split(",", 1) for part in h["webhook-signature"].split())
    assert hmac.compare_digest(versions["v1"], expected), "bad signature"
    assert abs(time.time() - int(h["webhook-timestamp"])) < 60
    return json.loads(call["body"])


def _events(calls) -> list[str]:
    return [json.loads(c["body"])["event"] for c in calls]


def test_webhook_calls_are_signed_and_retried_after_a_500(service, keys, worker, receiver):
    alice = service.auth(keys["alice"])
    secret = service.client.get("/v1/webhooks/default/secret", headers=alice).json()["key"]
    bobs = service.client.get("/v1/webhooks/default/secret", headers=service.auth(keys["bob"])).json()["key"]
    assert secret.startswith("whsec_") and bobs != secret  # one secret per owner

    job = submit(service, keys["alice"], model="scripted-fast", webhook=receiver.url)
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "succeeded"
    receiver.wait_for(lambda calls: "completed" in _events(calls))

    bodies = [verify(secret, c) for c in receiver.calls]
    events = [b["event"] for b in bodies]
    # the first call (start) got a 500 and came again with the same webhook-id; then output, completed
    assert events[0] == events[1] == "start", events
    ids = [c["headers"]["webhook-id"] for c in receiver.calls]
    assert ids[0] == ids[1] and len(set(ids)) == len(ids) - 1
    assert "output" in events and events[-1] == "completed"
    assert bodies[0]["job"]["state"] == "running" and bodies[0]["job"]["id"] == job["id"]
    final = bodies[-1]["job"]
    assert final["state"] == "succeeded" and final["artifact_id"] == done["artifact_id"]
    stages = [b["job"]["progress"]["stage"] for b in bodies if b["event"] == "output"]
    assert "calibration" in stages
    with pytest.raises(AssertionError, match="bad signature"):
        verify(bobs, receiver.calls[-1])  # another owner's secret does not verify alice's calls


def test_events_filter_and_bad_webhooks(service, keys, worker):
    only_completed = Receiver()
    try:
        job = submit(
            service,
            keys["alice"],
            model="scripted-usererror",
            webhook=only_completed.url,
            webhook_events_filter=["completed"],
        )
        assert service.wait_job(job["id"], keys["alice"])["state"] == "failed"
        only_completed.wait_for(lambda calls: len(calls) >= 1)
        time.sleep(1.0)  # nothing else comes
        assert _events(only_completed.calls) == ["completed"]
        assert json.loads(only_completed.calls[0]["body"])["job"]["error"]["kind"] == "ConfigError"
    finally:
        only_completed.close()

    alice = service.auth(keys["alice"])
    for spec, loc in (
        ({"webhook": "ftp://example.com/x"}, ["body", "webhook"]),
        ({"webhook": "not a url"}, ["body", "webhook"]),
        (
            {"webhook": "http://example.com", "webhook_events_filter": ["finished"]},
            ["body", "webhook_events_filter", 0],
        ),
        ({"webhook": "http://example.com", "webhook_events_filter": []}, ["body", "webhook_events_filter"]),
    ):
        r = service.client.post("/v1/jobs", json={"model": "scripted-fast", **spec}, headers=alice)
        assert r.status_code == 422, r.text
        assert loc in [e["loc"] for e in r.json()["detail"]], r.json()


def test_a_receiver_that_is_down_does_not_hold_up_the_job(service, keys, worker):
    down = Receiver()
    url = down.url
    down.close()  # nothing listens there now
    job = submit(service, keys["alice"], model="scripted-fast", webhook=url)
    t0 = time.monotonic()
    assert service.wait_job(job["id"], keys["alice"])["state"] == "succeeded"
    assert time.monotonic() - t0 < 15


def test_same_idempotency_key_and_body_give_the_same_job(service, keys, worker):
    headers = {**service.auth(keys["alice"]), "Idempotency-Key": "retry-me-7"}
    spec = {"model": "scripted-fast", "w_bits": 6, "a_bits": 6}
    first = service.client.post("/v1/jobs", json=spec, headers=headers)
    assert first.status_code == 202, first.text
    again = service.client.post("/v1/jobs", json=dict(reversed(list(spec.items()))), headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"

    other = service.client.post("/v1/jobs", json={**spec, "w_bits": 8}, headers=headers)
    assert other.status_code == 409, other.text
    assert "Idempotency-Key" in other.json()["detail"] and first.json()["id"] in other.json()["detail"]

    bobs = service.client.post(
        "/v1/jobs", json=spec, headers={**service.auth(keys["bob"]), "Idempotency-Key": "retry-me-7"}
    )
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]  # keys are per owner

    listing = service.client.get("/v1/jobs", params={"limit": 100}, headers=service.auth(keys["alice"]))
    assert [j["id"] for j in listing.json()["items"]].count(first.json()["id"]) == 1
    too_long = service.client.post("/v1/jobs", json=spec, headers={**headers, "Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == [
        "header",
        "idempotency-key",
    ]


def test_concurrent_retries_with_one_key_make_one_job(service, keys, worker):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    headers = {**service.auth(keys["carol"]), "Idempotency-Key": "burst-1"}

    def post(_):
        with httpx.Client(base_url=service.base_url, timeout=30) as c:
            return c.post("/v1/jobs", json={"model": "scripted-fast"}, headers=headers)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    assert {r.status_code for r in answers} <= {200, 202}, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum(r.status_code == 202 for r in answers) == 1


def test_webhooks_need_a_deployment_secret(service_env, run_dir):
    from .helpers import running_server

    env = {k: v for k, v in service_env.items() if k != "PTQ4ARVG_WEBHOOK_SECRET"}
    env["PTQ4ARVG_REGISTER_MODELS_AT_STARTUP"] = "false"
    with running_server(env, run_dir / "uvicorn-nosecret.log") as svc:
        from .helpers import create_key

        token = create_key(env, "dave", "jobs")
        r = svc.client.post(
            "/v1/jobs",
            json={"model": "scripted-fast", "webhook": "http://example.com/x"},
            headers=svc.auth(token),
        )
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "webhook"], r.text
        assert "PTQ4ARVG_WEBHOOK_SECRET" in r.json()["detail"][0]["msg"]
        r = svc.client.get("/v1/webhooks/default/secret", headers=svc.auth(token))
        assert r.status_code == 404 and "PTQ4ARVG_WEBHOOK_SECRET" in r.json()["detail"]
    assert WEBHOOK_SECRET  # the session's server has one (conftest)
