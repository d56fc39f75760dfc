"""A TCP proxy for tests that sits between bioproxy and llama-server and misbehaves on demand.

Requests go through untouched; answers (llama-server to bioproxy) suffer the mode that
was set() when their connection was accepted:

- "pass": nothing happens
- ("latency", seconds): each chunk of the answer waits that long
- ("throttle", bytes_per_second): the answer trickles
- ("cut", n): n bytes of the answer pass, then both sides are closed
- ("reset", n): n bytes pass, then the connection to bioproxy is reset (RST)
- "stall": the request is read, and nothing is ever answered
- "stall_after_headers": the answer's headers pass, then nothing more
- "refuse": connections are accepted and closed at once, before any byte

Every byte sent to llama-server is kept, to show what was never sent: see received().
"""

import contextlib
import re
import socket
import struct
import threading
import time

from tests.servers import Listener, close_socket


class FaultProxy(Listener):
    def __init__(self, upstream_port, host="127.0.0.1"):
        super().__init__(host)
        self.upstream = (host, upstream_port)
        self.mode = "pass"
        self.requests = []  # per connection, the bytes that reached llama-server
        self.listen()

    def set(self, mode):
        """Misbehave from now on: connections already open (pooled by bioproxy) are closed,
        so the next request comes on a new one, which gets the mode."""
        self.mode = mode
        self.close_open_connections()

    def received(self):
        """Every byte llama-server got through this proxy, one connection after another."""
        return b"\n".join(bytes(record) for record in self.requests)

    def body_with(self, marker):
        """The body of the last request llama-server got whose body holds marker, or None."""
        found = None
        for record in list(self.requests):
            for body in _bodies(bytes(record)):
                if marker in body:
                    found = body
        return found

    def accepted(self, client):
        mode = self.mode
        if mode == "refuse":
            close_socket(client)
            return
        threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client, mode):
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            close_socket(client)
            return
        self.sockets.append(upstream)
        record = bytearray()
        self.requests.append(record)
        threading.Thread(target=_pump, args=(client, upstream, record), daemon=True).start()
        if mode == "stall":
            return  # bioproxy's request reaches llama-server; its answer never comes back
        try:
            self._answer(upstream, client, mode)
        except OSError:
            pass
        finally:
            close_socket(upstream)

    def _answer(self, upstream, client, mode):
        kind, value = mode if isinstance(mode, tuple) else (mode, None)
        sent, head = 0, b""
        if kind in ("cut", "reset") and value == 0:
            time.sleep(0.05)  # the request is on its way: break the connection before any answer
            _break(client, reset=kind == "reset")
            return
        while True:
            data = upstream.recv(4096)
            if not data:
                client.shutdown(socket.SHUT_WR)
                return
            if kind in ("cut", "reset") and sent + len(data) >= value:
                client.sendall(data[: value - sent])
                _break(client, reset=kind == "reset")
                return
            if kind == "stall_after_headers":
                head += data
                end = head.find(b"\r\n\r\n")
                if end >= 0:
                    client.sendall(head[: end + 4])
                    while not self.closed:
                        time.sleep(0.1)  # hold the connection open, silent
                    return
                continue
            if kind == "latency":
                time.sleep(value)
            if kind == "throttle":
                for i in range(len(data)):
                    client.sendall(data[i : i + 1])
                    time.sleep(1 / value)
                sent += len(data)
                continue
            client.sendall(data)
            sent += len(data)


def _bodies(stream):
    """The body of each request in one connection's bytes, in order.

    bioproxy sends its bodies with a Content-Length; a request without one has none.
    """
    at = 0
    while True:
        end = stream.find(b"\r\n\r\n", at)
        if end < 0:
            return
        length = re.search(rb"(?im)^content-length: *(\d+)", stream[at:end])
        start, at = end + 4, end + 4 + (int(length.group(1)) if length else 0)
        yield stream[start:at]


def _pump(source, target, record):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                target.shutdown(socket.SHUT_WR)
                return
            record += data
            target.sendall(data)
    except OSError:
        pass


def _break(sock, reset):
    """Close a connection: with an RST instead of a FIN when reset.

    The pump thread is blocked reading the same socket, which keeps a plain close() from
    taking effect: shutting the reading side down first wakes it up.
    """
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()  # not close_socket(): its shutdown would send a FIN before the RST
