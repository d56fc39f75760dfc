"""gunicorn settings of bench/stack_floor.py: one gevent worker, listeners with TCP_NODELAY.

A module of its own because gunicorn's master imports it: nothing here may import
requests or the app, which must come after the worker's monkey-patching (as in
bioproxy/worker.py).
"""

import socket

worker_class = "gevent"
workers = 1
errorlog = "-"
loglevel = "warning"
control_socket_disable = True


def post_worker_init(worker):
    # As bioproxy's worker does: Nagle's algorithm would hold the first chunk back.
    for listener in worker.sockets:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
