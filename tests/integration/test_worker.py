"""gunicorn's own edges under bioproxy's worker: its errors, Ctrl+C, the config line."""

import json
import signal
import socket

import pytest

from tests.integration.test_security import raw_request
from tests.servers import Bioproxy, free_port


@pytest.fixture
def server(tmp_path):
    with Bioproxy(f"http://127.0.0.1:{free_port()}", tmp_path) as server:
        yield server


def test_gunicorn_s_own_errors_are_openai_style_json(server):
    status, body = raw_request(server.proxy_port, "GET", "@127.0.0.1:9/x")  # not a target
    assert status == "HTTP/1.1 400 Bad Request"
    assert json.loads(body)["error"]["code"] == "bad_request"

    with socket.create_connection(("127.0.0.1", server.proxy_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert (error["code"], error["type"]) == (
        "request_header_fields_too_large",
        "invalid_request_error",
    )


def test_ctrl_c_stops_quietly_and_the_start_names_its_config(server):
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    log = server.log()
    assert "Traceback" not in log and "SystemExit" not in log, log
    # Which config and how many templates: here an empty config file, so none.
    assert "config: " in log and "0 template(s): none" in log, log
