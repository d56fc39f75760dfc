"""gunicorn settings for bioproxy: `gunicorn -c gunicorn.conf.py wsgi:app`.

Addresses come from bioproxy's own configuration (config file and BIOPROXY_*
environment), so gunicorn and the app always agree on which port is the admin port.
"""

import logging
import socket
import sys

# Module-level names are read as gunicorn settings, so bioproxy's own are kept private.
from bioproxy import config as _config

try:
    _settings = _config.load()
except _config.ConfigError as _e:
    sys.exit(f"bioproxy: configuration error: {_e}")

# Listeners: the proxy first, then the admin port.
bind = [_settings.proxy_bind, _settings.admin_bind]

# Workers: one gevent worker. Slot state, the warmup queue and the metrics live
# in this one process; gevent gives it thousands of concurrent connections.
workers = 1
worker_class = "gevent"
worker_connections = 1000
preload_app = False

# Timeouts: with gevent, `timeout` is only the worker heartbeat; long generations
# are bounded by bioproxy's upstream_timeout instead.
timeout = 30
graceful_timeout = 30
keepalive = 5

# Logging: to stderr, where a service manager collects it. bioproxy writes its own
# access line per request (logger bioproxy.access) when the response has been sent, so
# streams are logged with their whole duration; gunicorn's own access log stays off.
errorlog = "-"
loglevel = "info"

# gunicorn's control socket has one default path per user, so two servers on a machine
# would contend for it; bioproxy's admin port is its control surface instead.
control_socket_disable = True


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
    # The greenlet that watches the templates and keeps them warm.
    worker.wsgi.extensions["bioproxy"].warmer.start()


def worker_exit(server, worker):
    """Stop the warmer before the worker goes."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions["bioproxy"].warmer.stop()
