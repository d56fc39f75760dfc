"""Test-only servers on loopback: raw listeners and small JSON handlers for fakes.

bioproxy and nginx themselves are run by bioproxy.testing, which the benchmarks share.
"""

import contextlib
import http.server
import json
import socket
import threading

from bioproxy.testing import ROOT, Bioproxy, Nginx, free_port, wait_until

__all__ = ["ROOT", "Bioproxy", "Nginx", "free_port", "wait_until"]


class Listener:
    """A TCP listener on a free loopback port for the tests' raw fakes.

    Each connection goes to accepted(sock), called in the accept thread; close() closes
    the listener and every socket in self.sockets.
    """

    def __init__(self, host="127.0.0.1"):
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.sockets = []
        self.closed = False

    def listen(self):
        threading.Thread(target=self._accept, daemon=True).start()

    def accepted(self, sock):
        raise NotImplementedError

    def close_open_connections(self):
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            close_socket(sock)

    def close(self):
        self.closed = True
        self.listener.close()
        self.close_open_connections()

    def _accept(self):
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(sock)
            self.accepted(sock)


def close_socket(sock):
    """Close a socket another thread may be reading: shutdown() first wakes that thread."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """Base of the tests' tiny HTTP servers (fake backends): JSON answers, no request log."""

    # Headers and body go out in two writes: with Nagle's algorithm, the body would wait
    # for the client's delayed ACK of the headers (40 ms).
    disable_nagle_algorithm = True

    def send_json(self, value, status=200, content_type="application/json"):
        """Answer value as JSON (bytes are sent as they are), with its Content-Length."""
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve_http(handler, backlog=64):
    """The handler served on a free loopback port from a thread; call shutdown() after."""

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = backlog  # read when the server starts listening

    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server


def resident_kib(pid):
    """A process's resident memory (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
