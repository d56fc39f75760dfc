"""HTTP headers across the proxy: which may cross it, and answers whose head is unfit."""

import http.client
import re

import urllib3
from urllib3.util.response import assert_header_parsing

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


def merge(headers):
    """A header dict in which a repeated request header's values are joined by commas."""
    merged = {}  # lower-case name: (name as sent, value)
    for name, value in headers:
        key = name.lower()
        if key in merged:
            name, value = merged[key][0], f"{merged[key][1]}, {value}"
        merged[key] = (name, value)
    return dict(merged.values())


def malformed(response):
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


def forwarded(req, trust_prior=False):
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
