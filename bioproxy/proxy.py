"""The proxy port: every request goes on to llama.cpp and its answer streams back."""

import hmac
import logging
import string
import time
from contextlib import nullcontext
from urllib.parse import quote

import gevent
from flask import Blueprint, Response, g, request

from . import endpoints, get_state, injection, templated
from . import headers as header_rules
from .body import AnswerBody
from .client_watch import ClientWatch
from .errors import (
    BackendStalled,
    BadRequest,
    RequestTimeout,
    RequestTooLarge,
    SlotApiReserved,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamUnavailable,
)
from .first_content import first_content_timed
from .metrics import METHODS
from .slot_table import variant_id

bp = Blueprint("proxy", __name__)
log = logging.getLogger(__name__)
access_log = logging.getLogger("bioproxy.access")

# The bodies of the endpoints that evaluate a prompt are JSON, whatever the label:
# llama-server reads them all as JSON, and so bioproxy accepts what common clients send:
# none, JSON, curl -d's form type, and the text/plain of a browser's fetch() with a
# string body. Other labels (multipart forms, XML, ...) are a client's mistake.
JSON_TYPES = frozenset({"", "application/json", "application/x-www-form-urlencoded", "text/plain"})


class PassthroughResponse(Response):
    """A response that adds no Content-Type of its own when llama.cpp sent none."""

    default_mimetype = None

    def __call__(self, environ, start_response):
        try:
            return super().__call__(environ, start_response)
        except BaseException:
            # The server refused to start it (a header it cannot send): it will never
            # close this body, so run the close callbacks (slot, counters) now.
            self.close()
            raise


@bp.before_request
def start_tracking():
    g.started = time.monotonic()
    g.user, g.lease, g.backend, g.waits = None, None, None, None  # forward() sets them
    state = get_state()
    state.metrics.in_flight.inc()
    if state.settings.api_key:
        authorize(request, state.settings.api_key)


@bp.after_request
def track_until_closed(response):
    """Count the request in flight and log it once its response is closed (stream sent)."""
    metrics = get_state().metrics
    line = (request.remote_addr, request.method, endpoints.request_target(request.environ))
    status, started, user, lease = response.status_code, g.started, g.user, g.lease
    waits = "queued=- ready=-"
    if g.waits is not None:
        queued, readied = g.waits
        waits = f"queued={queued * 1000:.1f}ms ready={readied * 1000:.1f}ms"
    backend = g.backend.name if g.backend is not None else "-"
    if g.backend is not None:
        metrics.backend_requests.labels(backend).inc()
    template = lease.entry.prefix if lease is not None and lease.entry is not None else ""
    if response.mimetype == "text/event-stream" and status == 200:
        response.response = first_content_timed(response.response, started, metrics, template)

    def done():
        metrics.in_flight.dec()
        if user is not None:
            user.gate.user_finished()
        duration_ms = (time.monotonic() - started) * 1000
        # The cache as measured: the lease ended (its answer's body closed) before this.
        cache = lease.outcome if template else "-"
        access_log.info(
            "%s %s %s %d %.1fms template=%s cache=%s backend=%s %s",
            *line,
            status,
            duration_ms,
            template or "-",
            cache,
            backend,
            waits,
        )

    response.call_on_close(done)
    return response


@bp.route("/", defaults={"path": ""}, methods=METHODS, host="proxy")
@bp.route("/<path:path>", methods=METHODS, host="proxy")
def forward(path):
    """Forward the request as it came and stream llama.cpp's answer back."""
    state = get_state()
    settings = state.settings
    target = endpoints.request_target(request.environ)
    if not target.startswith("/"):
        # An absolute-form ("http://host/..."), authority-form or asterisk-form target, or
        # anything else: joined to backend_url it could name another host.
        raise BadRequest(
            "only origin-form request targets (a path starting with /) are forwarded",
            code="invalid_request_target",
        )
    path = endpoints.backend_path(target)
    if len(state.catalog) and endpoints.is_slot_action(request.method, path):
        # Clients could erase the warm slots or overwrite bioproxy's saved files.
        raise SlotApiReserved(
            "llama-server's slot actions are reserved to bioproxy, which "
            "manages the slots for its templates"
        )
    body = read_body(request, settings.max_request_bytes, settings.client_body_timeout)
    # The client's key is bioproxy's own when api_key is set; llama-server's key, if any,
    # is added by the upstream.
    owned = header_rules.REQUEST_OWNED | (
        {"authorization"} if settings.api_key or state.pool.keyed else set()
    )
    headers = header_rules.end_to_end(list(request.headers.items()), owned)
    headers += header_rules.forwarded(request, settings.trust_forwarded_for)

    pool = state.pool
    if not endpoints.is_slotted(request.method, path):
        # Not read: llama.cpp gets it as it came.
        def passed(backend):
            return send(backend, state, target, headers, body)

        return tried(pool, None, passed)
    # It evaluates a prompt: it waits for a slot of its own, so bioproxy reads it.
    if request.mimetype not in JSON_TYPES and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"a {path} body is JSON: send it as application/json, not {request.mimetype}"
        )
    parsed = injection.read(body)
    match = injection.find(path, parsed, state.catalog.entries)
    # Refused here, if at all: before the request counts as a user or takes a slot.
    limit = settings.max_request_bytes
    expansion = templated.expand(state.catalog, match, limit) if match else None
    if match is None:
        templated.check_pinnable(body, parsed)
    # Routed by its template where a warm cache can serve it: a chat that opened with it.
    reuses = expansion if match is not None and match.opening is not None else None

    def serve(backend):
        if expansion is not None:
            expansion.place(backend.variants, match)
        # A user from here on: that backend's warmups give way until its answer is sent.
        g.user = backend
        backend.gate.user_started()
        watch = ClientWatch(request.environ)

        def sent(data, lease):
            return send(backend, state, target, headers, data, lease)

        try:
            response = templated.forward(backend, body, parsed, expansion, sent, watch)
        except BaseException:
            g.user = None
            backend.gate.user_finished()
            raise
        return templated_response(response, response.response.lease)

    return tried(pool, reuses, serve, model=requested_model(parsed, match, state.catalog))


