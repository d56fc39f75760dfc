"""The one way out to llama.cpp: a pool of connections, and its timeouts."""

import json
import logging
import string
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .errors import UpstreamCut, UpstreamTimeout, UpstreamUnavailable
from .headers import malformed, merge

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


class BackendError(Exception):
    """llama.cpp failed one of bioproxy's own calls (slots, warmups, health)."""

    def __init__(self, call, reason, status=None):
        super().__init__(f"{call}: {reason}")
        self.call = call
        self.reason = reason
        self.status = status


class MalformedResponse(requests.RequestException):
    """llama.cpp's status line and headers parsed, but are not an answer to pass on."""


class Upstream:
    """llama.cpp's server at base_url, reached through one pool of connections.

    Every call goes straight to requests' transport adapter, not through a Session: a
    proxy must not keep cookies from one client's answer for the next client, nor follow
    redirects, and the Session's merging of settings cost a fifth of a small request.
    """

    def __init__(
        self,
        base_url,
        connect_timeout,
        read_timeout,
        health_timeout,
        api_key="",
        pool_size=64,
        model=None,
    ):
        self.base_url = base_url.rstrip("/")
        # One model of a llama-server in router mode: named in each of bioproxy's own
        # calls (see own_call), which the router then passes to that model's server.
        self.model = model
        # llama-server's own key (its --api-key), sent with every request when set.
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.health_timeout = health_timeout
        self.adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)

    def close(self):
        """Close every pooled connection to llama.cpp (at the worker's exit)."""
        self.adapter.close()

    def send(self, method, target, headers, body):
        """Send a client's request and return the streamed response once its headers arrive.

        The target was already checked by the server that parsed the client's request
        line, so it is used as sent (re-parsing it cost 5% of a small request). It must
        be origin-form: a URL's authority ends at the first "/" after "//", so base_url
        followed by a "/" keeps base_url's host and port whatever comes next.
        """
        if not target.startswith("/"):
            raise ValueError(f"not an origin-form request target: {target[:80]!r}")
        prepared = requests.PreparedRequest()
        prepared.prepare_method(method)
        prepared.url = self.base_url + _ascii_target(target)
        prepared.prepare_headers({**merge(headers), **self.auth})
        prepared.prepare_body(body, None)
        try:
            return self._send(prepared, self.read_timeout)
        except requests.RequestException as e:
            raise self._failure(method, target, e) from e

    def _failure(self, method, target, e):
        """The UpstreamError for a request that failed before llama.cpp's response."""
        if _not_connected(e):
            log.warning("upstream unreachable: %s %s: %s", method, target, _reason(e))
            error = UpstreamUnavailable(
                f"llama.cpp at {self.base_url} is unavailable: {_reason(e)}"
            )
            error.unsent = True
            return error
        if isinstance(e, requests.Timeout):
            log.warning("upstream timeout: %s %s: %s", method, target, _reason(e))
            return UpstreamTimeout(
                f"llama.cpp at {self.base_url} sent no response within {self.read_timeout:g} s"
            )
        log.warning("upstream unavailable: %s %s: %s", method, target, _reason(e))
        return UpstreamUnavailable(f"llama.cpp at {self.base_url} is unavailable: {_reason(e)}")

    def open(self, method, path, body=None, timeout=None, routed=True):
        """One of bioproxy's own calls, streamed: the response once its headers arrived.

        routed: to the model, of a router's (own_call); else to the router itself.
        """
        url, body = self.own_call(method, path, body) if routed else (self.base_url + path, body)
        prepared = requests.Request(method, url, json=body, headers=self.auth).prepare()
        try:
            response = self._send(prepared, timeout or self.read_timeout)
        except requests.RequestException as e:
            raise BackendError(f"{method} {path}", _reason(e)) from e
        if response.status_code >= 400:
            with response:
                reason = f"{response.status_code} {_error_message(response)}"
            raise BackendError(f"{method} {path}", reason, response.status_code)
        return response

    def call(self, method, path, body=None, timeout=None, routed=True):
        """One of bioproxy's own JSON calls: the decoded answer, or BackendError."""
        with self.open(method, path, body, timeout, routed) as response:
            try:
                content = response.content
            except requests.RequestException as e:
                raise BackendError(f"{method} {path}", _reason(e)) from e
        try:
            return json.loads(content) if content else None
        except ValueError:
            raise BackendError(f"{method} {path}", "the answer is not JSON") from None

    def own_call(self, method, path, body):
        """The URL and body of one of bioproxy's own calls.

        To a router's model: the model in the query of a GET and in the body of a POST
        (where the router looks for it), and autoload=false, so that no look or warmup of
        bioproxy's loads a model the router unloaded (and unloads another for it): it
        fails instead, as a look at a server that is down does.
        """
        if self.model is None:
            return self.base_url + path, body
        query = f"autoload=false&model={quote(self.model, safe='')}"
        url = self.base_url + path + ("&" if "?" in path else "?") + query
        if method == "GET":
            return url, body
        return url, {"model": self.model, **(body or {})}

    def health(self):
        """llama.cpp's state from its /health: ("ok" | "loading" | "down", detail).

        A router answers /health itself, whatever its models do: a model's state is that
        of its /props there, "unloaded" while the router has not loaded it (400).
        """
        try:
            if self.model is None:
                self.call("GET", "/health", timeout=self.health_timeout)
            else:
                self.call("GET", "/props", timeout=self.health_timeout)
        except BackendError as e:
            if self.model is not None and e.status == 400:
                return "unloaded", e.reason
            return ("loading" if e.status == 503 else "down"), e.reason
        return "ok", None

    def _send(self, prepared, read_timeout):
        """Send through the pool; once more if a pooled connection turned out to be dead."""
        timeout = (self.connect_timeout, read_timeout)
        try:
            response = self.adapter.send(prepared, stream=True, timeout=timeout)
        except requests.ConnectionError as e:
            # llama-server closes its side after each streamed answer without saying so,
            # and a pooled connection can die just as it is reused. Nothing reached
            # llama.cpp then: send once more, on a fresh connection.
            if not _closed_before_answering(e):
                raise
            log.debug("upstream closed a pooled connection; sending again: %s", prepared.url)
            response = self.adapter.send(prepared, stream=True, timeout=timeout)
        problem = malformed(response)
        if problem:
            # Unread, so the connection is closed rather than pooled: what else it holds
            # is unknown.
            response.close()
            raise MalformedResponse(f"invalid response: {problem}")
        return response


