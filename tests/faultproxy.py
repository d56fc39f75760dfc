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
"""

import contextlib
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, upstream_port, host="127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.mode = "pass"
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.sockets = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode):
        """Misbehave from now on: connections already open (pooled by bioproxy) are closed,
        so the next request comes on a new one, which gets the mode."""
        self.mode = mode
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            _close(sock)

    def close(self):
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            _close(sock)

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            mode = self.mode
            if mode == "refuse":
                _close(client)
                continue
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client, mode):
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _close(client)
            return
        self.sockets.append(upstream)
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        if mode == "stall":
            return  # bioproxy's request reaches llama-server; its answer never comes back
        try:
            self._answer(upstream, client, mode)
        except OSError:
            pass
        finally:
            _close(upstream)

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


def _pump(source, target):
    try:
        while True:
            data = source.recv(4096)
            if not data:
                target.shutdown(socket.SHUT_WR)
                return
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
    _close(sock)


def _close(sock):
    with contextlib.suppress(OSError):
        sock.close()
