"""Keys with a real llama-server that has its own --api-key, and bioproxy in front of it."""

import requests

from tests.integration.conftest import start_llama
from tests.servers import Bioproxy, wait_until

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
