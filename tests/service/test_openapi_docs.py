"""/docs and /redoc work with no network (their assets are served by the app), and every example in the
OpenAPI document validates against its schema and names a model the engine registers."""

from __future__ import annotations

import re

import jsonschema_rs
import pytest

from app import schemas
from app.config import Settings
from app.main import create_app
from quantcore import registry
from quantcore.spec import JobSpec as EngineJobSpec


@pytest.mark.parametrize(("page", "assets"), [("/docs", 3), ("/redoc", 2)])
def test_docs_pages_load_only_local_assets(service, page, assets):
    r = service.client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', r.text)
    urls += re.findall(r"url:\s*'([^']+)'", r.text)  # where Swagger UI fetches the document
    assert len(urls) >= assets, urls
    assert not re.search(r"https?://", r.text), "the page names a remote URL"
    for url in urls:
        assert url.startswith("/"), url
        got = service.client.get(url)
        assert got.status_code == 200, url
        if url.endswith(".js"):
            assert "javascript" in got.headers["content-type"] and len(got.content) > 100_000, url
        elif url.endswith(".css"):
            assert got.headers["content-type"].startswith("text/css") and len(got.content) > 10_000
    assert "/openapi.json" in urls or "/openapi.json" in r.text
    assert service.client.get("/static/swagger-ui/../../config.py").status_code == 404


def _openapi() -> dict:
    return create_app(Settings(database_url="sqlite://", register_models_at_startup=False)).openapi()


def _examples(node, path=()):
    """(path, example value, the schema it must satisfy) for every example in the document."""
    if isinstance(node, dict):
        if isinstance(node.get("examples"), list) and (
            "type" in node or "properties" in node or "$ref" in node or "anyOf" in node
        ):
            schema = {k: v for k, v in node.items() if k not in ("examples", "example")}
            for i, value in enumerate(node["examples"]):
                yield (*path, "examples", i), value, schema
        if isinstance(node.get("examples"), dict) and "schema" in node:  # media type or parameter
            for name, entry in node["examples"].items():
                yield (*path, "examples", name), entry["value"], node["schema"]
        if "example" in node and "schema" in node:
            yield (*path, "example"), node["example"], node["schema"]
        for key, value in node.items():
            if key not in ("examples", "example"):
                yield from _examples(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _examples(value, (*path, i))


def test_every_openapi_example_validates_and_names_a_registered_model():
    document = _openapi()
    found = list(_examples(document))
    assert len(found) >= 10, [p for p, _, _ in found]
    registered = {m["name"] for m in registry.list_models()}
    for path, value, schema in found:
        validator = jsonschema_rs.validator_for({**schema, "components": document["components"]})
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (path, value, errors)
        if isinstance(value, dict):
            for key in ("model", "base_model"):
                if isinstance(value.get(key), str):
                    assert value[key] in registered, (path, value[key])
    bodies = [v for p, v, _ in found if "requestBody" in p]
    assert any(isinstance(v, dict) and v.get("model") == "tiny-var" for v in bodies)


@pytest.mark.parametrize("name", sorted(schemas.JOB_SPEC_EXAMPLES))
def test_job_spec_examples_are_jobs_the_engine_takes(name):
    spec = schemas.JobSpec.model_validate(schemas.JOB_SPEC_EXAMPLES[name]["value"])
    EngineJobSpec.parse(spec.engine_dict()).resolved_recipe()


def test_generate_examples_validate():
    for example in schemas.GenerateRequest.model_config["json_schema_extra"]["examples"]:
        schemas.GenerateRequest.model_validate(example)


def test_admin_command_has_one_name():
    """The auth scheme's description, the CLI's usage and the README say `ptq4arvg admin create-key`."""
    from pathlib import Path

    document = _openapi()
    bearer = document["components"]["securitySchemes"]["HTTPBearer"]["description"]
    assert "ptq4arvg admin create-key" in bearer
    root = Path(__file__).resolve().parents[2]
    for path in ("README.md", "app/security.py", "app/cli.py", "docker-compose.yml"):
        assert "app.cli create-key" not in (root / path).read_text(), path
