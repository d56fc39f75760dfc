"""Answers a real llama-server never gives, from the raw-socket fake of tests/rawupstream.py.

Each case: the client's exact outcome in bounded time, the request sent to the fake once
(never twice), and a next request that succeeds once the fake answers well again. Paths
that wait for a slot (POST /v1/chat/completions, /completion) and paths forwarded at once
(GET /v1/models, POST /tokenize) are both used.
"""

import json
import time

import pytest
import requests
import urllib3

from tests.rawupstream import SLOTS, RawUpstream, chunked, event, good_answer, good_body, response
from tests.servers import Bioproxy

TIMEOUT = 4  # bioproxy's upstream_timeout: a case that hangs shows as 4 s or more
BOUND = 2  # seconds each garbled answer may take, end to end
SLOTTED = ("POST", "/v1/chat/completions")
UNSLOTTED = ("GET", "/v1/models")


@pytest.fixture(scope="module")
def fake():
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def proxy(fake, tmp_path_factory):
    # The warmer reads /props and /slots once, at start: after that only the tests'
    # requests reach the fake, which answer(data) without a path relies on.
    with Bioproxy(
        fake.url,
        tmp_path_factory.mktemp("garbage"),
        upstream_timeout=TIMEOUT,
        warmup_check_interval=3600,
    ) as server:
        # Requests are scheduled in slots only once the warmer has seen them.
        assert wait_for(lambda: len(status(server)["slots"]) == SLOTS)
        yield server


@pytest.fixture
def garbled(fake, proxy):
    if not wait_for(proxy.settled):
        pytest.fail(f"an earlier test left a slot taken or the queue full: {status(proxy)}")
    yield fake, proxy
    fake.scripts.clear()  # a failed test must not leave its garbage to the next one


def status(server):
    return requests.get(server.admin_url + "/status", timeout=5).json()


def wait_for(condition, seconds=BOUND):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def send(proxy, method, path, stream=False):
    body = None
    if method == "POST":
        message = [{"role": "user", "content": "hi"}]
        body = {"messages": message, "prompt": "hi", "content": "hi", "stream": stream}
    return requests.request(method, proxy.proxy_url + path, json=body, stream=True, timeout=30)


def read_body(answer):
    """(the body's bytes as sent, whether it ended cleanly rather than cut off)."""
    body = b""
    try:
        for chunk in answer.raw.stream(64 * 1024, decode_content=False):
            body += chunk
    except urllib3.exceptions.ProtocolError:
        return body, False
    return body, True


def errors(proxy, kind):
    return proxy.metric("bioproxy_upstream_errors_total", kind=kind)


def assert_recovers(fake, proxy, method, path, stream=False):
    fake.good(path)
    answer = send(proxy, method, path, stream)
    body, clean = read_body(answer)
    assert (answer.status_code, clean) == (200, True), body
    assert body == good_body(method, path, stream)
    # Every slot given back: a garbled answer must not keep one.
    assert wait_for(proxy.settled), status(proxy)


HEAD = ["Content-Type: application/json"]

