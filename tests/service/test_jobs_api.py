"""POST/GET /v1/jobs, listing with filters and pagination, validation errors, owners, cancel."""

from __future__ import annotations

import pytest

from .helpers import submit


def test_create_job_returns_202_with_location_and_the_job(service, keys):
    r = service.client.post(
        "/v1/jobs",
        json={
            "model": "scripted-fast",
            "w_bits": 6,
            "a_bits": None,
            "calibration": {"num_samples": 8, "seed": 3},
        },
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running", "succeeded")
    assert job["owner"] == "alice"
    assert job["spec"] == {
        "model": "scripted-fast",
        "checkpoint": None,
        "tokenizer_checkpoint": None,
        "recipe": "ptq4arvg",
        "w_bits": 6,
        "a_bits": None,
        "calibration": {"num_samples": 8, "selection": "dgc-official", "seed": 3, "batch_size": 16},
        "evaluation": {"num_images": 16, "seed": 10_000, "metrics": [], "reference": None, "bootstrap": 50},
        "execution": {"objective": None, "tune_rows": 2},
        "webhook": None,
        "webhook_events_filter": None,
    }
    got = service.client.get(r.headers["location"], headers=service.auth(keys["alice"])).json()
    assert got["id"] == job["id"]
    assert got["events"][0]["to_state"] == "queued" and got["events"][0]["from_state"] is None


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"w_bits": 9}, ["body", "w_bits"]),
        ({"w_bits": 1}, ["body", "w_bits"]),
        ({"a_bits": 16}, ["body", "a_bits"]),
        ({"recipe": "gptq"}, ["body", "recipe"]),
        ({"calibration": {"selection": "best"}}, ["body", "calibration", "selection"]),
        ({"calibration": {"num_samples": 1}}, ["body", "calibration", "num_samples"]),
        ({"evaluation": {"num_images": -1}}, ["body", "evaluation", "num_images"]),
        ({"evaluation": {"seed": -1}}, ["body", "evaluation", "seed"]),
        ({"calibration": {"batch_size": 0}}, ["body", "calibration", "batch_size"]),
        ({"surprise": 1}, ["body", "surprise"]),
        ({"model": "no-such-model"}, ["body", "model"]),
        ({"checkpoint": "no-such-checkpoint"}, ["body", "checkpoint"]),
        ({"tokenizer_checkpoint": "/etc/passwd"}, ["body", "tokenizer_checkpoint"]),
        ({"recipe": {"passes": [{"kind": "quarot"}]}}, ["body", "recipe", "passes", 0]),
        (
            {"recipe": {"passes": [{"kind": "smoothquant", "alpha": 5}]}},
            ["body", "recipe", "passes", 0, "smoothquant", "alpha"],
        ),
        ({"recipe": {"w_bits": 12}}, ["body", "recipe", "w_bits"]),
        ({"recipe": {"calibration": {"mode": "fast"}}}, ["body", "recipe", "calibration", "mode"]),
        ({"recipe": {"surprise": 1}}, ["body", "recipe", "surprise"]),
        # the engine's own rule, checked before the job is queued: only bundled models have a reference
        (
            {"model": "scripted-random", "evaluation": {"num_images": 8, "metrics": ["fid"]}},
            ["body", "evaluation", "reference"],
        ),
    ],
)
def test_bad_specs_get_422_naming_the_field(service, keys, patch, loc):
    spec = {"model": "scripted-fast", **patch}
    r = service.client.post("/v1/jobs", json=spec, headers=service.auth(keys["alice"]))
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]


def test_missing_model_is_422(service, keys):
    r = service.client.post("/v1/jobs", json={"w_bits": 8}, headers=service.auth(keys["alice"]))
    assert r.status_code == 422
    assert ["body", "model"] in [e["loc"] for e in r.json()["detail"]]


