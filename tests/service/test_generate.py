"""POST /v1/generate: PNG or JSON, same seed -> same bytes, models and artifacts, ownership."""

from __future__ import annotations

import base64
import io
import secrets
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .helpers import running_server, submit


def generate(service, token, **body):
    return service.client.post("/v1/generate", json=body, headers=service.auth(token))


def test_png_grid_is_deterministic_per_seed(service, keys):
    a = generate(service, keys["alice"], model="scripted-fast", classes=[1, 2, 3], seed=5, format="png")
    assert a.status_code == 200, a.text
    assert a.headers["content-type"] == "image/png" and a.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.headers["x-seeds"] == "5,6,7"
    image = np.asarray(Image.open(io.BytesIO(a.content)))
    assert image.shape == (16 + 2 * 2, 16 * 3 + 2 * 4, 3)  # three images in a row, 2-pixel frame
    b = generate(service, keys["alice"], model="scripted-fast", classes=[1, 2, 3], seed=5, format="png")
    assert a.content == b.content
    c = generate(service, keys["alice"], model="scripted-fast", classes=[1, 2, 3], seed=6, format="png")
    assert c.content != a.content


def test_json_has_one_image_and_seed_each(service, keys):
    r = generate(service, keys["bob"], model="scripted-fast", classes=[4, 4], seeds=[11, 12], format="json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(i["class_label"], i["seed"]) for i in body["images"]] == [(4, 11), (4, 12)]
    assert body["width"] == body["height"] == 16
    assert body["sampling"] == {"cfg_scale": 1.5, "temperature": 1.0, "delay_s": 0.0}
    pngs = [base64.b64decode(i["png_base64"]) for i in body["images"]]
    assert pngs[0] != pngs[1]
    single = generate(service, keys["bob"], model="scripted-fast", classes=[4], seed=11, format="json").json()
    assert base64.b64decode(single["images"][0]["png_base64"]) == pngs[0]


def test_from_an_artifact_only_for_its_owner(service, keys, workers):
    workers.ensure()
    job = submit(service, keys["alice"], model="scripted-fast")
    artifact = service.wait_job(job["id"], keys["alice"])["artifact_id"]
    r = generate(service, keys["alice"], artifact_id=artifact, classes=[0], seed=0)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert generate(service, keys["bob"], artifact_id=artifact, classes=[0]).status_code == 404
    admin = generate(service, keys["root"], artifact_id=artifact, classes=[0])  # admins have every scope
    assert admin.status_code == 200
    no_scope = generate(service, keys["carol"], artifact_id=artifact, classes=[0])  # jobs scope only
    assert no_scope.status_code == 403


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"classes": [1]}, ["body"]),
        ({"model": "scripted-fast", "artifact_id": "x", "classes": [1]}, ["body"]),
        ({"model": "scripted-fast", "classes": []}, ["body", "classes"]),
        ({"model": "scripted-fast", "classes": list(range(65))}, ["body", "classes"]),
        ({"model": "scripted-fast", "classes": [1, 2], "seeds": [1]}, ["body"]),
        ({"model": "no-such-model", "classes": [1]}, ["body", "model"]),
        ({"model": "scripted-fast", "classes": [1], "format": "gif"}, ["body", "format"]),
    ],
)
def test_bad_requests_are_422(service, keys, body, loc):
    r = generate(service, keys["alice"], **body)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]


def _metric(service, token, name):
    text = service.client.get("/metrics", headers=service.auth(token)).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_concurrent_requests_are_batched_and_bytes_do_not_depend_on_the_batch(service, keys):
    from concurrent.futures import ThreadPoolExecutor

    admin = keys["root"]
    token = keys["alice"]
    sampling = {"delay_s": 0.6}
    bodies = [
        {"model": "scripted-fast", "classes": [c], "seed": 40 + c, "sampling": sampling} for c in range(6)
    ]
    alone = [generate(service, token, **b).content for b in bodies[:2]]
    batches_before = _metric(service, admin, "ptq4arvg_generate_batches_total")
    requests_before = _metric(service, admin, "ptq4arvg_generate_requests_total")
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: generate(service, token, **b), bodies))
    assert all(r.status_code == 200 and r.content[:4] == b"\x89PNG" for r in results)
    assert [r.content for r in results[:2]] == alone  # same class and seed, same bytes, batched or not
    batches = _metric(service, admin, "ptq4arvg_generate_batches_total") - batches_before
    served = _metric(service, admin, "ptq4arvg_generate_requests_total") - requests_before
    assert served == 6 and batches < 6  # requests waiting on the busy device were served together


def test_body_over_the_limit_is_refused_with_413(service, keys):
    huge = {"model": "scripted-fast", "classes": [1] * 600_000}  # ~1.8 MB of JSON
    r = generate(service, keys["alice"], **huge)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"seeds": [-1]}, ["body", "seeds", 0]),
        ({"seeds": [2**63]}, ["body", "seeds", 0]),
        ({"seed": 2**31 - 1, "classes": [1, 2]}, ["body"]),
        ({"classes": [10]}, ["body", "classes", 0]),  # the scripted models have classes 0..9
        ({"classes": [-1]}, ["body", "classes", 0]),
        ({"sampling": {"temperature": "hot"}}, ["body", "sampling", "temperature"]),
        ({"sampling": {"cfg_scale": True}}, ["body", "sampling", "cfg_scale"]),
        ({"sampling": {"cfg_scale": 1e300}}, ["body", "sampling", "cfg_scale"]),
        ({"sampling": {"temperature": -1.0}}, ["body", "sampling", "temperature"]),
        ({"sampling": {"top_k": 5}}, ["body", "sampling", "top_k"]),  # not a setting of this model
    ],
)
def test_out_of_range_and_wrong_typed_input_is_422_naming_the_field(service, keys, patch, loc):
    r = generate(service, keys["alice"], **{"model": "scripted-fast", "classes": [1], **patch})
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]], r.json()


