"""GET /v1/models (the registry, synced at startup) and POST /v1/models (register a checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .helpers import running_server, sha256, submit


def test_registry_is_listed(service, keys):
    r = service.client.get("/v1/models", headers=service.auth(keys["carol"]))
    assert r.status_code == 200
    by_name = {m["name"]: m for m in r.json()["items"]}
    fast = by_name["scripted-fast"]
    assert fast["source"] == "registry" and fast["bundled"] is True and fast["family"] == "scripted"
    assert fast["parameters"] == 1000
    assert fast["info"]["sampling"] == {"cfg_scale": 1.5, "temperature": 1.0, "delay_s": 0.0}
    assert fast["info"]["official_checkpoints"] == []


def torch_file(path: Path, seed: int = 0) -> Path:
    """A plain state dict saved by torch: what registration accepts."""
    torch.save({"weight": torch.arange(16.0) + seed}, path)
    return path


@pytest.fixture
def root(service_env) -> Path:
    return Path(service_env["PTQ4ARVG_CHECKPOINT_ROOTS"])


def register(service, token, name, path, base="scripted-fast"):
    body = {"name": name, "base_model": base, "checkpoint_path": str(path)}
    return service.client.post("/v1/models", json=body, headers=service.auth(token))


def test_register_a_checkpoint_and_quantize_it(service, keys, workers, root):
    workers.ensure()
    ckpt = torch_file(root / "finetuned.pt")
    r = register(service, keys["root"], "scripted-fast-ft", ckpt)
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert model["checkpoint_size"] == ckpt.stat().st_size
    assert model["source"] == "checkpoint" and model["base_model"] == "scripted-fast"
    assert register(service, keys["root"], "scripted-fast-ft", ckpt).status_code == 409

    # by the registered name...
    job = submit(service, keys["alice"], model="scripted-fast-ft")
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "succeeded", done
    art = f"/v1/artifacts/{done['artifact_id']}"
    assert service.client.get(art, headers=service.auth(keys["root"])).json()["manifest"][
        "checkpoint"
    ] == str(ckpt)
    # ...which a non-admin owner sees by its name, in the listing and the downloaded manifest alike
    listing = service.client.get(art, headers=service.auth(keys["alice"])).json()
    assert listing["manifest"]["model"] == "scripted-fast"
    assert listing["manifest"]["checkpoint"] == "<registered checkpoint 'scripted-fast-ft'>"
    entry = next(f for f in listing["files"] if f["name"] == "manifest.json")
    download = service.client.get(entry["url"], headers=service.auth(keys["alice"]))
    assert sha256(download.content) == entry["sha256"] == download.headers["x-content-sha256"]
    assert str(ckpt) not in download.text and model["checkpoint_sha256"] not in download.text
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

    # the file changes after registration: the job fails and says what to do, without the path
    torch_file(ckpt, seed=1)
    job = submit(service, keys["alice"], model="scripted-fast-ft")
    done = service.wait_job(job["id"], keys["alice"])
    assert done["state"] == "failed" and done["error"]["kind"] == "CheckpointError"
    assert "changed since it was registered" in done["error"]["message"]
    assert "POST /v1/models" in done["error"]["message"]
    assert str(ckpt) not in done["error"]["message"] and model["checkpoint_sha256"][:12] not in str(done)
    # and generation from it is refused too
    r = service.client.post(
        "/v1/generate",
        json={"model": "scripted-fast-ft", "classes": [1]},
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 409 and "no longer matches" in r.json()["detail"]


def test_only_admins_see_checkpoint_hashes(service, keys, root):
    assert (
        register(service, keys["root"], "scripted-fast-seen", torch_file(root / "seen.pt")).status_code == 201
    )
    for who, visible in (("alice", False), ("carol", False), ("root", True)):
        items = service.client.get("/v1/models", headers=service.auth(keys[who])).json()["items"]
        seen = next(m for m in items if m["name"] == "scripted-fast-seen")
        assert (seen["checkpoint_sha256"] is not None) == visible and (
            seen["checkpoint_size"] is not None
        ) == visible
        assert "seen.pt" not in json.dumps(items)


def test_registration_reads_only_checkpoints_inside_the_roots(service, keys, root, tmp_path):
    outside = torch_file(tmp_path / "outside.pt")
    (root / "link-out.pt").symlink_to(outside)
    (root / "link-shadow").symlink_to("/etc/shadow")
    (root / "sub").mkdir(exist_ok=True)
    inside = torch_file(root / "sub" / "inside.pt")
    (root / "link-in.pt").symlink_to(inside)
    (root / "not-torch.pt").write_bytes(b"\x00weights" * 1000)
    (root / "pickle.pt").write_bytes(pickle.dumps({"weight": Evil()}))
    os.mkfifo(root / "fifo.pt")
    refused = {
        "/etc/shadow": "not inside",
        "/etc/passwd": "not inside",
        "/proc/self/environ": "not inside",
        str(outside): "not inside",
        str(root / "link-out.pt"): "not inside",
        str(root / "link-shadow"): "not inside",
        f"{root}/sub/../../{outside.parent.name}/outside.pt": "not inside",
        str(root / "missing.pt"): "cannot read",
        str(root / "sub"): "not a regular file",
        str(root / "fifo.pt"): "not a regular file",
        str(root / "not-torch.pt"): "refused by the weights-only loader",
        str(root / "pickle.pt"): "nothing in it was executed",
        "relative/file.pt": "absolute path",
    }
    for i, (path, why) in enumerate(refused.items()):
        r = register(service, keys["root"], f"refused-{i}", path)
        assert r.status_code == 422, (path, r.text)
        error = r.json()["detail"][0]
        assert error["loc"] == ["body", "checkpoint_path"] and why in error["msg"], (path, error)
    assert not EXECUTED.exists()
    r = register(service, keys["root"], "scripted-fast-linked", root / "link-in.pt")
    assert r.status_code == 201, r.text  # a link that stays inside is resolved
    items = service.client.get("/v1/models", headers=service.auth(keys["root"])).json()["items"]
    assert not any(m["name"].startswith("refused-") for m in items)


EXECUTED = Path(tempfile.gettempdir()) / f"ptq4arvg-unpickled-{os.getpid()}"


class Evil:
    def __reduce__(self):
        return (Path.touch, (EXECUTED,))


def test_registration_is_off_without_roots(service_env, run_dir, keys, root):
    env = {**service_env, "PTQ4ARVG_CHECKPOINT_ROOTS": "", "PTQ4ARVG_REGISTER_MODELS_AT_STARTUP": "false"}
    with running_server(env, run_dir / "uvicorn-noroots.log") as off:
        r = register(off, keys["root"], "x-model", torch_file(root / "off.pt"))
    assert r.status_code == 422 and "PTQ4ARVG_CHECKPOINT_ROOTS" in r.json()["detail"][0]["msg"]


def test_a_checkpoint_must_fit_the_engines_base_model(tmp_path):
    """In-process: the shapes are checked against the registry model (meta tensors: no memory)."""
    from app import checkpoints

    path = torch_file(tmp_path / "wrong.pt")
    with pytest.raises(checkpoints.Refused, match="does not fit the model"):
        checkpoints.check_file(str(path), [tmp_path], "tiny-llamagen")
    from quantcore.registry import get_spec

    good = tmp_path / "good.safetensors"
    save_file(get_spec("tiny-rar").build("cpu").state_dict(), str(good))
    assert checkpoints.check_file(str(good), [tmp_path], "tiny-rar").size == good.stat().st_size


def test_register_errors_name_the_field(service, keys, root):
    def post(**body):
        base = {
            "name": "x-model",
            "base_model": "scripted-fast",
            "checkpoint_path": str(torch_file(root / "x.pt")),
        }
        return service.client.post("/v1/models", json={**base, **body}, headers=service.auth(keys["root"]))

    r = post(base_model="no-such-model")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "base_model"]
    r = post(name="../evil")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
