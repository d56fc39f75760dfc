"""Backend faults between bioproxy and a real llama-server, made by tests/faultproxy.py.

Each case: the exact outcome for the client, in bounded time, and a next request that
succeeds once the network behaves again.
"""

import json
import time

import pytest
import requests

from tests.faultproxy import FaultProxy
from tests.servers import Bioproxy, JSONHandler, serve_http

TIMEOUT = 3  # bioproxy's upstream_timeout here: short, with room for a busy machine
CHAT = {"messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 24}


@pytest.fixture
def faulty(llama, tmp_path):
    """(fault proxy, bioproxy behind it) with a 3 s upstream read timeout."""
    proxy = FaultProxy(llama.port)
    try:
        with Bioproxy(proxy.url, tmp_path, upstream_timeout=TIMEOUT) as bioproxy:
            yield proxy, bioproxy
    finally:
        proxy.close()


def post(bioproxy, stream=False):
    return requests.post(
        bioproxy.proxy_url + "/v1/chat/completions",
        json={**CHAT, "stream": stream},
        stream=stream,
        timeout=30,
    )


def read_stream(answer):
    """(body, whether it ended cleanly): a cut stream raises in requests, caught here."""
    body = b""
    try:
        for chunk in answer.iter_content(chunk_size=None):
            body += chunk
    except requests.exceptions.ChunkedEncodingError:
        return body, False
    return body, True


def assert_recovers(proxy, bioproxy):
    proxy.set("pass")
    answer = post(bioproxy)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]


def assert_json_error(answer, status, code):
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "mode, status, code, seconds",
    [
        ("refuse", 502, "upstream_unavailable", (0, 1)),  # accepted, closed before a byte
        (("reset", 0), 502, "upstream_unavailable", (0, 1)),  # reset before any answer
        ("stall", 504, "upstream_timeout", (TIMEOUT, TIMEOUT + 4)),  # never answers
    ],
    ids=["refused", "reset", "silent"],
)
def test_no_answer_is_a_json_error_in_bounded_time(faulty, mode, status, code, seconds):
    proxy, bioproxy = faulty
    proxy.set(mode)

    start = time.monotonic()
    answer = post(bioproxy)

    assert_json_error(answer, status, code)
    assert seconds[0] <= time.monotonic() - start < seconds[1]
    assert bioproxy.metric("bioproxy_upstream_errors_total", kind=code) == 1
    assert_recovers(proxy, bioproxy)


def test_headers_then_silence_is_a_504_after_the_timeout(faulty):
    proxy, bioproxy = faulty
    proxy.set("stall_after_headers")

    start = time.monotonic()
    answer = post(bioproxy, stream=True)

    # Nothing had reached the client yet: it gets an error, not a connection closed on it.
    assert_json_error(answer, 504, "upstream_timeout")
    assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 4
    assert bioproxy.metric("bioproxy_upstream_errors_total", kind="upstream_timeout") == 1
    assert_recovers(proxy, bioproxy)


@pytest.mark.parametrize("fault", ["cut", "reset"])
def test_a_stream_broken_mid_body_is_cut_for_the_client_too(faulty, fault):
    proxy, bioproxy = faulty
    proxy.set((fault, 400))  # the headers and a little of the body

    answer = post(bioproxy, stream=True)
    body, clean = read_stream(answer)

    assert answer.status_code == 200
    assert not clean and b"[DONE]" not in body
    assert bioproxy.metric("bioproxy_upstream_errors_total", kind="upstream_cut") == 1
    assert_recovers(proxy, bioproxy)


def test_a_slow_network_delays_but_loses_nothing(faulty):
    proxy, bioproxy = faulty
    proxy.set(("latency", 0.05))

    answer = post(bioproxy, stream=True)
    body, clean = read_stream(answer)

    assert answer.status_code == 200 and clean
    assert body.rstrip().endswith(b"data: [DONE]")


class Loading(JSONHandler):
    """llama-server while it loads its model: 503 to everything."""

    body = json.dumps(
        {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    ).encode()

    def do_GET(self):
        self.send_json(self.body, 503, "application/json; charset=utf-8")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()


def test_a_loading_model_s_503_passes_through_and_health_says_loading(tmp_path):
    server = serve_http(Loading)
    try:
        with Bioproxy(server.url, tmp_path) as bioproxy:
            answer = post(bioproxy)
            health = requests.get(bioproxy.admin_url + "/health", timeout=5)
    finally:
        server.shutdown()

    assert answer.status_code == 503
    assert answer.content == Loading.body  # llama.cpp's own answer, unchanged
    assert health.status_code == 503
    assert health.json()["backend"]["status"] == "loading"
