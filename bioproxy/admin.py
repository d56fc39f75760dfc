"""The admin port: bioproxy's own health and Prometheus metrics."""

import ipaddress
import time
from importlib import resources
from urllib.parse import urlsplit

import gevent
from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import NotFound

from . import get_state
from .errors import CrossSiteRequest
from .metrics import do_not_track

bp = Blueprint("admin", __name__)
bp.before_request(do_not_track)


@bp.before_request
def refuse_other_names():
    """Only localhost, IP addresses and the names in admin_hosts reach the admin port.

    A web page can point a name of its own at 127.0.0.1 (DNS rebinding) and then read
    this port as its own origin: what it sends then is that name, in Host.
    """
    host = urlsplit("//" + request.host).hostname or ""
    allowed = get_state().settings.admin_hosts
    names = {name.strip().lower() for name in allowed.split(",") if name.strip()}
    if not _is_address_or_localhost(host) and host.lower() not in names:
        raise CrossSiteRequest(
            f"the admin port answers to localhost, IP addresses and admin_hosts, not {host!r}"
        )


@bp.before_request
def refuse_posts_from_web_pages():
    """Actions come from tools, or from the status page itself; not from any web page.

    A page on another site, open in a browser on this machine, could otherwise POST here
    (forms need no CORS preflight), or reach this port under its own name by pointing
    that name at 127.0.0.1 (DNS rebinding). Browsers say where a request comes from in
    Origin; tools like curl send none.
    """
    origin = request.headers.get("Origin")
    if request.method != "POST" or origin is None:
        return
    own = origin == request.host_url.rstrip("/")
    if not own or not _is_address_or_localhost(urlsplit(origin).hostname):
        raise CrossSiteRequest(
            f"the admin port takes actions from tools (no Origin header) or its own page, "
            f"not from {origin}"
        )


def _is_address_or_localhost(host):
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


# The status page: one self-contained file that reads the JSON endpoints below.
STATUS_PAGE = resources.files(__package__).joinpath("status_page.html").read_bytes()
# The browser may run its inline script and style and ask this port, nothing else.
STATUS_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


@bp.get("/", host="admin")
def status_page():
    """A page for people: health, templates, slots, queue, warmups, refreshed every 2 s."""
    response = Response(STATUS_PAGE, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = STATUS_PAGE_POLICY
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/health", host="admin")
def health():
    """bioproxy's status: 200 when llama.cpp answers, 503 while it is down or loading.

    With several backends, 200 while one of them answers ("degraded" unless all do; a
    router's model it unloaded counts as answering: "unloaded"). With
    ?always_200 the answer is 200 whatever llama.cpp's state, for the status page:
    browsers log every 5xx answer to a fetch() as an error in their console.
    """
    pool = get_state().pool
    looks = [gevent.spawn(backend.upstream.health) for backend in pool]
    gevent.joinall(looks)
    backends = []
    for backend, look in zip(pool, looks, strict=True):
        status, detail = look.value
        backends.append({"name": backend.name, "url": backend.upstream.base_url, "status": status})
        if backend.model is not None:
            backends[-1]["model"] = backend.model
        if backend.router:
            backends[-1]["router"] = True  # its models are backends of their own
        if detail:
            backends[-1]["detail"] = detail
    # A router's model that it unloaded: the router answers, and loads it when asked.
    answering = [b for b in backends if b["status"] in ("ok", "unloaded")]
    body = {
        "status": "ok" if len(answering) == len(backends) else "degraded",
        "uptime_seconds": round(time.monotonic() - get_state().started, 3),
        "backend": {k: v for k, v in backends[0].items() if k != "name"},  # the first's
        "backends": backends,
    }
    response = jsonify(body)
    response.status_code = 200 if answering or "always_200" in request.args else 503
    return response


@bp.get("/metrics", host="admin")
def metrics():
    """Every metric in Prometheus' text format."""
    return Response(generate_latest(get_state().metrics.registry), content_type=CONTENT_TYPE_LATEST)


@bp.get("/templates", host="admin")
def templates():
    """Each configured template: its file, state, tokens, save file and last warmup, on
    the first backend, and on each one under "backends"."""
    pool = get_state().pool
    return jsonify(
        {
            "backend": pool.first.seen(),
            "templates": [describe(pool, entry.prefix) for entry in get_state().catalog],
        }
    )


def describe(pool, prefix):
    """One template: as the first backend has it, and as each has it."""
    return {
        **pool.first.describe(prefix),
        "backends": [{"name": b.name, **b.describe(prefix)} for b in pool],
    }


@bp.post("/templates/<path:prefix>/warmup", host="admin")
def warmup(prefix):
    """Warm a template again now, on every backend (in the background); 202 with its entry."""
    pool = get_state().pool
    if prefix not in pool.first.warmth:
        raise NotFound(f"no template has the prefix {prefix!r}")
    for backend in pool:
        backend.warmer.request_warmup(prefix)
    response = jsonify(describe(pool, prefix))
    response.status_code = 202
    return response


@bp.get("/status", host="admin")
def status():
    """What bioproxy is doing: llama-server's slots, the queue, the warmups; for the first
    backend at the top, and for each one under "backends"."""
    pool = get_state().pool
    return jsonify(
        {
            **backend_status(pool.first),
            "backends": [{**b.summary(), **backend_status(b)} for b in pool],
            "ttft": get_state().metrics.recent_first_tokens.buckets(),
        }
    )


def backend_status(backend):
    scheduler = backend.scheduler.describe()
    if not backend.slots.table.reachable:
        # What llama-server is doing is unknown while it does not answer: only the
        # requests bioproxy itself has sent there are known.
        for slot in scheduler["slots"]:
            if slot["task"] is None or slot["task"]["kind"] == "other":
                slot["state"], slot["task"] = "unknown", None
    return {
        "backend": backend.upstream.base_url,
        "backend_seen": backend.seen(),
        "backend_mode": backend.mode(),
        **scheduler,
        "warmups": backend.warmer.describe(),
    }
