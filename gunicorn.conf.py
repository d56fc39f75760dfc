"""gunicorn settings for bioproxy: `gunicorn -c gunicorn.conf.py wsgi:app`.

Addresses come from bioproxy's own configuration (config file and BIOPROXY_*
environment), so gunicorn and the app always agree on which port is the admin port.
"""

import os
import sys

# Module-level names are read as gunicorn settings, so bioproxy's own are kept private.
from bioproxy import config as _config
from bioproxy import worker as _worker

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
    _worker.check_setup(server)  # exactly one worker, of bioproxy's class


def when_ready(server):
    _worker.print_banner(_settings)  # listening: the `bioproxy` command's banner


def post_worker_init(worker):
    _worker.start(worker)  # sockets, logging, and the warmer's greenlet


def worker_exit(server, worker):
    _worker.stop(worker)  # the warmer, and the connections to llama.cpp
