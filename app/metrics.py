"""Prometheus metrics in the text exposition format (0.0.4), written without a client library."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


def _labels(**labels: str) -> str:
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class HttpMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.sums: dict[tuple[str, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.in_flight = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            key = (method, route)
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.buckets[key][i] += 1
            self.sums[key] += seconds
            self.counts[key] += 1

    def render(self) -> list[str]:
        with self._lock:
            lines = [
                "# HELP ptq4arvg_http_requests_total HTTP requests by method, route template and status.",
                "# TYPE ptq4arvg_http_requests_total counter",
            ]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f"ptq4arvg_http_requests_total{_labels(method=method, route=route, status=status)} {n}"
                )
            lines += [
                "# HELP ptq4arvg_http_request_duration_seconds Time to answer an HTTP request.",
                "# TYPE ptq4arvg_http_request_duration_seconds histogram",
            ]
            for (method, route), counts in sorted(self.buckets.items()):
                for bound, n in zip(BUCKETS, counts, strict=True):
                    labels = _labels(method=method, route=route, le=_num(bound))
                    lines.append(f"ptq4arvg_http_request_duration_seconds_bucket{labels} {n}")
                base = _labels(method=method, route=route)
                lines.append(
                    f"ptq4arvg_http_request_duration_seconds_sum{base} {_num(self.sums[(method, route)])}"
                )
                lines.append(
                    f"ptq4arvg_http_request_duration_seconds_count{base} {self.counts[(method, route)]}"
                )
            lines += [
                "# HELP ptq4arvg_http_requests_in_flight HTTP requests being answered.",
                "# TYPE ptq4arvg_http_requests_in_flight gauge",
                f"ptq4arvg_http_requests_in_flight {self.in_flight}",
            ]
            return lines


def render_jobs(counts: dict[str, int], states: tuple[str, ...]) -> list[str]:
    lines = ["# HELP ptq4arvg_jobs Jobs in the database by state.", "# TYPE ptq4arvg_jobs gauge"]
    for state in states:
        lines.append(f"ptq4arvg_jobs{_labels(state=state)} {counts.get(state, 0)}")
    return lines


class MetricsMiddleware:
    """Pure ASGI middleware: counts requests by route template (not raw path: ids would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics):
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

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe(
                scope["method"], template, status_holder["status"], time.perf_counter() - start
            )


def render_generation(generators) -> list[str]:
    return [
        "# HELP ptq4arvg_generate_requests_total /v1/generate requests served by the engine.",
        "# TYPE ptq4arvg_generate_requests_total counter",
        f"ptq4arvg_generate_requests_total {generators.requests_served}",
        "# HELP ptq4arvg_generate_batches_total Engine calls that served them (requests batched together).",
        "# TYPE ptq4arvg_generate_batches_total counter",
        f"ptq4arvg_generate_batches_total {generators.batches_served}",
        "# HELP ptq4arvg_generate_queued /v1/generate requests waiting for the device.",
        "# TYPE ptq4arvg_generate_queued gauge",
        f"ptq4arvg_generate_queued {generators.queued}",
        "# HELP ptq4arvg_generators_loaded Generators kept loaded for /v1/generate.",
        "# TYPE ptq4arvg_generators_loaded gauge",
        f"ptq4arvg_generators_loaded {generators.loaded_count}",
        "# HELP ptq4arvg_generator_bytes Bytes of weights of the loaded generators.",
        "# TYPE ptq4arvg_generator_bytes gauge",
        f"ptq4arvg_generator_bytes {generators.loaded_bytes}",
    ]
