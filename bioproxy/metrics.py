"""Prometheus metrics: the exporter's request metrics plus bioproxy's own."""

import re

from flask import request
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_flask_exporter import PrometheusMetrics

PREFIX = "bioproxy"

# llama-server's API paths; anything else is counted as "other", so an arbitrary
# path cannot create a new time series.
KNOWN_PATHS = frozenset(
    {
        "/",
        "/health",
        "/v1/health",
        "/metrics",
        "/props",
        "/slots",
        "/models",
        "/v1/models",
        "/api/tags",
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/infill",
        "/embedding",
        "/embeddings",
        "/v1/embeddings",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/v1/reranking",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/lora-adapters",
    }
)
SLOT_PATH = re.compile(r"/slots/\d+")


def endpoint(req):
    """The metrics label for a request's path: a llama-server endpoint, or "other"."""
    path = req.path
    if path in KNOWN_PATHS:
        return path
    if SLOT_PATH.fullmatch(path):
        return "/slots/{id}"
    return "other"


class Metrics:
    """One app's registry, with the exporter's request metrics and bioproxy's own."""

    def __init__(self, app):
        self.registry = CollectorRegistry()
        self.exporter = PrometheusMetrics(
            app,
            registry=self.registry,
            path=None,
            group_by=endpoint,
            defaults_prefix=PREFIX,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors_total",
            "Requests that llama.cpp failed, by kind: upstream_unavailable (refused, "
            "reset or garbled before the response), upstream_timeout (no response "
            "headers in time), upstream_cut (failed after the response started).",
            ["kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Proxied requests whose response has not yet been fully sent.",
            registry=self.registry,
        )


def do_not_track():
    """Leave the current request out of the request metrics (admin endpoints)."""
    # The attribute that the exporter's own do_not_track() decorator sets.
    request.prom_do_not_track = True
