"""Noticing a client that leaves while its request waits, before its answer starts."""

import socket
from contextlib import contextmanager

import gevent
from gevent.socket import wait_read

from .errors import ClientGone


class ClientWatch:
    """Notices a client closing its connection before its answer starts.

    A request may wait long before llama.cpp sends a byte: for a slot, while llama-server
    reads a long prompt, or for a whole non-streamed answer. Nothing is written to the
    client meanwhile, so its leaving would go unseen, and llama-server would go on
    working for nobody. Under gunicorn only (it needs the client's socket): a greenlet
    waits for the socket to turn readable and peeks; no bytes means the client closed.
    Bytes (the client's next request) mean it is still there, and the watch ends.
    """

    def __init__(self, environ):
        self.socket = environ.get("gunicorn.socket")
        self.guarded = None  # the greenlet to interrupt when the client leaves

    @contextmanager
    def guard(self):
        """While inside, the client leaving raises ClientGone in this greenlet's next wait."""
        if self.socket is None:
            yield
            return
        self.guarded = gevent.getcurrent()
        watcher = gevent.spawn(self._watch)
        try:
            yield
        finally:
            self.guarded = None
            watcher.kill(block=False)  # without a switch, which could interrupt us

    def _watch(self):
        try:
            wait_read(self.socket.fileno())
            if self.socket.recv(1, socket.MSG_PEEK):
                return
        except ValueError:
            return  # a TLS socket cannot peek: it cannot be watched
        except OSError:
            pass
        # Raised from the hub, as gevent.Timeout does: the guarded greenlet is waiting.
        gevent.get_hub().loop.run_callback(self._interrupt)

    def _interrupt(self):
        if self.guarded is not None:
            self.guarded.throw(ClientGone("the client closed its connection before its answer"))
