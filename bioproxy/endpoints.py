"""llama-server's endpoints, as llama-server itself routes a request to them.

Every rule bioproxy applies by path (which requests evaluate a prompt and take a slot,
which ones are slot actions reserved to bioproxy, which path a metric is labelled with)
reads the path the way llama-server's HTTP library (cpp-httplib) does, so that no other
spelling of a path reaches an endpoint while escaping the rule made for it.
"""

import re
from urllib.parse import quote

CHAT = frozenset({"/v1/chat/completions", "/chat/completions"})
COMPLETION = frozenset({"/completion", "/completions", "/v1/completions"})
# The endpoints that evaluate a prompt in a slot (they take "id_slot"): scheduled, pinned.
SLOTTED = CHAT | COMPLETION | {"/infill"}

# The paths metrics are labelled with; anything else is "other", so an arbitrary path
# cannot create a new time series.
LABELLED = SLOTTED | {
    "/",
    "/health",
    "/v1/health",
    "/metrics",
    "/props",
    "/slots",
    "/models",
    "/v1/models",
    "/api/tags",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/responses",
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
SLOT_ACTION_LABEL = "/slots/{id}"
# Answered without an API key: probes (llama-server lets its /health through too). CORS
# preflights (OPTIONS) carry no key either, whatever the path.
PUBLIC = frozenset({"/health", "/v1/health"})

# llama-server's one route with a parameter, "/slots/:id_slot": cpp-httplib matches any
# segment there (empty too) and accepts one trailing "/". Matched at the end of the path,
# so that a llama-server started with --api-prefix is covered as well.
SLOT_ACTION = re.compile(r".*/slots/[^/]*/?", re.DOTALL)
ESCAPE = re.compile(r"%u([0-9A-Fa-f]{4})|%([0-9A-Fa-f]{2})")


def request_target(environ):
    """The request target (path and query) exactly as the client sent it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    # Not under gunicorn (tests): rebuilt.
    path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/:@!$&'()*+,;=-._~%")
    query = environ.get("QUERY_STRING")
    path = path or "/"
    return f"{path}?{query}" if query else path


def backend_path(target):
    """The path llama-server routes a request target (path and query, as sent) by.

    cpp-httplib drops the fragment and the query, then decodes the rest: %XX to a byte
    (%2F to "/") and, beyond the standard, %uXXXX to a character's UTF-8 bytes.
    """
    path = target.partition("#")[0].partition("?")[0]
    if "%" not in path:
        return path
    # The WSGI target is latin-1: one character a byte, so bytes and text line up.
    return ESCAPE.sub(_unescape, path)


def _unescape(match):
    wide, byte = match.groups()
    if byte is not None:
        return chr(int(byte, 16))
    return chr(int(wide, 16)).encode("utf-8", "surrogatepass").decode("latin-1")


def is_slot_action(method, path):
    """Whether llama-server would route this to its slot actions (save, restore, erase)."""
    return method == "POST" and SLOT_ACTION.fullmatch(path) is not None


def is_slotted(method, path):
    """Whether the request evaluates a prompt in a slot."""
    return method == "POST" and path in SLOTTED


def label(path):
    """The metrics label for a path: a llama-server endpoint, or "other"."""
    if path in LABELLED:
        return path
    if SLOT_ACTION.fullmatch(path):
        return SLOT_ACTION_LABEL
    return "other"