def test_openapi_documents_the_spec_with_examples(service):
    spec = service.client.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["JobSpec"]
    assert schema["examples"][0]["recipe"] == "ptq4arvg"
    assert schema["properties"]["w_bits"]["minimum"] == 2 and schema["properties"]["w_bits"]["maximum"] == 8
    post = spec["paths"]["/v1/jobs"]["post"]
    assert "202" in post["responses"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert examples["w8a8"]["value"]["w_bits"] == 8
    assert examples["custom-recipe"]["value"]["recipe"]["passes"][0]["kind"] == "smoothquant"


def test_a_full_recipe_is_accepted(service, keys):
    recipe = {"name": "sq-w6a6", "w_bits": 6, "a_bits": 6, "passes": [{"kind": "smoothquant", "alpha": 0.7}]}
    r = service.client.post(
        "/v1/jobs", json={"model": "scripted-fast", "recipe": recipe}, headers=service.auth(keys["alice"])
    )
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["recipe"]["passes"] == [{"kind": "smoothquant", "alpha": 0.7}]


def test_the_rest_recipe_is_the_recipe_file_schema(service, keys, tmp_path):
    """What `ptq4arvg quantize --recipe-file` reads is what POST /v1/jobs takes as `recipe`, as is."""
    from quantcore.recipe import Recipe

    recipe = Recipe.preset("ptq4arvg", w_bits=6, a_bits=6)
    recipe_file = Recipe.parse(recipe.to_yaml())  # the --recipe-file path: YAML text
    body = {"model": "scripted-fast", "recipe": recipe_file.model_dump(mode="json")}
    r = service.client.post("/v1/jobs", json=body, headers=service.auth(keys["alice"]))
    assert r.status_code == 202, r.text
    assert Recipe.model_validate(r.json()["spec"]["recipe"]) == recipe


def test_list_filters_and_pagination(service, keys, worker):
    token = keys["bob"]
    fast = [submit(service, token, model="scripted-fast", calibration={"seed": i})["id"] for i in range(5)]
    bad = [submit(service, token, model="scripted-usererror")["id"] for _ in range(2)]
    for job_id in fast + bad:
        service.wait_job(job_id, token)

    def page(**params):
        r = service.client.get("/v1/jobs", params=params, headers=service.auth(token))
        assert r.status_code == 200, r.text
        return r.json()

    everything = page(limit=100)
    assert everything["total"] == len(everything["items"]) >= 7
    assert all(j["owner"] == "bob" for j in everything["items"])
    created = [j["created_at"] for j in everything["items"]]
    assert created == sorted(created, reverse=True)  # newest first

    first, second = (
        page(model="scripted-fast", limit=2, offset=0),
        page(model="scripted-fast", limit=2, offset=2),
    )
    assert first["total"] == second["total"] >= 5
    assert len(first["items"]) == len(second["items"]) == 2
    assert {j["id"] for j in first["items"]}.isdisjoint(j["id"] for j in second["items"])
    assert first["items"][0]["id"] == fast[-1]

    failed = page(state="failed", model="scripted-usererror")
    assert {j["id"] for j in failed["items"]} >= set(bad)
    assert all(j["state"] == "failed" for j in failed["items"])
    succeeded = page(state="succeeded")
    assert set(fast) <= {j["id"] for j in succeeded["items"]}
    assert page(state="failed", model="scripted-fast")["total"] == 0

    for params in ({"state": "done"}, {"limit": 0}, {"limit": 101}, {"offset": -1}):
        r = service.client.get("/v1/jobs", params=params, headers=service.auth(token))
        assert r.status_code == 422, params


def test_a_job_is_visible_only_to_its_owner_and_admins(service, keys, worker):
    job = submit(service, keys["alice"], model="scripted-fast")
    done = service.wait_job(job["id"], keys["alice"])
    path = f"/v1/jobs/{job['id']}"
    assert service.client.get(path, headers=service.auth(keys["bob"])).status_code == 404
    assert service.client.post(path + "/cancel", headers=service.auth(keys["bob"])).status_code == 404
    bob_jobs = service.client.get("/v1/jobs", params={"limit": 100}, headers=service.auth(keys["bob"])).json()
    assert job["id"] not in {j["id"] for j in bob_jobs["items"]}
    admin = service.client.get(path, headers=service.auth(keys["root"]))
    assert admin.status_code == 200 and admin.json()["owner"] == "alice"
    art = f"/v1/artifacts/{done['artifact_id']}"
    assert service.client.get(art, headers=service.auth(keys["bob"])).status_code == 404
    assert (
        service.client.get(art + "/files/manifest.json", headers=service.auth(keys["bob"])).status_code == 404
    )
    assert service.client.get(art, headers=service.auth(keys["root"])).status_code == 200
    assert service.client.get(art, headers=service.auth(keys["alice"])).status_code == 200


def test_unknown_job_is_404(service, keys):
    r = service.client.get("/v1/jobs/does-not-exist", headers=service.auth(keys["alice"]))
    assert r.status_code == 404


def test_cancel_ends_canceled_and_twice_is_409(service, keys, worker):
    job = submit(service, keys["alice"], model="scripted-slow", calibration={"num_samples": 200})
    r = service.client.post(f"/v1/jobs/{job['id']}/cancel", headers=service.auth(keys["alice"]))
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "canceled" or r.json()["cancel_requested"] is True
    done = service.wait_job(job["id"], keys["alice"], timeout=10)
    assert done["state"] == "canceled" and done["artifact_id"] is None
    assert done["events"][-1]["to_state"] == "canceled"
    r = service.client.post(f"/v1/jobs/{job['id']}/cancel", headers=service.auth(keys["alice"]))
    assert r.status_code == 409
