"""Keys with a real llama-server that has its own --api-key, and bioproxy in front of it."""

import json
import socket

import pytest
import requests

from tests.integration.conftest import start_llama
from tests.servers import Bioproxy, Listener, wait_until

LLAMA_KEY = "llama-side-key"
CLIENT_KEY = "client-side-key"


def chat(url, content, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_both_keys_keep_clients_out_and_let_bioproxy_in(tmp_path):
    (tmp_path / "t.txt").write_text("Answer in one word.\n<{message}>")
    config = {
        "prefixes": {"@t": "t.txt"},
        "warmup_check_interval": 0.5,
        "api_key": CLIENT_KEY,
        "backend_api_key": LLAMA_KEY,
    }
    with (
        start_llama(tmp_path / "llama", slots=1, extra_args=["--api-key", LLAMA_KEY]) as llama,
        Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy,
    ):
        # Its own calls (slots, apply-template, completion, save) carry llama-server's key.
        wait_until(lambda: proxy.templates()["@t"]["state"] == "warm", what="@t warm")
        assert chat(llama.url, "Hi").status_code == 401  # llama-server does want its key

        assert chat(proxy.proxy_url, "@t Hi").status_code == 401
        assert chat(proxy.proxy_url, "@t Hi", key=LLAMA_KEY).status_code == 401
        answer = chat(proxy.proxy_url, "@t Hi", key=CLIENT_KEY)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored")
        assert requests.get(proxy.proxy_url + "/health", timeout=5).status_code == 200


def test_without_llama_server_s_key_its_401_reaches_the_client(tmp_path):
    with (
        start_llama(tmp_path / "llama", slots=1, extra_args=["--api-key", LLAMA_KEY]) as llama,
        Bioproxy(llama.url, tmp_path) as proxy,
    ):
        answer = chat(proxy.proxy_url, "Hi")
        assert answer.status_code == 401
        # The client's own key for llama-server passes through when bioproxy has none.
        assert chat(proxy.proxy_url, "Hi", key=LLAMA_KEY).status_code == 200


def raw_request(port, method, target, body=b""):
    """(status line, body) of one request sent byte for byte, target as given."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), rest


class Recorder(Listener):
    """A listener that only counts who connects to it, and what they first send."""

    def __init__(self):
        super().__init__()
        self.received = []

    def accepted(self, sock):
        sock.settimeout(2)
        try:
            self.received.append(sock.recv(65536))
        except OSError:
            self.received.append(b"")


@pytest.mark.parametrize("method", ["GET", "OPTIONS", "POST"])
def test_no_request_target_reaches_another_host_or_gets_llama_server_s_key(llama, tmp_path, method):
    recorder = Recorder()
    recorder.listen()
    elsewhere = f"127.0.0.1:{recorder.port}"
    try:
        with Bioproxy(llama.url, tmp_path, backend_api_key=LLAMA_KEY) as proxy:
            # gunicorn takes any target with "://" in it as absolute-form, so these reach
            # bioproxy; the first was once joined as http://127.0.0.1:PORT@{elsewhere}/...
            for target in (f"@{elsewhere}/steal?via=://", f"http://{elsewhere}/steal"):
                status, body = raw_request(proxy.proxy_port, method, target, b"{}")
                assert status.split()[1] == "400", (target, status, body)
                assert json.loads(body)["error"]["code"] == "invalid_request_target"
            # The same port's own admin endpoints, through the proxy port (same trick).
            target = f"@127.0.0.1:{proxy.admin_port}/status?via=://"
            assert raw_request(proxy.proxy_port, method, target)[0].split()[1] == "400"
            # gunicorn lets "*" through for OPTIONS, and authority-form for CONNECT.
            assert raw_request(proxy.proxy_port, "OPTIONS", "*")[0].split()[1] == "400"
            assert raw_request(proxy.proxy_port, "CONNECT", elsewhere)[0].split()[1] == "405"
            assert raw_request(proxy.proxy_port, "GET", "/health")[0].split()[1] == "200"
    finally:
        recorder.close()
    assert recorder.received == []


# Each is routed by llama-server to its slot actions (checked below against it directly).
SLOT_ACTIONS = [
    "/slots/0?action=erase",
    "/slots/0/?action=erase",
    "/slots%2F0?action=erase",
    "/slots%2f0%2F?action=erase",
    "/%73lots/0?action=erase",
    "/slot%u0073/0?action=erase",
]


def test_every_spelling_of_a_slot_action_is_refused_while_templates_are_served(llama, tmp_path):
    (tmp_path / "t.txt").write_text("Answer in one word.\n<{message}>")
    for target in SLOT_ACTIONS:
        status, body = raw_request(llama.port, "POST", target, b"{}")
        assert status.split()[1] == "200" and b'"n_erased"' in body, (target, status, body)
    config = {"prefixes": {"@t": "t.txt"}, "warmup_check_interval": 0.5}
    with Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy:
        wait_until(lambda: proxy.templates()["@t"]["state"] == "warm", what="@t warm")
        for target in [*SLOT_ACTIONS, "/slots/x?action=save", "/slots/?action=restore"]:
            status, body = raw_request(proxy.proxy_port, "POST", target, b"{}")
            assert status.split()[1] == "403", (target, status, body)
            assert json.loads(body)["error"]["code"] == "slot_api_reserved"
        # Not a slot action for llama-server either: forwarded, and its 404 comes back.
        assert raw_request(proxy.proxy_port, "POST", "/slots/0//?action=erase")[0].split()[1] == (
            "404"
        )
        answer = chat(proxy.proxy_url, "@t Hi")
        assert answer.headers["X-Bioproxy-Cache"] == "slot"
        assert proxy.templates()["@t"]["state"] == "warm"
