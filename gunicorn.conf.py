"""gunicorn settings for bioproxy: `gunicorn -c gunicorn.conf.py wsgi:app`.

Addresses come from bioproxy's own configuration (config file and BIOPROXY_*
environment), so gunicorn and the app always agree on which port is the admin port.
"""

import logging
import os
import socket
import sys

# Module-level names are read as gunicorn settings, so bioproxy's own are kept private.
from bioproxy import config as _config

try:
    # A reload (SIGHUP) with a broken configuration keeps the running one (gunicorn's
    # master would otherwise stop); the error is logged to stderr.
    _settings = _config.load_or_running()
except _config.ConfigError as _e:
    sys.exit(f"bioproxy: configuration error: {_e}")
os.environ[_config.RUNNING] = _config.dump(_settings)

# Listeners: the proxy first, then the admin port.
bind = [_settings.proxy_bind, _settings.admin_bind]

# Workers: exactly one gevent worker, by design. bioproxy's model of llama-server's slots,
# its queue, its warmups and its metrics live in that one process: a second worker would
# hand out the same slots a second time (requests evicting each other's templates, a
# restore landing in a slot another worker uses) and report half the metrics. gevent
# gives the one worker thousands of concurrent connections, and the work itself happens
# in llama-server. on_starting() below refuses any other setting.
workers = 1
# gunicorn's gevent worker, answering gunicorn's own errors in JSON (bioproxy/worker.py).
worker_class = "bioproxy.worker.Worker"
worker_connections = 1000
preload_app = False

# Timeouts: with gevent, `timeout` is only the worker heartbeat; long generations
# are bounded by bioproxy's upstream_timeout instead. On SIGTERM (and for the old worker
# on SIGHUP) streams in flight get graceful_timeout seconds to finish; a service manager
# must wait longer than that before it kills (deploy/systemd waits 75 s).
timeout = 30
graceful_timeout = 60
# The gevent worker gives a connection `keepalive` seconds to deliver each request's line
# and headers, the first one's included: a client that trickles them is cut then.
keepalive = _settings.client_header_timeout

# Logging: to stderr, where a service manager collects it. bioproxy writes its own
# access line per request (logger bioproxy.access) when the response has been sent, so
# streams are logged with their whole duration; gunicorn's own access log stays off.
errorlog = "-"
loglevel = "info"

# gunicorn's control socket has one default path per user, so two servers on a machine
# would contend for it; bioproxy's admin port is its control surface instead.
control_socket_disable = True


def on_starting(server):
    """Refuse a configuration that would run bioproxy half-working."""
    problems = []
    if server.cfg.workers != 1:
        problems.append(f"workers = {server.cfg.workers}")
    if server.cfg.worker_class_str not in ("gevent", worker_class):
        problems.append(f"worker_class = {server.cfg.worker_class_str!r}")
    if problems:
        sys.exit(
            f"bioproxy: runs with exactly one gevent worker (its slot model and queue live in "
            f"that one process), got {' and '.join(problems)}: remove -w / -k from the command"
        )


def when_ready(server):
    """Listening: the `bioproxy` command prints its banner now."""
    if os.environ.get("BIOPROXY_BANNER"):
        from bioproxy.banner import banner

        print(banner(_settings, chat_page=bool(os.environ.get("BIOPROXY_CHAT_PAGE"))), flush=True)


def post_worker_init(worker):
    """Set up the worker's sockets and bioproxy's logging."""
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
    logger.info("%s", _config.describe_source(_settings))
    # The greenlet that watches the templates and keeps them warm, stopped as soon as the
    # worker is told to go (SIGTERM, or a reload): it must not start work it cannot finish,
    # nor overlap with the next worker's warmups.
    import gevent

    warmer = worker.wsgi.extensions["bioproxy"].warmer
    warmer.start()

    def stop_warmer_when_told():
        while worker.alive:
            gevent.sleep(0.2)
        warmer.stop()

    gevent.spawn(stop_warmer_when_told)


def worker_exit(server, worker):
    """After the last request: stop the warmer (if not yet) and close llama.cpp connections."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        state = app.extensions["bioproxy"]
        state.warmer.stop()
        state.upstream.close()
