"""bioproxy's gunicorn worker: gunicorn's gevent worker, with two of its edges mended.

- The errors gunicorn answers itself, before a request reaches the app (a malformed
  request line, headers too large, a bad chunk size), are OpenAI-style JSON like every
  other error bioproxy answers, not HTML pages.
- A quick stop (SIGINT, Ctrl+C in a terminal; SIGQUIT) exits quietly. gunicorn's gevent
  worker runs the stop in a greenlet of its own and calls sys.exit() there, which gevent
  reports as a greenlet that failed with SystemExit, traceback and all.

Imported by gunicorn's master too (it loads the worker class): nothing here may import
requests or the app, which must come after the worker's monkey-patching.
"""

import json
import logging
import os
import socket
import sys

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

# gunicorn's statuses for the errors it answers itself, and bioproxy's codes for them.
CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def write_json_error(sock, status, reason, message):
    """What gunicorn's util.write_error writes, as JSON: the response, then close."""
    error = {
        "message": message or reason,
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": None,
        "code": CODES.get(status, "error"),
    }
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Worker(GeventWorker):
    """gunicorn's gevent worker, answering its own errors in JSON and stopping quietly."""

    def init_process(self):
        # In the worker only: gunicorn writes its own error answers through this function.
        util.write_error = write_json_error
        super().init_process()

    def handle_quit(self, sig, frame):
        # As gunicorn's, out of the signal handler (it may block), but the exit is raised
        # in the worker's main greenlet, as a plain sys.exit() there would be.
        gevent.spawn(self._quit)

    def _quit(self):
        self.alive = False
        self.cfg.worker_int(self)
        gevent.sleep(0.1)
        gevent.get_hub().parent.throw(SystemExit(0))


def start(worker):
    """Once the worker has loaded the app: its sockets, bioproxy's logging, the warmer."""
    # gunicorn writes a response's headers and its first chunk in two sends; with Nagle's
    # algorithm the chunk then waits for the client's delayed ACK (up to 40 ms). Accepted
    # connections inherit TCP_NODELAY from the listener.
    for listener in worker.sockets:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # bioproxy's records go through gunicorn's error log handlers, at its level.
    logger = logging.getLogger("bioproxy")
    logger.handlers = worker.log.error_log.handlers
    logger.setLevel(worker.log.error_log.level)
    logger.propagate = False
    from . import config

    state = worker.wsgi.extensions["bioproxy"]
    logger.info("%s", config.describe_source(state.settings))
    # The greenlet that watches the templates and keeps them warm, stopped as soon as the
    # worker is told to go (SIGTERM, or a reload): it must not start work it cannot
    # finish, nor overlap with the next worker's warmups.
    state.pool.start()

    def stop_warmers_when_told():
        while worker.alive:
            gevent.sleep(0.2)
        state.pool.stop()

    gevent.spawn(stop_warmers_when_told)


def stop(worker):
    """After the last request: stop the warmers (if not yet), close llama.cpp connections."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        for backend in app.extensions["bioproxy"].pool:
            backend.close()


def check_setup(server):
    """In gunicorn's master: refuse a configuration that would run bioproxy half-working."""
    problems = []
    if server.cfg.workers != 1:
        problems.append(f"workers = {server.cfg.workers}")
    if server.cfg.worker_class_str not in ("gevent", f"{__name__}.Worker"):
        problems.append(f"worker_class = {server.cfg.worker_class_str!r}")
    if problems:
        sys.exit(
            f"bioproxy: runs with exactly one gevent worker (its slot model and queue live in "
            f"that one process), got {' and '.join(problems)}: remove -w / -k from the command"
        )


def print_banner(settings):
    """Once gunicorn listens: the banner, when the `bioproxy` command asked for it."""
    if os.environ.get("BIOPROXY_BANNER"):
        from .banner import banner

        print(banner(settings, chat_page=bool(os.environ.get("BIOPROXY_CHAT_PAGE"))), flush=True)
