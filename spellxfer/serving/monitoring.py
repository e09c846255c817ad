"""Prometheus metrics for the API server (``GET /metrics``): operational numbers only.

What is counted, and where:

===================================  ===========================================================
metric                               meaning
===================================  ===========================================================
``spellxfer_requests_total``         requests by ``route`` and HTTP ``status`` (API process)
``spellxfer_request_errors_total``   the subset with status ≥ 400, same labels
``spellxfer_request_latency_seconds``  time from request to last response byte, by ``route``
``spellxfer_requests_in_flight``     requests being handled right now (summed over API servers)
``spellxfer_thinking_rejected_total``  requests refused because they asked for thinking mode
``spellxfer_batch_size``             requests per generation batch (inference workers)
``spellxfer_generation_seconds``     wall time of one batch's generation
``spellxfer_generated_tokens_total`` tokens generated (inference workers)
``spellxfer_prompt_tokens_total``    prompt tokens processed
===================================  ===========================================================

These are serving metrics (traffic, latency, tokens); model quality is measured offline by
``evaluate`` on position and count questions and is never reported here.

LitServe runs the HTTP server and the inference workers in separate processes, so metrics use
prometheus_client's multiprocess mode: ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory *before* this module is imported anywhere (prometheus_client picks its storage at
import time), every process writes its own memory-mapped file there, and ``/metrics`` sums them.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client import generate_latest as _generate_latest

ROUTES = ("/v1/chat/completions", "/predict", "/health", "/metrics", "/info", "/", "/openapi.json", "/docs",
          "/redoc")
# Tiny CPU models answer in milliseconds, Qwen3-4B under load in seconds: cover both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("spellxfer_requests", "HTTP requests by route and status", ["route", "status"])
ERRORS = Counter("spellxfer_request_errors", "HTTP responses with status >= 400", ["route", "status"])
LATENCY = Histogram("spellxfer_request_latency_seconds", "Request latency (to the last response byte)",
                    ["route"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("spellxfer_requests_in_flight", "Requests being handled", multiprocess_mode="livesum")
THINKING_REJECTED = Counter("spellxfer_thinking_rejected", "Requests refused for asking for thinking mode")
BATCH_SIZE = Histogram("spellxfer_batch_size", "Requests per generation batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
GENERATION_SECONDS = Histogram("spellxfer_generation_seconds", "Generation time per batch",
                               buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("spellxfer_generated_tokens", "Tokens generated")
PROMPT_TOKENS = Counter("spellxfer_prompt_tokens", "Prompt tokens processed")


def route_label(path: str) -> str:
    """Known routes by name; anything else is ``other`` (unbounded label values would leak memory)."""
    return path if path in ROUTES else "other"


def record_batch(size: int, seconds: float, prompt_tokens: int, generated_tokens: int) -> None:
    """Called by the inference worker after each generation batch."""
    BATCH_SIZE.observe(size)
    GENERATION_SECONDS.observe(seconds)
    PROMPT_TOKENS.inc(prompt_tokens)
    GENERATED_TOKENS.inc(generated_tokens)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text format, summed over all server processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return _generate_latest(registry), CONTENT_TYPE_LATEST
    return _generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: count every HTTP request by route and status and time it to the last byte.

    Pure ASGI (not ``BaseHTTPMiddleware``), so streamed chat responses are timed to their end and
    nothing is buffered. A request that dies with an exception is counted as a 500.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        status = 500
        start = time.perf_counter()

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            IN_FLIGHT.dec()
            LATENCY.labels(route).observe(time.perf_counter() - start)
            REQUESTS.labels(route, str(status)).inc()
            if status >= 400:
                ERRORS.labels(route, str(status)).inc()