# Answers that cannot be passed on: nothing of them reached the client yet. The comments
# say what bioproxy did before upstream.py checked response heads.
NOT_ANSWERS = {
    "not HTTP": (b"SSH-2.0-OpenSSH_9.6\r\n", "close"),
    "malformed status line": (response("HTTP/1.1 2OO OK", ["Content-Length: 2"], "{}"), "keep"),
    # Was: the headers after the line were lost (Content-Length), the body read until
    # upstream_timeout, then the client's connection cut.
    "malformed header line": (
        response("HTTP/1.1 200 OK", [*HEAD, "this is not a header", "Content-Length: 2"], "{}"),
        "keep",
    ),
    "100 KB header": (
        response("HTTP/1.1 200 OK", ["X-Big: " + "a" * 100_000, "Content-Length: 2"], "{}"),
        "keep",
    ),
    # Was: gunicorn refused it after the response was built, a 500 page, and the
    # response's close callbacks never ran: the slot stayed taken, the queue stalled.
    "control character in a header": (
        response("HTTP/1.1 200 OK", [*HEAD, "X-Note: a\x00b", "Content-Length: 2"], "{}"),
        "keep",
    ),
    # Was: passed on as the final answer, without a body; the real one never sent.
    "103 before the answer": (
        response("HTTP/1.1 103 Early Hints", ["Link: </style.css>"]) + good_answer(*UNSLOTTED),
        "keep",
    ),
    # Was: Content-Length: 2 went on to the client, with the 3-byte chunked body.
    "Content-Length and chunked": (
        response(
            "HTTP/1.1 200 OK",
            ["Content-Length: 2", "Transfer-Encoding: chunked"],
            chunked("abc"),
        ),
        "keep",
    ),
    # Was: passed on; the client got no body, after gunicorn's 5 s keep-alive.
    "negative Content-Length": (
        response("HTTP/1.1 200 OK", ["Content-Length: -1"], "{}"),
        "close",
    ),
}


@pytest.mark.parametrize("method, path", [UNSLOTTED, SLOTTED], ids=["forwarded", "slotted"])
@pytest.mark.parametrize("data, then", NOT_ANSWERS.values(), ids=NOT_ANSWERS.keys())
def test_an_answer_that_cannot_be_passed_on_is_a_502(garbled, data, then, method, path):
    fake, proxy = garbled
    fake.answer(data, path, then)
    before, sent = errors(proxy, "upstream_unavailable"), fake.requests.count((method, path))

    start = time.monotonic()
    answer = send(proxy, method, path)
    body, clean = read_body(answer)
    elapsed = time.monotonic() - start

    assert (answer.status_code, clean) == (502, True), body[:300]
    assert answer.headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_unavailable")
    assert error["message"].startswith("llama.cpp at ")
    assert elapsed < BOUND
    assert fake.requests.count((method, path)) == sent + 1
    assert errors(proxy, "upstream_unavailable") == before + 1
    assert_recovers(fake, proxy, method, path)


CHAT_EVENT = event({"choices": [{"delta": {"content": "Hel"}}]})
SSE_HEAD = ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]
CHUNKED_HEAD = [*HEAD, "Transfer-Encoding: chunked"]

# Answers broken after their body started: (request, parts sent PAUSE apart, then what,
# the bytes the client must get before its connection is cut).
CUT = {
    "Content-Length longer than the body": (
        ("POST", "/tokenize", False),
        response("HTTP/1.1 200 OK", [*HEAD, "Content-Length: 100"], '{"tokens": [1, '),
        "close",
        b'{"tokens": [1, ',
    ),
    "invalid chunk size": (
        ("POST", "/completion", False),
        [
            response("HTTP/1.1 200 OK", CHUNKED_HEAD, chunked('{"content": ', last=False)),
            b"zz\r\nhello\r\n0\r\n\r\n",
        ],
        "keep",
        b'{"content": ',
    ),
    "no final chunk": (
        ("GET", "/v1/models", False),
        [
            response("HTTP/1.1 200 OK", CHUNKED_HEAD, chunked('{"object": ', last=False)),
            chunked('"list"', last=False),
        ],
        "close",
        b'{"object": "list"',
    ),
    "SSE cut mid-event (FIN)": (
        ("POST", "/v1/chat/completions", True),
        [
            response("HTTP/1.1 200 OK", SSE_HEAD, chunked(CHAT_EVENT, last=False)),
            chunked('data: {"choices": [{"del', last=False),
        ],
        "close",
        CHAT_EVENT + b'data: {"choices": [{"del',
    ),
    "SSE cut mid-event (RST)": (
        ("POST", "/completion", True),
        [
            response("HTTP/1.1 200 OK", SSE_HEAD, chunked(event({"content": "Hel"}), last=False)),
            chunked('data: {"cont', last=False),
        ],
        "reset",
        event({"content": "Hel"}) + b'data: {"cont',
    ),
}


