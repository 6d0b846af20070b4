"""Schema fuzzing of the real server with schemathesis: valid and invalid inputs for every operation in
the OpenAPI document, with an admin key and without one. No input may get a 5xx."""

from __future__ import annotations

import collections

import hypothesis
import requests
import schemathesis
from schemathesis import GenerationMode

# per operation and generation mode; with 12 operations, two modes: over 1,000 requests with a key
EXAMPLES_WITH_KEY = 60
EXAMPLES_WITHOUT_KEY = 20


def fuzz(base_url: str, headers: dict[str, str], examples: int) -> tuple[collections.Counter, list]:
    """Every operation, ``examples`` positive and ``examples`` negative cases: the (operation, status)
    counts and the cases that got a 5xx."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    statuses: collections.Counter = collections.Counter()
    server_errors = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    phases=[hypothesis.Phase.generate],
                    suppress_health_check=list(hypothesis.HealthCheck),
                )
                @hypothesis.given(operation.as_strategy(generation_mode=mode))
                def call(case) -> None:
                    response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
                    statuses[(case.operation.label, response.status_code)] += 1
                    if response.status_code >= 500:
                        server_errors.append(
                            (case.method, case.formatted_path, case.query, case.body, response.text[:300])
                        )

                try:
                    call()
                except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters)
                    assert mode == GenerationMode.NEGATIVE, operation.label
    return statuses, server_errors


def test_fuzzing_with_an_admin_key_gets_no_5xx(service, keys, worker):  # worker: /readyz is 200
    statuses, server_errors = fuzz(service.base_url, service.auth(keys["root"]), EXAMPLES_WITH_KEY)
    assert sum(statuses.values()) >= 1000, statuses
    assert server_errors == [], server_errors[:5]
    codes = {code for _, code in statuses}
    assert {200, 422} <= codes, statuses  # both valid and invalid inputs arrived


def test_fuzzing_without_a_key_gets_no_5xx_and_no_data(service, worker):
    statuses, server_errors = fuzz(service.base_url, {}, EXAMPLES_WITHOUT_KEY)
    assert server_errors == [], server_errors[:5]
    answered = {label for (label, code) in statuses if code == 200}
    assert answered <= {"GET /healthz", "GET /readyz"}, statuses  # everything else asks for a key
