"""GET /v1/models (the registry, synced at startup) and POST /v1/models (register a checkpoint)."""

from __future__ import annotations

import hashlib

from .helpers import submit


def test_registry_is_listed(service, keys):
    r = service.client.get("/v1/models", headers=service.auth(keys["carol"]))
    assert r.status_code == 200
    by_name = {m["name"]: m for m in r.json()["items"]}
    fast = by_name["scripted-fast"]
    assert fast["source"] == "registry" and fast["bundled"] is True and fast["family"] == "scripted"
    assert fast["parameters"] == 1000
    assert fast["info"]["sampling"] == {"cfg_scale": 1.5, "temperature": 1.0, "delay_s": 0.0}
    assert fast["info"]["official_checkpoints"] == []


def test_register_a_checkpoint_and_quantize_it(service, keys, workers, tmp_path):
    workers.ensure()
    ckpt = tmp_path / "finetuned.pt"
    ckpt.write_bytes(b"\x00weights" * 1000)
    body = {"name": "scripted-fast-ft", "base_model": "scripted-fast", "checkpoint_path": str(ckpt)}
    r = service.client.post("/v1/models", json=body, headers=service.auth(keys["root"]))
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert model["checkpoint_size"] == ckpt.stat().st_size
    assert model["source"] == "checkpoint" and model["base_model"] == "scripted-fast"
    assert service.client.post("/v1/models", json=body, headers=service.auth(keys["root"])).status_code == 409

    # by the registered name...
    job = submit(service, keys["alice"], model="scripted-fast-ft")
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "succeeded", done
    manifest = service.client.get(f"/v1/artifacts/{done['artifact_id']}", headers=service.auth(keys["alice"]))
    assert manifest.json()["manifest"]["model"] == "scripted-fast"
    assert manifest.json()["manifest"]["checkpoint"] == str(ckpt)
    # ...or as the checkpoint of its base model, by sha256
    job = submit(service, keys["alice"], model="scripted-fast", checkpoint=model["checkpoint_sha256"])
    assert service.wait_job(job["id"], keys["alice"])["state"] == "succeeded"
    # a checkpoint of another base model is refused, naming the field
    r = service.client.post(
        "/v1/jobs",
        json={"model": "scripted-slow", "checkpoint": "scripted-fast-ft"},
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "checkpoint"]

    # the file changes after registration: the job fails and says what to do
    ckpt.write_bytes(b"something else")
    job = submit(service, keys["alice"], model="scripted-fast-ft")
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "failed" and done["error"]["kind"] == "CheckpointError"
    assert "changed since it was registered" in done["error"]["message"]
    assert "POST /v1/models" in done["error"]["message"]


def test_register_errors_name_the_field(service, keys, tmp_path):
    def post(**body):
        base = {
            "name": "x-model",
            "base_model": "scripted-fast",
            "checkpoint_path": str(tmp_path / "missing.pt"),
        }
        return service.client.post("/v1/models", json={**base, **body}, headers=service.auth(keys["root"]))

    r = post()
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "checkpoint_path"]
    assert "cannot read" in r.json()["detail"][0]["msg"]
    r = post(checkpoint_path="relative/file.pt")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "checkpoint_path"]
    r = post(checkpoint_path=str(tmp_path))  # a folder
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "checkpoint_path"]
    r = post(base_model="no-such-model")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "base_model"]
    r = post(name="../evil")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
