"""The one way out to llama.cpp: a pooled session, its timeouts and header filtering."""

import logging

import requests
import urllib3
from requests.adapters import HTTPAdapter

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


class Upstream:
    """llama.cpp's server at base_url, reached through one pooled requests.Session."""

    def __init__(self, base_url, connect_timeout, read_timeout, health_timeout, pool_size=64):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.health_timeout = health_timeout
        self.session = requests.Session()
        # Forward the client's headers only, and ignore HTTP_PROXY and .netrc.
        self.session.headers.clear()
        self.session.trust_env = False
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def send(self, method, target, headers, body):
        """Send a request and return the streamed response once its headers have arrived."""
        try:
            return self.session.request(
                method,
                self.base_url + target,
                headers=dict(headers),
                data=body,
                stream=True,
                allow_redirects=False,
                timeout=(self.connect_timeout, self.read_timeout),
            )
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

    def health(self):
        """llama.cpp's state from its /health: ("ok" | "loading" | "down", detail)."""
        try:
            with self.session.get(
                self.base_url + "/health",
                timeout=(self.connect_timeout, self.health_timeout),
            ) as response:
                if response.status_code == 200:
                    return "ok", None
                if response.status_code == 503:
                    return "loading", _error_message(response)
                return "down", f"/health answered {response.status_code}"
        except requests.RequestException as e:
            return "down", _reason(e)


def iter_body(response):
    """The response body's bytes as they arrive, undecoded; always closes the response."""
    try:
        while True:
            try:
                data = response.raw.read1(READ_SIZE, decode_content=False)
            # A body short of its Content-Length or last chunk, a reset, or a stall
            # longer than the read timeout.
            except (urllib3.exceptions.HTTPError, OSError) as e:
                log.warning("upstream response cut off: %s", e)
                raise UpstreamCut(f"llama.cpp response cut off: {e}") from e
            if not data:
                break
            yield data
    finally:
        response.close()


def _error_message(response):
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _reason(error):
    """What went wrong, without requests' layers of wrapping (MaxRetryError and so on)."""
    inner = error.args[0] if error.args else error
    return str(getattr(inner, "reason", inner))
