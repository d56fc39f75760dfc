"""Errors bioproxy raises, and the handlers that turn them into OpenAI-style JSON."""

import errno
import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class BioproxyError(Exception):
    """An error bioproxy answers itself, with an HTTP status and an OpenAI error type."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code  # a more precise code than the class's own


class BadRequest(BioproxyError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(BioproxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class CrossSiteRequest(BioproxyError):
    status = 403
    type = "permission_error"
    code = "cross_site_request"


class SlotApiReserved(BioproxyError):
    status = 403
    type = "permission_error"
    code = "slot_api_reserved"


class RequestTimeout(BioproxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLarge(BioproxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(BioproxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class TemplateBroken(BioproxyError):
    """A request named a template that cannot be used (missing, unreadable, outside the root)."""

    code = "template_broken"


class ServerBusy(BioproxyError):
    """No llama-server slot for the request now; the client may try again later."""

    status = 503
    type = "server_error"

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after  # seconds, for the Retry-After header


class QueueFull(ServerBusy):
    code = "queue_full"


class QueueTimeout(ServerBusy):
    code = "queue_timeout"


class ClientGone(BioproxyError):
    """The client closed its connection before its answer started (queued, or waiting
    for llama.cpp's first byte)."""

    status = 499  # nginx's "client closed request": only the access log sees it
    type = "invalid_request_error"
    code = "client_closed_request"


class UpstreamError(BioproxyError):
    """llama.cpp failed before its response started."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    """llama.cpp refused, reset or garbled the connection before answering.

    unsent: the request never reached it (no connection was made), so it may go to
    another backend.
    """

    unsent = False


class BackendOut(UpstreamUnavailable):
    """A request waited for a slot at a llama-server that went out of routing: nothing was
    sent, and it goes to another (proxy.tried)."""

    unsent = True


class UpstreamTimeout(UpstreamError):
    """llama.cpp sent no response headers within the configured timeout."""

    status = 504
    code = "upstream_timeout"


class BackendStalled(UpstreamTimeout):
    """A llama-server stopped answering (its /health) before its response to this request
    started: nothing reached the client, so it goes to another backend that is up
    (proxy.tried), or is this 504 when none is."""


class UpstreamCut(ConnectionResetError):
    """llama.cpp failed after the response started; the client connection must be dropped.

    It is a ConnectionResetError on purpose: that is what tells the WSGI server to close
    the client's socket at once, without the final chunk that would mark the body complete.
    """

    def __init__(self, message):
        super().__init__(errno.ECONNRESET, message)


def error_response(status, message, type_, code):
    """An OpenAI-style JSON error response."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    response = jsonify(body)
    response.status_code = status
    return response


def init_app(app):
    """Answer every error bioproxy produces with JSON, never an HTML page."""

    @app.errorhandler(BioproxyError)
    def handle_bioproxy_error(e):
        response = error_response(e.status, str(e), e.type, e.code)
        if isinstance(e, ServerBusy):
            response.headers["Retry-After"] = str(e.retry_after)
        if isinstance(e, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.errorhandler(HTTPException)
    def handle_http_exception(e):
        type_ = "invalid_request_error" if e.code < 500 else "server_error"
        if e.code == 404:
            type_ = "not_found_error"
        code = (e.name or "error").lower().replace(" ", "_")
        response = error_response(e.code, e.description, type_, code)
        for name, value in e.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(e):
        log.exception("unexpected error")
        return error_response(500, "internal error in bioproxy", "server_error", "internal_error")
