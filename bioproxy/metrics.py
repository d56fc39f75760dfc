"""Prometheus metrics: the exporter's request metrics plus bioproxy's own."""

import gc
import time
from collections import deque

from flask import request
from greenlet import greenlet
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics

from . import endpoints

PREFIX = "bioproxy"

# The methods the proxy forwards; a request with another one is not counted, so made-up
# methods cannot create series either.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def count_greenlets():
    # Dead ones linger until the garbage collector's next pass: not counted.
    return sum(1 for item in gc.get_objects() if isinstance(item, greenlet) and not item.dead)


def endpoint(req):
    """The metrics label for a request's path: a llama-server endpoint, or "other"."""
    return endpoints.label(endpoints.backend_path(endpoints.request_target(req.environ)))


class Metrics:
    """One app's registry, with the exporter's request metrics and bioproxy's own."""

    def __init__(self, app):
        self.registry = CollectorRegistry()
        app.before_request(_skip_unknown_methods)
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
        self.backend_requests = Counter(
            f"{PREFIX}_backend_requests_total",
            "Proxied requests by the backend (llama-server) that served them, as in the "
            "X-Bioproxy-Backend header; answered errors included.",
            ["backend"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Proxied requests whose response has not yet been fully sent.",
            registry=self.registry,
        )
        # Counted when scraped, by a walk over the heap (a few ms): greenlets that keep
        # growing under a steady load are a leak (connections, streams, watches, warmups).
        Gauge(
            f"{PREFIX}_greenlets",
            "Greenlets alive in the worker: one per open connection, plus bioproxy's own.",
            registry=self.registry,
        ).set_function(count_greenlets)
        self.queue_length = Gauge(
            f"{PREFIX}_queue_length",
            "User requests waiting for a llama-server slot, by backend.",
            ["backend"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a user request waited for its llama-server slot (0 when one was free).",
            buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue_rejections = Counter(
            f"{PREFIX}_queue_rejections_total",
            "User requests answered 503 without a slot, by reason: full (the queue was "
            "at queue_max_length), timeout (waited queue_timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.queue_abandoned = Counter(
            f"{PREFIX}_queue_abandoned_total",
            "User requests whose client disconnected while they waited for a slot.",
            registry=self.registry,
        )
        self.slots = Gauge(
            f"{PREFIX}_slots",
            "llama-server slots by backend, the template whose cache they hold (empty: "
            "none) and state (busy, idle).",
            ["backend", "template", "state"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a streamed request's arrival to the first generated content of its "
            "answer (text or a tool call; progress events do not count), by template (empty "
            "for plain requests).",
            ["template"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.recent_first_tokens = FirstTokens()
        per_template = {"registry": self.registry}
        self.template_requests = Counter(
            f"{PREFIX}_template_requests_total",
            "Templated requests, by template and cache state as measured by llama.cpp's "
            "timings: slot (already held), restored (loaded from its saved file), server "
            "(found in llama-server's own cache), cold (the template evaluated).",
            ["template", "cache"],
            **per_template,
        )
        self.template_misses = Counter(
            f"{PREFIX}_template_cache_misses_total",
            "Templated requests bioproxy expected warm (slot or restored, as their "
            "X-Bioproxy-Cache header said) whose answer shows the template evaluated.",
            ["template", "expected"],
            **per_template,
        )
        self.warmups = Counter(
            f"{PREFIX}_warmups_total",
            "Template evaluations by the warmer, by outcome (ok, failed).",
            ["template", "outcome"],
            **per_template,
        )
        self.warmup_cancellations = Counter(
            f"{PREFIX}_warmup_cancellations_total",
            "Template evaluations stopped because a user request arrived (tried again later).",
            ["template"],
            **per_template,
        )
        self.warmup_seconds = Histogram(
            f"{PREFIX}_warmup_seconds",
            "Time to evaluate a template's prefix in a slot.",
            ["template"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300),
            **per_template,
        )
        self.saves = Counter(
            f"{PREFIX}_slot_saves_total",
            "Slot saves of a warmed template, or of a slot that served one of its variants "
            "(a client's system message, tools...), by outcome (ok, failed).",
            ["template", "outcome"],
            **per_template,
        )
        self.variant_evictions = Counter(
            f"{PREFIX}_variant_evictions_total",
            "Saved caches of a template's variants (the template with a client's system "
            "message, tools...) deleted to keep them within variant_budget_bytes.",
            ["template"],
            **per_template,
        )
        self.restores = Counter(
            f"{PREFIX}_slot_restores_total",
            "Slot restores of a template's saved cache, or one of its variants', by outcome "
            "(ok, failed).",
            ["template", "outcome"],
            **per_template,
        )
        self.tokens_reused = Counter(
            f"{PREFIX}_prompt_tokens_reused_total",
            "Prompt tokens of templated requests taken from the cache (llama.cpp's cache_n).",
            ["template"],
            **per_template,
        )
        self.tokens_evaluated = Counter(
            f"{PREFIX}_prompt_tokens_evaluated_total",
            "Prompt tokens of templated requests evaluated anew (llama.cpp's prompt_n).",
            ["template"],
            **per_template,
        )
        self.template_broken = Gauge(
            f"{PREFIX}_template_broken",
            "1 while a template cannot be used (missing, unreadable, outside the root...).",
            ["template"],
            **per_template,
        )


class FirstTokens:
    """Times to first token of the last minutes, templated and plain, for the status page."""

    def __init__(self, window=15 * 60, bucket=15, limit=20_000):
        self.window, self.bucket = window, bucket
        self.samples = deque(maxlen=limit)  # (wall-clock time, seconds, kind), oldest first

    def add(self, seconds, kind="plain", now=None):
        self.samples.append((time.time() if now is None else now, seconds, kind))

    def buckets(self, now=None):
        """[{at, kind, count, p50_ms, p95_ms}] per bucket and kind with samples, oldest first."""
        now = time.time() if now is None else now
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        grouped = {}
        for at, seconds, kind in self.samples:
            key = (int(at // self.bucket) * self.bucket, kind)
            grouped.setdefault(key, []).append(seconds)
        return [
            {
                "at": at,
                "kind": kind,
                "count": len(values),
                "p50_ms": round(_quantile(values, 0.5) * 1000, 1),
                "p95_ms": round(_quantile(values, 0.95) * 1000, 1),
            }
            for (at, kind), values in sorted(grouped.items())
        ]


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _skip_unknown_methods():
    if request.method not in METHODS:
        do_not_track()


def do_not_track():
    """Leave the current request out of the request metrics (admin endpoints)."""
    # The attribute that the exporter's own do_not_track() decorator sets.
    request.prom_do_not_track = True
