"""A 10 MB message, through bioproxy under gunicorn, to a real llama-server.

Between bioproxy and llama-server sits tests/faultproxy.py, passing everything on and
recording it: what llama-server got, or never got, is read from there.
"""

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from bioproxy import templates
from tests.faultproxy import FaultProxy
from tests.servers import Bioproxy, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
SIZE = 10_000_000
WORDS = "the quick brown fox jumps over the lazy dog and keeps running far away "


def big_message(marker):
    """About 10 MB of plain words, starting with a marker that nothing else sends."""
    text = marker + " " + WORDS * (SIZE // len(WORDS) + 1)
    return text[:SIZE]


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


@pytest.fixture
def start(llama, tmp_path):
    """start(**settings): bioproxy with the example @code template, behind a recorder."""
    shutil.copytree(EXAMPLES / "templates", tmp_path / "templates")
    config = {"prefixes": {"@code": "templates/code.txt"}, "warmup_check_interval": 0.5}
    recorder = FaultProxy(llama.port)
    servers = []

    def start(**settings):
        server = Bioproxy(recorder.url, tmp_path, config, **settings).start().wait_ready()
        servers.append(server)
        server.recorder = recorder
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        recorder.close()


def send_chunked(data):
    """The body in 64 KiB chunks, so that requests sends it without Content-Length."""
    return (data[i : i + 65536] for i in range(0, len(data), 65536))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_10_mb_message_is_a_413_under_the_default_limit_and_never_forwarded(start, framing):
    server = start()  # max_request_bytes: its default, 8 MiB
    marker = "MARKER-" + os.urandom(8).hex()
    body = json.dumps(chat("@code " + big_message(marker))).encode()
    data = send_chunked(body) if framing == "chunked" else body
    with requests.Session() as session:
        began = time.monotonic()
        answer = session.post(
            server.proxy_url + "/v1/chat/completions",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        seconds = time.monotonic() - began

        assert answer.status_code == 413, answer.text
        assert answer.json()["error"] == {
            "code": "request_too_large",
            "message": "request body is larger than max_request_bytes (8388608 bytes)",
            "param": None,
            "type": "invalid_request_error",
        }
        assert seconds < 10
        # The same connection goes on: the rest of the body was not taken for a request.
        after = session.post(
            server.proxy_url + "/v1/chat/completions", json=chat("Say hi."), timeout=120
        )
        assert after.status_code == 200, after.text
    received = server.recorder.received()
    assert b"Say hi." in received
    assert marker.encode() not in received
    assert b"quick brown fox" not in received


def probe(urls, stop, results):
    """GET each url in turn until stop is set: [(url, status or error, seconds)]."""
    while not stop.is_set():
        for url in urls:
            began = time.monotonic()
            try:
                status = requests.get(url, timeout=30).status_code
            except requests.RequestException as e:
                status = repr(e)
            results.append((url, status, time.monotonic() - began))
        time.sleep(0.1)


def test_a_10_mb_templated_message_under_a_raised_limit_is_llama_server_s_400(start, tmp_path):
    server = start(max_request_bytes=32 << 20)
    # Warm first, so that no warmup shares the CPU with the request being measured.
    deadline = time.monotonic() + 180
    while server.templates()["@code"]["state"] != "warm":
        assert time.monotonic() < deadline, server.templates()
        time.sleep(0.2)
    marker = "MARKER-" + os.urandom(8).hex()
    message = big_message(marker)
    stop, probes = threading.Event(), []
    # The proxy port's /health goes to llama-server, the admin port's is bioproxy's own:
    # both are served by the one gevent worker busy with the big request.
    urls = [server.proxy_url + "/health", server.admin_url + "/health"]
    prober = threading.Thread(target=probe, args=(urls, stop, probes))
    other = {}

    def other_client():
        # Another user's short request, in the other slot, while the big one is read.
        time.sleep(1)
        began = time.monotonic()
        answer = requests.post(
            server.proxy_url + "/v1/chat/completions", json=chat("Say hi."), timeout=120
        )
        other.update(status=answer.status_code, seconds=time.monotonic() - began)

    helper = threading.Thread(target=other_client)
    prober.start()
    helper.start()
    began = time.monotonic()
    try:
        answer = requests.post(
            server.proxy_url + "/v1/chat/completions",
            json=chat("@code " + message),
            timeout=300,
        )
        seconds = time.monotonic() - began
    finally:
        stop.set()
        prober.join()
        helper.join()

    # llama-server's own answer, passed through: the prompt does not fit a slot's context.
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "exceed_context_size_error"
    assert "exceeds the available context size" in error["message"]
    assert answer.headers["X-Bioproxy-Template"] == "@code"
    assert seconds < 180
    # Responsive meanwhile: every probe answered, none waited long behind the big body.
    assert len(probes) >= 4, probes
    assert all(status == 200 for _, status, _ in probes), probes
    assert max(took for _, _, took in probes) < 3, probes
    assert other["status"] == 200, other
    # What llama-server got is the template around the message, as valid JSON.
    assert sum(marker.encode() in r for r in server.recorder.requests) == 1
    sent_body = json.loads(server.recorder.body_with(marker.encode()))
    code = templates.load("@code", "templates/code.txt", str(tmp_path), str(tmp_path), 1 << 20)
    assert sent_body["messages"] == [{"role": "user", "content": code.render(message)}]
    assert sent_body["cache_prompt"] is True and isinstance(sent_body["id_slot"], int)
    # The slot is given back, and the template serves the next request as before.
    deadline = time.monotonic() + 30
    while not server.settled():
        assert time.monotonic() < deadline, "a slot stayed taken"
        time.sleep(0.1)
    answer = requests.post(
        server.proxy_url + "/v1/chat/completions",
        json=chat("@code How do I reverse a list?"),
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored")


def test_a_template_that_repeats_a_10_mb_message_is_a_413_and_never_sent(start, tmp_path):
    # Three <{message}>: 10 MB in, 30 MB to send, over a limit of 16 MiB.
    template = "A <{message}>\nB <{message}>\nC <{message}>\n"
    (tmp_path / "templates" / "code.txt").write_text(template)
    server = start(max_request_bytes=16 << 20)
    marker = "MARKER-" + os.urandom(8).hex()

    answer = requests.post(
        server.proxy_url + "/v1/chat/completions",
        json=chat("@code " + big_message(marker)),
        timeout=120,
    )

    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "request_too_large"
    assert "@code" in answer.json()["error"]["message"]
    assert marker.encode() not in server.recorder.received()
    deadline = time.monotonic() + 30
    while not server.settled():
        assert time.monotonic() < deadline, "a slot stayed taken"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 128"),
        (b'{"messages": [{"role": "user", "content": "@code hi"}], "max_tokens": NaN}', "NaN"),
        (b'{"prompt": "@code hi", "n_predict": 1e999}', "number too large"),
        (b'{"messages": [], "messages": [{"role": "user", "content": "hi"}]}', "twice"),
    ],
)
def test_a_body_bioproxy_cannot_read_is_a_400_that_changes_nothing(start, body, reason):
    server = start()
    wait_until(
        lambda: server.templates()["@code"]["state"] == "warm" and server.settled(),
        what="@code warm, every slot idle",
    )
    before = server.recorder.received()
    answer = requests.post(
        server.proxy_url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == ("bad_request", "invalid_request_error")
    assert reason in error["message"]
    # Never sent, no slot taken, no warmup held off.
    assert server.recorder.received() == before
    assert server.settled()
    assert server.metric("bioproxy_warmup_cancellations_total") == 0
