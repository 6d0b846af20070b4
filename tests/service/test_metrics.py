"""/metrics through prometheus_client: process metrics, HTTP latency by route template, job duration and
queue wait by model and recipe (from the database, so every worker counts), generation latency and
batch sizes, worker heartbeats."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from .helpers import submit


def scrape(service, token) -> dict[str, list]:
    r = service.client.get("/metrics", headers=service.auth(token))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = family.samples
    return families


def value(samples, name, **labels) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_job_histograms_process_and_worker_metrics(service, keys, worker):
    root = keys["root"]
    before = scrape(service, root)
    job = submit(service, keys["alice"], model="scripted-fast", recipe="os+")
    assert service.wait_job(job["id"], keys["alice"])["state"] == "succeeded"
    after = scrape(service, root)

    labels = {"model": "scripted-fast", "recipe": "os+"}
    count_before = value(
        before.get("ptq4arvg_job_duration_seconds", []), "ptq4arvg_job_duration_seconds_count", **labels
    )
    durations = after["ptq4arvg_job_duration_seconds"]
    assert value(durations, "ptq4arvg_job_duration_seconds_count", **labels) == (count_before or 0) + 1
    assert (
        value(durations, "ptq4arvg_job_duration_seconds_bucket", le="+Inf", **labels)
        == (count_before or 0) + 1
    )
    assert value(durations, "ptq4arvg_job_duration_seconds_sum", **labels) > 0
    waits = after["ptq4arvg_job_queue_wait_seconds"]
    assert value(waits, "ptq4arvg_job_queue_wait_seconds_count", **labels) >= 1
    assert value(waits, "ptq4arvg_job_queue_wait_seconds_bucket", le="3600.0", **labels) >= 1

    assert value(after["ptq4arvg_jobs"], "ptq4arvg_jobs", state="succeeded") >= 1
    assert value(after["process_cpu_seconds"], "process_cpu_seconds_total") > 0
    assert value(after["process_resident_memory_bytes"], "process_resident_memory_bytes") > 1e6
    assert "python_info" in after

    http = after["ptq4arvg_http_request_duration_seconds"]
    assert (
        value(http, "ptq4arvg_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", method="GET")
        >= 1
    )
    assert not any(job["id"] in str(s.labels) for s in http)  # templates, not ids

    beats = after["ptq4arvg_worker_heartbeat_timestamp_seconds"]
    mine = [s for s in beats if s.labels["worker"].startswith(worker.node_name + "@")]
    assert mine and abs(time.time() - mine[0].value) < 30
    ages = after["ptq4arvg_worker_heartbeat_age_seconds"]
    assert value(ages, "ptq4arvg_worker_heartbeat_age_seconds", worker=mine[0].labels["worker"]) < 30


def test_generation_latency_and_batch_sizes(service, keys):
    root = keys["root"]
    before = scrape(service, root)
    r = service.client.post(
        "/v1/generate",
        json={"model": "scripted-fast", "classes": [1, 2, 3], "seed": 5, "format": "json"},
        headers=service.auth(keys["alice"]),
    )
    assert r.status_code == 200, r.text
    after = scrape(service, root)

    def count(families, name):
        return value(families.get(name, []), name + "_count") or 0

    assert (
        count(after, "ptq4arvg_generate_duration_seconds")
        == count(before, "ptq4arvg_generate_duration_seconds") + 1
    )
    images = after["ptq4arvg_generate_batch_images"]
    gained = value(images, "ptq4arvg_generate_batch_images_sum") - (
        value(before.get("ptq4arvg_generate_batch_images", []), "ptq4arvg_generate_batch_images_sum") or 0
    )
    assert gained == 3
    assert (
        value(after["ptq4arvg_generate_batch_requests"], "ptq4arvg_generate_batch_requests_bucket", le="1.0")
        >= 1
    )
    assert value(after["ptq4arvg_generate_requests"], "ptq4arvg_generate_requests_total") >= 1