def test_a_model_without_weights_is_refused_unless_the_server_allows_it(service, keys, workers):
    r = generate(service, keys["alice"], model="scripted-random", classes=[1])
    assert r.status_code == 422
    error = r.json()["detail"][0]
    assert error["loc"] == ["body", "model"] and "random weights" in error["msg"]
    assert "PTQ4ARVG_GENERATE_RANDOM_WEIGHTS" in error["msg"]
    workers.ensure()
    job = submit(service, keys["alice"], model="scripted-random")
    artifact = service.wait_job(job["id"], keys["alice"])["artifact_id"]
    r = generate(service, keys["alice"], artifact_id=artifact, classes=[1])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "artifact_id"]


@pytest.fixture(scope="module")
def tight(service_env, run_dir):
    """A server with 4,005,000 bytes for generators, two waiting requests at most, random weights on."""
    env = {
        **service_env,
        "PTQ4ARVG_GENERATOR_MEMORY_BYTES": "4005000",
        "PTQ4ARVG_MAX_GENERATE_QUEUE": "2",
        "PTQ4ARVG_GENERATE_RANDOM_WEIGHTS": "true",
        "PTQ4ARVG_REGISTER_MODELS_AT_STARTUP": "false",
    }
    with running_server(env, run_dir / "uvicorn-tight.log") as svc:
        yield svc


def test_generators_are_kept_under_the_memory_budget_lru(tight, keys):
    admin = keys["root"]

    def loaded():
        return (
            _metric(tight, admin, "ptq4arvg_generators_loaded"),
            _metric(tight, admin, "ptq4arvg_generator_bytes"),
        )

    r = generate(tight, keys["alice"], model="scripted-huge", classes=[1])  # 8 MB > 4,005,000 bytes
    assert r.status_code == 503, r.text
    assert "PTQ4ARVG_GENERATOR_MEMORY_BYTES" in r.json()["detail"] and "7.6 MiB" in r.json()["detail"]
    assert loaded() == (0, 0)  # refused on its estimate, never loaded
    for name in ("scripted-fast", "scripted-big"):  # 4,000 + 4,000,000 bytes: both fit
        assert generate(tight, keys["alice"], model=name, classes=[1]).status_code == 200
    assert loaded() == (2, 4_004_000)
    assert generate(tight, keys["alice"], model="scripted-slow", classes=[1]).status_code == 200
    assert loaded() == (2, 4_004_000)  # scripted-fast, the least recently used, made room
    assert generate(tight, keys["alice"], model="scripted-fast", classes=[1]).status_code == 200
    assert loaded() == (2, 8_000)  # then scripted-big
    assert generate(tight, keys["alice"], model="scripted-random", classes=[1]).status_code == 200


def test_a_full_generate_queue_answers_503_with_retry_after(tight, keys):
    from concurrent.futures import ThreadPoolExecutor

    # each request holds the device 6 s: far longer than the six take to arrive, even on a loaded
    # machine (at 3 s, one of six arrived after the first had finished while five other suites ran);
    # each has its own settings, so none can join another's batch (two that arrived before the device
    # thread took the first ran as one batch: four answered 200)
    def one(i: int):
        sampling = {"delay_s": 6.0 + i / 100}
        return generate(tight, keys["alice"], model="scripted-fast", classes=[1], sampling=sampling, seed=i)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) <= 3 and codes.count(503) >= 3, codes  # one on the device, two waiting
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "already waiting" in r.json()["detail"]


def _artifact(service, keys, workers) -> tuple[str, Path]:
    workers.ensure()
    job = submit(
        service, keys["alice"], model="scripted-fast", calibration={"seed": secrets.randbelow(2**31)}
    )
    artifact = service.wait_job(job["id"], keys["alice"])["artifact_id"]
    return artifact, Path(service.env["PTQ4ARVG_ARTIFACT_DIR"]) / artifact


def test_a_cached_artifact_truncated_on_disk_is_no_longer_served(service, keys, workers):
    artifact, folder = _artifact(service, keys, workers)
    assert generate(service, keys["alice"], artifact_id=artifact, classes=[1]).status_code == 200  # cached
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = generate(service, keys["alice"], artifact_id=artifact, classes=[1])
    assert r.status_code == 409 and "truncated" in r.json()["detail"]
    assert str(folder) not in r.text  # no server path for a non-admin key


def test_an_artifact_rewritten_with_a_matching_manifest_is_refused(service, keys, workers):
    """The folder's own manifest is not trusted: the hashes the database recorded are."""
    import hashlib
    import json

    artifact, folder = _artifact(service, keys, workers)
    weights = folder / "model.safetensors"
    forged = bytes(len(weights.read_bytes()))
    weights.write_bytes(forged)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = hashlib.sha256(forged).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))  # same size, new sha256
    r = generate(service, keys["alice"], artifact_id=artifact, classes=[1])
    assert r.status_code == 409 and "no longer matches the sha256" in r.json()["detail"]
