"""Slow clients (slowloris): many connections that trickle their headers, or a body.

gunicorn's gevent worker gives each connection client_header_timeout seconds to deliver
a request's line and headers; bioproxy gives the body client_body_timeout seconds. Slow
connections cost one greenlet each while they last, so other clients go on as usual.
"""

import socket
import statistics
import threading
import time

import pytest
import requests

from tests.servers import Bioproxy, JSONHandler, serve_http

SLOW_CONNECTIONS = 500
HEADER_TIMEOUT = 2
BODY_TIMEOUT = 2.0


class Models(JSONHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_json({"object": "list", "data": []})


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    server = serve_http(Models)
    config = {"client_header_timeout": HEADER_TIMEOUT, "client_body_timeout": BODY_TIMEOUT}
    with Bioproxy(server.url, tmp_path_factory.mktemp("slow"), config) as proxy:
        yield proxy
    server.shutdown()


def latencies(url, count=40):
    """Seconds each of count GET requests took, on one keep-alive session."""
    times = []
    with requests.Session() as session:
        for _ in range(count):
            start = time.monotonic()
            assert session.get(url, timeout=10).status_code == 200
            times.append(time.monotonic() - start)
    return times


class Trickler:
    """Connections that send their request one byte a second, from one thread."""

    def __init__(self, port, request, count, head=b""):
        self.request = request
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(head)  # sent at once: only request is trickled
        self.sent = 0
        self.closed_after = {}  # socket -> seconds from its first byte until bioproxy closed it
        self.answers = {}  # socket -> what bioproxy sent before closing
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.sent < len(self.request) and len(self.closed_after) < len(self.sockets):
            for sock in self.sockets:
                if sock not in self.closed_after:
                    try:
                        sock.sendall(self.request[self.sent : self.sent + 1])
                    except OSError:
                        self._closed(sock)
            self.sent += 1
            self._collect(timeout=1.0)

    def _collect(self, timeout):
        """Wait up to timeout for bioproxy to answer or close open sockets."""
        deadline = time.monotonic() + timeout
        for sock in self.sockets:
            if sock in self.closed_after:
                continue
            sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            self.answers[sock] = self.answers.get(sock, b"") + data
            if not data:
                self._closed(sock)

    def _closed(self, sock):
        self.closed_after[sock] = time.monotonic() - self.started
        sock.close()

    def wait(self, timeout):
        self.thread.join(timeout)
        for sock in self.sockets:
            if sock not in self.closed_after:
                sock.close()


def test_500_connections_trickling_headers_are_cut_and_others_go_on(proxy):
    url = proxy.proxy_url + "/v1/models"
    before = latencies(url)
    head = b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"x" * 100 + b"\r\n\r\n"

    slow = Trickler(proxy.proxy_port, head, SLOW_CONNECTIONS)
    time.sleep(0.5)  # every slow connection is open and sending
    during = latencies(url)
    slow.wait(timeout=HEADER_TIMEOUT + 30)

    cut = sorted(slow.closed_after.values())
    print(
        f"{SLOW_CONNECTIONS} slow connections cut after {cut[0]:.2f}-{cut[-1]:.2f} s; others' "
        f"median {statistics.median(before) * 1000:.1f} ms before, "
        f"{statistics.median(during) * 1000:.1f} ms during (max {max(during) * 1000:.1f} ms)"
    )
    assert len(slow.closed_after) == SLOW_CONNECTIONS
    assert all(HEADER_TIMEOUT - 0.5 < s < HEADER_TIMEOUT + 5 for s in slow.closed_after.values())
    assert not any(slow.answers.values())  # cut without an answer, as nginx does
    assert statistics.median(during) < statistics.median(before) * 3 + 0.02
    assert max(during) < 1.0
    assert proxy.metric("bioproxy_requests_in_flight") == 0


def test_a_trickled_body_gets_408_at_the_body_timeout_and_others_go_on(proxy):
    url = proxy.proxy_url + "/v1/models"
    body = b'{"messages": []}' * 10
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    slow = Trickler(proxy.proxy_port, body, 20, head)
    before = latencies(url)

    slow.wait(timeout=BODY_TIMEOUT + HEADER_TIMEOUT + 30)

    assert len(slow.closed_after) == len(slow.answers) == 20
    for answer in slow.answers.values():
        status, _, rest = answer.partition(b"\r\n")
        assert status.split()[:2] == [b"HTTP/1.1", b"408"]
        assert b'"code":"request_timeout"' in rest.replace(b" ", b"")
    # Answered at the body timeout; the connection closed once the header timeout ran out
    # for the rest of the body (gunicorn reads on to find the next request).
    assert all(s < BODY_TIMEOUT + HEADER_TIMEOUT + 5 for s in slow.closed_after.values())
    assert statistics.median(latencies(url)) < statistics.median(before) * 3 + 0.02
    assert proxy.metric("bioproxy_requests_in_flight") == 0