@pytest.mark.parametrize("request_, data, then, received", CUT.values(), ids=CUT.keys())
def test_an_answer_broken_mid_body_is_cut_for_the_client_too(
    garbled, request_, data, then, received
):
    fake, proxy = garbled
    method, path, stream = request_
    fake.answer(data, path, then)
    before, sent = errors(proxy, "upstream_cut"), fake.requests.count((method, path))

    start = time.monotonic()
    answer = send(proxy, method, path, stream)
    body, clean = read_body(answer)
    elapsed = time.monotonic() - start

    assert answer.status_code == 200
    # What came before the break, then a cut connection: never a clean end.
    assert (body, clean) == (received, False)
    assert elapsed < BOUND
    assert fake.requests.count((method, path)) == sent + 1
    assert wait_for(lambda: errors(proxy, "upstream_cut") == before + 1)
    assert_recovers(fake, proxy, method, path, stream)


def test_a_100_continue_before_the_answer_is_skipped(garbled):
    fake, proxy = garbled
    fake.answer(response("HTTP/1.1 100 Continue") + good_answer(*SLOTTED), SLOTTED[1])

    start = time.monotonic()
    answer = send(proxy, *SLOTTED)
    body, clean = read_body(answer)

    assert (answer.status_code, clean) == (200, True)
    assert body == good_body(*SLOTTED)
    assert time.monotonic() - start < BOUND
    assert_recovers(fake, proxy, *SLOTTED)


def test_an_http_1_0_answer_ended_by_close_passes_through_complete(garbled):
    fake, proxy = garbled
    head = response("HTTP/1.0 200 OK", HEAD, '{"object": ')
    # For the next connection: an HTTP/1.0 answer is the connection's last one anyway.
    fake.answer([head, b'"list", "data": []}'], then="close")

    start = time.monotonic()
    answer = send(proxy, *UNSLOTTED)
    body, clean = read_body(answer)

    assert (answer.status_code, clean) == (200, True)
    assert body == b'{"object": "list", "data": []}'
    assert time.monotonic() - start < BOUND
    assert_recovers(fake, proxy, *UNSLOTTED)


def test_a_content_encoding_is_passed_on_undecoded(garbled):
    fake, proxy = garbled
    headers = [*HEAD, "Content-Encoding: gzip", "Content-Length: 9"]
    fake.answer(response("HTTP/1.1 200 OK", headers, "not gzip!"), UNSLOTTED[1])

    answer = send(proxy, *UNSLOTTED)
    body, clean = read_body(answer)

    # Not bioproxy's to decode: the client gets llama.cpp's bytes and their encoding.
    assert (answer.status_code, clean) == (200, True)
    assert answer.headers["Content-Encoding"] == "gzip"
    assert body == b"not gzip!"
    assert_recovers(fake, proxy, *UNSLOTTED)


SMUGGLED = response("HTTP/1.1 200 OK", [*HEAD, "Content-Length: 17"], '{"smuggled": "!"}')


@pytest.mark.parametrize(
    "method, path, later",
    [(*SLOTTED, False), ("POST", "/tokenize", True)],
    ids=["in the same write", "a moment later"],
)
def test_bytes_beyond_the_content_length_never_answer_the_next_request(
    garbled, method, path, later
):
    fake, proxy = garbled
    good = good_answer(method, path)
    # A whole response after the body: served to the next request on the connection
    # pooled with it, it would look like a valid answer.
    fake.answer([good, SMUGGLED] if later else good + SMUGGLED, path)

    answer = send(proxy, method, path)
    body, clean = read_body(answer)
    assert (answer.status_code, clean, body) == (200, True, good_body(method, path))
    time.sleep(0.5 if later else 0)  # the extra bytes arrive while the connection idles
    fake.good(path)

    for _ in range(3):
        answer = send(proxy, method, path)
        body, clean = read_body(answer)
        assert (answer.status_code, clean, body) == (200, True, good_body(method, path))
    assert wait_for(proxy.settled), status(proxy)