def tried(pool, expansion, serve, model=None):
    """serve(backend) on the backend routing picks; on the next one while a backend cannot
    be reached at all (nothing was sent there). The response says which one served it.
    model: the model the request names (routed to a router's unit of it)."""
    entry, template = (expansion.entry, expansion.template) if expansion else (None, None)
    failed = []
    while True:
        backend = pool.route(entry, template, avoid=failed, model=model)
        g.backend = backend
        try:
            response = serve(backend)
        except UpstreamUnavailable as e:
            if not e.unsent or len(pool) == 1:
                raise
            backend.unreachable()
            failed.append(backend)
            if all(b in failed for b in pool.of_model(model)):
                raise
            log.warning("backend %s unreachable, sending to another: %s", backend.name, e)
            continue
        except BackendStalled as e:
            # Sent, but nothing came back, nor went to the client: once more, elsewhere.
            # (The silent server may still run it when it wakes: its answer is dropped.)
            failed.append(backend)
            if not any(b.up() for b in pool.of_model(model) if b not in failed):
                raise
            log.warning("backend %s stalled, sending its request to another: %s", backend.name, e)
            continue
        response.headers["X-Bioproxy-Backend"] = backend.name
        return response


def requested_model(body, match, catalog):
    """The model a request is for: the one its body names, else its template's, if any."""
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and model:
        return model
    return catalog[match.prefix].model if match is not None else None


def templated_response(response, lease):
    """The response, with what bioproxy did for its template (if any) in its headers."""
    # For the access log: the waits only (holding a plain request's lease there would
    # keep its answer's socket open until the garbage collector breaks the cycle).
    g.waits = (lease.queued, lease.readied)
    if lease.entry is not None:
        g.lease = lease  # for the access log and the time to first token
        prefix = lease.entry.prefix
        # Header values are latin-1: a prefix beyond ASCII goes percent-encoded.
        response.headers["X-Bioproxy-Template"] = quote(prefix, safe=string.punctuation)
        response.headers["X-Bioproxy-Cache"] = lease.cache
        if lease.variant is not None:
            response.headers["X-Bioproxy-Variant"] = variant_id(lease.variant.key)
    return response


def send(backend, state, target, headers, data, lease=None):
    """The response to the client: llama.cpp's answer to data, its first chunk read (see
    AnswerBody.start). lease: a request for a slot, whose prompt the warmup llama-server
    stays out of."""
    with backend.user_waiting() if lease is not None else nullcontext(), backend.awaiting():
        answer = send_upstream(backend, state.metrics, request.method, target, headers, data)
        body = AnswerBody(answer, state.metrics, lease)
        backend.answering(body)
        # Built while llama-server reads the prompt (it sends its head at once, and its
        # first chunk with the first token): what is left after that chunk is less.
        response = respond(body)
        body.start()
    return response


def send_upstream(backend, metrics, method, target, headers, body):
    """llama.cpp's streamed answer, counting a failure before it as an upstream error."""
    try:
        return backend.upstream.send(method, target, headers, body)
    except UpstreamError as e:
        metrics.upstream_errors.labels(e.code).inc()
        raise


def respond(body):
    """A response that streams llama.cpp's answer back as it arrives, from its body.

    Its first chunk is read (send) before the response starts: gunicorn sends the headers
    only with it anyway, and a failure there can still be answered with a clear error
    instead of a connection closed without a response.
    """
    try:
        response = PassthroughResponse(
            body,
            status=body.status,
            # From urllib3's headers, which keep repeated ones (Set-Cookie) apart.
            headers=header_rules.end_to_end(
                list(body.answer.raw.headers.items()), header_rules.RESPONSE_OWNED
            ),
        )
    except BaseException:
        body.close()
        raise
    # Also runs when the body is never iterated (HEAD, or a client gone early).
    response.call_on_close(body.close)
    return response


def read_body(req, limit, timeout):
    """The whole request body; RequestTooLarge past limit bytes, RequestTimeout after timeout s."""
    too_large = RequestTooLarge(f"request body is larger than max_request_bytes ({limit} bytes)")
    if req.content_length is not None and req.content_length > limit:
        raise too_large
    late = RequestTimeout(
        f"the request body did not arrive within client_body_timeout ({timeout:g} s)"
    )
    # gunicorn marks its input as terminated, so Werkzeug does not limit a chunked
    # body (one without Content-Length): read one byte past the limit to catch it.
    with gevent.Timeout(timeout, late):
        body = req.stream.read(limit + 1)
    if len(body) > limit:
        raise too_large
    return body


def authorize(req, key):
    """Unauthorized unless the request carries "Authorization: Bearer <key>"."""
    path = endpoints.backend_path(endpoints.request_target(req.environ))
    if req.method == "OPTIONS" or (req.method in ("GET", "HEAD") and path in endpoints.PUBLIC):
        return
    scheme, _, given = req.headers.get("Authorization", "").partition(" ")
    # Compared in constant time, as bytes (compare_digest refuses non-ASCII str): WSGI hands
    # header values over as latin-1, so that gives back the bytes the client sent, and a
    # key beyond ASCII is matched by its UTF-8 bytes.
    sent = given.strip().encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode()):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
