"""The proxy port: every request goes on to llama.cpp and its answer streams back."""

import hmac
import json
import logging
import socket
import time
from contextlib import contextmanager

import gevent
import urllib3
from flask import Blueprint, Response, current_app, g, request
from gevent.socket import wait_read

from . import endpoints, injection, templated
from . import upstream as upstream_module
from .errors import (
    BadRequest,
    ClientGone,
    RequestTimeout,
    RequestTooLarge,
    SlotApiReserved,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamCut,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .metrics import METHODS

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
    g.user, g.template, g.cache = False, None, None  # templated.forward sets the last two
    state = current_app.extensions["bioproxy"]
    state.metrics.in_flight.inc()
    if state.settings.api_key:
        authorize(request, state.settings.api_key)


@bp.after_request
def track_until_closed(response):
    """Count the request in flight and log it once its response is closed (stream sent)."""
    state = current_app.extensions["bioproxy"]
    metrics, warmer = state.metrics, state.warmer
    line = (request.remote_addr, request.method, endpoints.request_target(request.environ))
    status, started, user = response.status_code, g.started, g.user
    template, cache = g.template or "", g.cache or "-"
    if response.mimetype == "text/event-stream" and status == 200:
        response.response = first_content_timed(response.response, started, metrics, template)

    def done():
        metrics.in_flight.dec()
        if user:
            warmer.user_finished()
        duration_ms = (time.monotonic() - started) * 1000
        access_log.info(
            "%s %s %s %d %.1fms template=%s cache=%s",
            *line,
            status,
            duration_ms,
            template or "-",
            cache,
        )

    response.call_on_close(done)
    return response


def first_content_timed(chunks, started, metrics, template):
    """A streamed body that records its time to first token at its first generated content.

    Not at its first chunk: llama-server's web UI asks for progress events
    (`return_progress`), and those come, empty, long before the first token.
    """
    timed, pending = False, b""
    try:
        for chunk in chunks:
            if not timed:
                pending += chunk
                events = pending.split(b"\n\n")
                pending = events.pop()  # a part of an event yet to come
                if any(map(has_content, events)):
                    seconds = time.monotonic() - started
                    metrics.first_token.labels(template).observe(seconds)
                    metrics.recent_first_tokens.add(seconds, "templated" if template else "plain")
                    timed, pending = True, b""
                elif len(pending) > CONTENT_SCAN_BYTES:
                    timed, pending = True, b""  # not an SSE stream of llama-server's: not timed
            yield chunk
    finally:
        if hasattr(chunks, "close"):
            chunks.close()


CONTENT_SCAN_BYTES = 64 * 1024


def has_content(event):
    """Whether an SSE event of llama-server's carries generated text or a tool call."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            data = json.loads(line[5:])
        except ValueError:
            continue  # [DONE], or not JSON
        if not isinstance(data, dict):
            continue
        if data.get("content"):  # /completion
            return True
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if choice.get("text") or (
                isinstance(delta, dict)
                and any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls"))
            ):
                return True
    return False


@bp.route("/", defaults={"path": ""}, methods=METHODS, host="proxy")
@bp.route("/<path:path>", methods=METHODS, host="proxy")
def forward(path):
    """Forward the request as it came and stream llama.cpp's answer back."""
    state = current_app.extensions["bioproxy"]
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
    if state.warmer.entries and endpoints.is_slot_action(request.method, path):
        # Clients could erase the warm slots or overwrite bioproxy's saved files.
        raise SlotApiReserved(
            "llama-server's slot actions are reserved to bioproxy, which "
            "manages the slots for its templates"
        )
    body = read_body(request, settings.max_request_bytes, settings.client_body_timeout)
    # The client's key is bioproxy's own when api_key is set; llama-server's key, if any,
    # is added by the upstream.
    owned = upstream_module.REQUEST_OWNED | (
        {"authorization"} if settings.api_key or settings.backend_api_key else set()
    )
    headers = upstream_module.end_to_end(list(request.headers.items()), owned)
    headers += forwarded_headers(request, settings.trust_forwarded_for)

    def send(body, wrap=None):
        answer = send_upstream(state, request.method, target, headers, body)
        return passthrough(answer, state.metrics, wrap)

    if not endpoints.is_slotted(request.method, path):
        return send(body)  # not read: llama.cpp gets it as it came
    # It evaluates a prompt: it waits for a slot of its own, so bioproxy reads it.
    if request.mimetype not in JSON_TYPES and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"a {path} body is JSON: send it as application/json, not {request.mimetype}"
        )
    parsed = injection.read(body)
    match = injection.find(path, parsed, state.warmer.entries)
    # Refused here, if at all: before the request counts as a user or takes a slot.
    expansion = templated.expand(state, match) if match else None
    if match is None:
        templated.check_pinnable(body, parsed)
    # A user from here on: warmups give way until its answer has been sent.
    g.user = True
    state.warmer.user_started()
    watch = ClientWatch(request.environ)
    return templated.forward(state, body, parsed, match, expansion, send, watch)


