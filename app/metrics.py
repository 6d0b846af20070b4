"""Prometheus metrics through prometheus_client, one registry per app.

What the API process measures itself (HTTP latency by route template, /v1/generate batches and engine
latency, process_* and python_* metrics) lives in its registry. What the workers do (job duration and
queue wait by model and recipe, worker heartbeats, webhook calls) is read from the database at scrape
time: the workers run on other hosts, where a PROMETHEUS_MULTIPROC_DIR shared with the API could not
reach, and the database already holds every job's timestamps. So any API replica reports the same
fleet-wide figures, and a restarted worker loses nothing. Each API process is its own scrape target.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.models import JOB_STATES, Job, WebhookDelivery, Worker

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600)
GENERATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

disable_created_metrics()  # the *_created series double every counter and histogram for no use here


class Metrics:
    def __init__(self, sessionmaker, generators):
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.http_requests = Counter(
            "ptq4arvg_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "ptq4arvg_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "ptq4arvg_http_requests_in_flight", "HTTP requests being answered.", registry=self.registry
        )
        self.generate_requests = Counter(
            "ptq4arvg_generate_requests",
            "/v1/generate requests served by the engine.",
            registry=self.registry,
        )
        self.generate_batches = Counter(
            "ptq4arvg_generate_batches",
            "Engine calls that served them (requests batched together).",
            registry=self.registry,
        )
        self.generate_seconds = Histogram(
            "ptq4arvg_generate_duration_seconds",
            "Time of one engine call of /v1/generate (a batch).",
            buckets=GENERATE_BUCKETS,
            registry=self.registry,
        )
        self.generate_batch_requests = Histogram(
            "ptq4arvg_generate_batch_requests",
            "Requests served by one engine call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.generate_batch_images = Histogram(
            "ptq4arvg_generate_batch_images",
            "Images made by one engine call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_GeneratorCollector(generators))
        self.registry.register(_DatabaseCollector(sessionmaker))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)

    def observe_batch(self, requests: int, images: int, seconds: float) -> None:
        self.generate_requests.inc(requests)
        self.generate_batches.inc()
        self.generate_seconds.observe(seconds)
        self.generate_batch_requests.observe(requests)
        self.generate_batch_images.observe(images)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _GeneratorCollector:
    """The generation queue and the loaded generators, as they are at scrape time."""

    def __init__(self, generators):
        self.generators = generators

    def describe(self):
        return []  # values come at collect time only

    def collect(self):
        g = self.generators
        yield GaugeMetricFamily(
            "ptq4arvg_generate_queued", "/v1/generate requests waiting for the device.", value=g.queued
        )
        yield GaugeMetricFamily(
            "ptq4arvg_generators_loaded", "Generators kept loaded for /v1/generate.", value=g.loaded_count
        )
        yield GaugeMetricFamily(
            "ptq4arvg_generator_bytes", "Bytes of weights of the loaded generators.", value=g.loaded_bytes
        )


def _histogram(name: str, doc: str, samples: dict[tuple[str, str], list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["model", "recipe"])
    for labels, values in sorted(samples.items()):
        buckets = [(str(float(b)), sum(v <= b for v in values)) for b in JOB_BUCKETS]
        family.add_metric(list(labels), [*buckets, ("+Inf", len(values))], sum(values))
    return family


class _DatabaseCollector:
    """What the workers did, read from the database at scrape time."""

    def __init__(self, sessionmaker):
        self.sessionmaker = sessionmaker

    def describe(self):
        return []

    def collect(self):
        with self.sessionmaker() as db:
            counts = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            started = db.execute(
                select(Job.model, Job.recipe, Job.created_at, Job.started_at, Job.finished_at).where(
                    Job.started_at.is_not(None)
                )
            ).all()
            workers = db.execute(select(Worker.name, Worker.started_at, Worker.heartbeat_at)).all()
            pending = db.scalar(select(func.count()).where(WebhookDelivery.next_attempt_at.is_not(None)))
            delivered = db.scalar(select(func.count()).where(WebhookDelivery.delivered_at.is_not(None)))
            total_calls = db.scalar(select(func.count()).select_from(WebhookDelivery))

        jobs = GaugeMetricFamily("ptq4arvg_jobs", "Jobs in the database by state.", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs

        waits: dict[tuple[str, str], list[float]] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        for model, recipe, created, began, finished in started:
            waits.setdefault((model, recipe), []).append((began - created).total_seconds())
            if finished is not None:
                durations.setdefault((model, recipe), []).append((finished - began).total_seconds())
        yield _histogram(
            "ptq4arvg_job_queue_wait_seconds", "Time from submission to a worker's first start.", waits
        )
        yield _histogram(
            "ptq4arvg_job_duration_seconds", "Time from a job's start to its end (any end state).", durations
        )

        beats = GaugeMetricFamily(
            "ptq4arvg_worker_heartbeat_timestamp_seconds",
            "Last heartbeat of each worker (Unix time); time() minus it is the worker's silence.",
            labels=["worker"],
        )
        ages = GaugeMetricFamily(
            "ptq4arvg_worker_heartbeat_age_seconds",
            "Seconds since each worker's last heartbeat.",
            labels=["worker"],
        )
        now = time.time()
        for name, _started, beat in workers:
            beats.add_metric([name], beat.timestamp())
            ages.add_metric([name], max(0.0, now - beat.timestamp()))
        yield beats
        yield ages

        calls = GaugeMetricFamily(
            "ptq4arvg_webhook_calls",
            "Webhook calls by status (pending: to be tried again).",
            labels=["status"],
        )
        calls.add_metric(["pending"], pending or 0)
        calls.add_metric(["delivered"], delivered or 0)
        calls.add_metric(["given_up"], (total_calls or 0) - (pending or 0) - (delivered or 0))
        yield calls


class MetricsMiddleware:
    """Pure ASGI middleware: times requests by route template (not raw path: ids would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        self.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe_request(
                scope["method"], template, status_holder["status"], time.perf_counter() - start
            )