def iter_body(response):
    """The response body's bytes as they arrive, undecoded; always closes the response."""
    try:
        while True:
            try:
                data = response.raw.read1(READ_SIZE, decode_content=False)
            # A body short of its Content-Length or last chunk, a reset, or a stall
            # longer than the read timeout.
            except (urllib3.exceptions.HTTPError, OSError) as e:
                # Not logged here: a warmup that gives way to a user ends this way on purpose.
                raise UpstreamCut(f"llama.cpp response cut off: {e}") from e
            if not data:
                break
            yield data
    finally:
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            # llama-server closes the connection after every stream without announcing
            # it; drop it now instead of racing its FIN when the pool hands it out again.
            response.raw.close()
        response.close()


def _not_connected(error):
    """Whether a request failed before any connection to llama.cpp was made (refused,
    no route, or no connection within connect_timeout): nothing of it was sent."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    inner = error.args[0] if error.args else None
    return isinstance(getattr(inner, "reason", inner), urllib3.exceptions.NewConnectionError)


def _closed_before_answering(error):
    """Whether the connection was closed or reset before any byte of a response came."""
    inner = error.args[0] if error.args else None
    if not isinstance(inner, urllib3.exceptions.ProtocolError) or len(inner.args) < 2:
        return False
    # http.client's RemoteDisconnected is a ConnectionResetError.
    return isinstance(inner.args[1], (ConnectionResetError, BrokenPipeError))


def _ascii_target(target):
    """The request target with any raw non-ASCII bytes (latin-1 in WSGI) percent-encoded."""
    if target.isascii():
        return target
    return quote(target.encode("latin-1"), safe=string.punctuation)


def _error_message(response):
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _reason(error):
    """What went wrong, without requests' layers of wrapping (MaxRetryError and so on)."""
    inner = error.args[0] if error.args else error
    return str(getattr(inner, "reason", inner))