class ClientWatch:
    """Notices a client closing its connection before its answer starts.

    A request may wait long before llama.cpp sends a byte: for a slot, while llama-server
    reads a long prompt, or for a whole non-streamed answer. Nothing is written to the
    client meanwhile, so its leaving would go unseen, and llama-server would go on
    working for nobody. Under gunicorn only (it needs the client's socket): a greenlet
    waits for the socket to turn readable and peeks; no bytes means the client closed.
    Bytes (the client's next request) mean it is still there, and the watch ends.
    """

    def __init__(self, environ):
        self.socket = environ.get("gunicorn.socket")
        self.guarded = None  # the greenlet to interrupt when the client leaves

    @contextmanager
    def guard(self):
        """While inside, the client leaving raises ClientGone in this greenlet's next wait."""
        if self.socket is None:
            yield
            return
        self.guarded = gevent.getcurrent()
        watcher = gevent.spawn(self._watch)
        try:
            yield
        finally:
            self.guarded = None
            watcher.kill(block=False)  # without a switch, which could interrupt us

    def _watch(self):
        try:
            wait_read(self.socket.fileno())
            if self.socket.recv(1, socket.MSG_PEEK):
                return
        except ValueError:
            return  # a TLS socket cannot peek: it cannot be watched
        except OSError:
            pass
        # Raised from the hub, as gevent.Timeout does: the guarded greenlet is waiting.
        gevent.get_hub().loop.run_callback(self._interrupt)

    def _interrupt(self):
        if self.guarded is not None:
            self.guarded.throw(ClientGone("the client closed its connection before its answer"))


def send_upstream(state, method, target, headers, body):
    """llama.cpp's streamed answer, counting a failure before it as an upstream error."""
    try:
        return state.upstream.send(method, target, headers, body)
    except UpstreamError as e:
        state.metrics.upstream_errors.labels(e.code).inc()
        raise


def passthrough(answer, metrics, wrap=None):
    """A response that streams llama.cpp's answer back as it arrives.

    wrap, if given, wraps the body's chunks on their way (to read llama.cpp's timings).
    """
    body = upstream_module.iter_body(answer)
    # The first chunk is read before the response starts: gunicorn sends the headers only
    # with it anyway, and a failure here can still be answered with a clear error instead
    # of a connection closed without a response.
    try:
        first = next(body, b"")
    except UpstreamCut as e:
        error = _first_chunk_error(e)
        log.warning("%s: %s", error.code, e.strerror)
        metrics.upstream_errors.labels(error.code).inc()
        raise error from e
    chunks = stream_body(first, body, metrics)
    response = PassthroughResponse(
        wrap(chunks) if wrap else chunks,
        status=answer.status_code,
        # From urllib3's headers, which keep repeated ones (Set-Cookie) apart.
        headers=upstream_module.end_to_end(
            list(answer.raw.headers.items()), upstream_module.RESPONSE_OWNED
        ),
    )
    # Also runs when the body is never iterated (HEAD, or a client gone early).
    response.call_on_close(answer.close)
    return response


def stream_body(first, body, metrics):
    """The upstream body as it arrives, counting a cut-off as an upstream error."""
    try:
        if first:
            yield first
        yield from body
    except UpstreamCut as e:
        log.warning("the answer is cut for the client: %s", e.strerror)
        metrics.upstream_errors.labels("upstream_cut").inc()
        raise
    finally:
        body.close()


def _first_chunk_error(cut):
    """The error to answer when llama.cpp's body failed before its first byte."""
    if isinstance(cut.__cause__, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return UpstreamTimeout(
            "llama.cpp sent its response headers, then nothing within upstream_timeout"
        )
    return UpstreamUnavailable(f"llama.cpp failed before its response body: {cut.strerror}")


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


# Probes and CORS preflights carry no key (llama-server lets its /health through too).
PUBLIC = frozenset({"/health", "/v1/health"})


def authorize(req, key):
    """Unauthorized unless the request carries "Authorization: Bearer <key>"."""
    if req.method == "OPTIONS" or (req.method in ("GET", "HEAD") and req.path in PUBLIC):
        return
    scheme, _, given = req.headers.get("Authorization", "").partition(" ")
    # Compared in constant time, as bytes (compare_digest refuses non-ASCII str): WSGI hands
    # header values over as latin-1, so that gives back the bytes the client sent, and a
    # key beyond ASCII is matched by its UTF-8 bytes.
    sent = given.strip().encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode()):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")


def forwarded_headers(req, trust_prior=False):
    """X-Forwarded-* headers that tell llama.cpp who the client is.

    A client's own X-Forwarded-For is kept (and extended) only when trusted: behind a
    proxy that sets it, such as deploy/nginx. Otherwise anyone could claim any address.
    """
    prior = req.headers.get("X-Forwarded-For") if trust_prior else None
    client = req.remote_addr or "unknown"
    return [
        ("X-Forwarded-For", f"{prior}, {client}" if prior else client),
        ("X-Forwarded-Proto", req.scheme),
        ("X-Forwarded-Host", req.host),
    ]
