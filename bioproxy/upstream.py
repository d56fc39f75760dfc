"""The one way out to llama.cpp: a pooled session, its timeouts and header filtering."""

import http.client
import json
import logging
import re
import string
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.response import assert_header_parsing

from .errors import UpstreamCut, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger(__name__)

# RFC 9110 7.6.1, plus the non-standard ones still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Headers the proxy sets itself on the way out.
REQUEST_OWNED = frozenset(
    {"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
)
# The WSGI server writes its own Date and Server; passing llama.cpp's would duplicate them.
RESPONSE_OWNED = frozenset({"date", "server"})

READ_SIZE = 64 * 1024

# What gunicorn accepts in a response header (RFC 9110 5.6.2 token; field-value with
# obs-text): anything else makes it raise after the response has been built, which
# skips every close callback of the response, the slot's release among them.
HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
HEADER_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
DIGITS = re.compile(r"[0-9]+")


def end_to_end(headers, owned=frozenset()):
    """The headers that may cross a proxy: no hop-by-hop ones, none named in Connection."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | named | owned
    return [(name, value) for name, value in headers if name.lower() not in drop]


class BackendError(Exception):
    """llama.cpp failed one of bioproxy's own calls (slots, warmups, health)."""

    def __init__(self, call, reason, status=None):
        super().__init__(f"{call}: {reason}")
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
        self, base_url, connect_timeout, read_timeout, health_timeout, api_key="", pool_size=64
    ):
        self.base_url = base_url.rstrip("/")
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
        prepared.prepare_headers({**_merge(headers), **self.auth})
        prepared.prepare_body(body, None)
        try:
            return self._send(prepared, self.read_timeout)
        except requests.Timeout as e:
            log.warning("upstream timeout: %s %s: %s", method, target, _reason(e))
            raise UpstreamTimeout(
                f"llama.cpp at {self.base_url} sent no response within {self.read_timeout:g} s"
            ) from e
        except requests.RequestException as e:
            log.warning("upstream unavailable: %s %s: %s", method, target, _reason(e))
            raise UpstreamUnavailable(
                f"llama.cpp at {self.base_url} is unavailable: {_reason(e)}"
            ) from e

    def open(self, method, path, body=None, timeout=None):
        """One of bioproxy's own calls, streamed: the response once its headers arrived."""
        prepared = requests.Request(
            method, self.base_url + path, json=body, headers=self.auth
        ).prepare()
        try:
            response = self._send(prepared, timeout or self.read_timeout)
        except requests.RequestException as e:
            raise BackendError(f"{method} {path}", _reason(e)) from e
        if response.status_code >= 400:
            with response:
                reason = f"{response.status_code} {_error_message(response)}"
            raise BackendError(f"{method} {path}", reason, response.status_code)
        return response

    def call(self, method, path, body=None, timeout=None):
        """One of bioproxy's own JSON calls: the decoded answer, or BackendError."""
        with self.open(method, path, body, timeout) as response:
            try:
                content = response.content
            except requests.RequestException as e:
                raise BackendError(f"{method} {path}", _reason(e)) from e
        try:
            return json.loads(content) if content else None
        except ValueError:
            raise BackendError(f"{method} {path}", "the answer is not JSON") from None

    def health(self):
        """llama.cpp's state from its /health: ("ok" | "loading" | "down", detail)."""
        try:
            self.call("GET", "/health", timeout=self.health_timeout)
        except BackendError as e:
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
        problem = _malformed(response)
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


def _malformed(response):
    """What makes a response's head unfit to pass on, or None.

    urllib3 only logs the header lines it could not parse, and the headers after such a
    line are lost (Content-Length among them). A 1xx other than 100 comes as the final
    answer, with the real one left unread on the connection.
    """
    if response.status_code < 200:
        return f"an interim {response.status_code} response where the final one belongs"
    original = getattr(response.raw, "_original_response", None)
    message = getattr(original, "msg", None)
    if isinstance(message, http.client.HTTPMessage):  # not in tests that mock the transport
        try:
            assert_header_parsing(message)
        except urllib3.exceptions.HeaderParsingError as e:
            return f"malformed headers: {str(e)[:160]}"
    headers = response.raw.headers
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name) or not HEADER_VALUE.fullmatch(value):
            return f"a header that cannot be passed on: {name[:80]!r}"
    length = headers.get("Content-Length")
    if length is not None:
        if "Transfer-Encoding" in headers:
            # A body delimited both ways: which one the client would trust is unknown.
            return "both Content-Length and Transfer-Encoding"
        # urllib3 reads a negative or unreadable length as none, gunicorn passes it on.
        if not all(DIGITS.fullmatch(n.strip()) for n in length.split(",")):
            return f"Content-Length {length[:80]!r}"
    return None


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


def _merge(headers):
    """A header dict in which a repeated request header's values are joined by commas."""
    merged = {}  # lower-case name: (name as sent, value)
    for name, value in headers:
        key = name.lower()
        if key in merged:
            name, value = merged[key][0], f"{merged[key][1]}, {value}"
        merged[key] = (name, value)
    return dict(merged.values())


def _error_message(response):
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _reason(error):
    """What went wrong, without requests' layers of wrapping (MaxRetryError and so on)."""
    inner = error.args[0] if error.args else error
    return str(getattr(inner, "reason", inner))
