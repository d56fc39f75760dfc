"""Two bioproxies in front of one real llama-server, sharing its slot folder (a standby
beside the active one, or two machines' proxies before one server)."""

import json
import os

import requests

from bioproxy.testing import examples_workdir
from tests.integration.conftest import start_llama
from tests.servers import Bioproxy, wait_until


def ask(proxy, text):
    """A templated chat request: (bioproxy's cache label, llama-server's timings)."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}
    answer = requests.post(proxy.proxy_url + "/v1/chat/completions", json=body, timeout=120)
    answer.raise_for_status()
    return answer.headers.get("X-Bioproxy-Cache"), answer.json()["timings"]


def test_two_bioproxies_before_one_llama_server_keep_their_own_files(tmp_path):
    with start_llama(tmp_path / "llama") as llama:
        folder = llama.slot_save_path
        proxies, works = [], []
        for name in ("one", "other"):
            work, config = examples_workdir(tmp_path / name, folder)
            proxies.append(Bioproxy(llama.url, work, config))
            works.append(work)
        with proxies[0] as one, proxies[1] as other:
            wait_until(lambda: one.all_warm() and other.all_warm(), what="both warm")
            # Each bioproxy's files for @code and @review, apart from the other's.
            files = {os.path.basename(f) for f in os.listdir(folder)}
            assert len(files) == 4

            texts = ("@code Why?", "@review x = 1") * 3
            answers = [ask(proxy, text) for text in texts for proxy in (one, other)]

            # The other's requests take the slots in turn: a restore of one's own file,
            # never a file the other overwrote and never the template evaluated again.
            assert all(cache in ("slot", "restored") for cache, _ in answers)
            assert all(timings["prompt_n"] < 40 for _, timings in answers)
            for proxy, work in zip((one, other), works, strict=True):
                with open(os.path.join(work, "state", "saved.json")) as f:
                    saved = json.load(f)
                assert {entry["file"] for entry in saved.values()} <= files
                assert "SHA-256 differs" not in proxy.log()
                assert "deleted slot file" not in proxy.log()
            assert {os.path.basename(f) for f in os.listdir(folder)} == files
