"""Warmups evaluated by a second real llama-server, started like the first at nice 19.

What llama-server reports decides: the serving llama-server's own count of prompt tokens
(its --metrics) shows that it evaluated none of the template, and a templated answer's
timings show the template reused there from the file the warmup llama-server saved.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bioproxy.llamacpp import LlamaServer
from tests.integration.test_users_first import LONG, first_token_seconds, prompt_tokens
from tests.servers import Bioproxy, free_port, resident_kib, wait_until


def start_pair(folder):
    """The serving llama-server and the warmup one: the same flags and slot folder."""

    def server(name, nice):
        return LlamaServer(
            free_port(),
            slots=2,
            context=8192,
            slot_save_path=str(folder / "slots"),
            log_path=str(folder / f"{name}.log"),
            nice=nice,
            ram_cache=False,  # as the bioproxy command starts them
        )

    return server("serving", 0), server("warmup", 19)


def bioproxy_with(serving, warmup, folder):
    """bioproxy before serving, with warmup as its warmup llama-server, warming long.txt."""
    config = {"prefixes": {"@long": "long.txt"}, "warmup_check_interval": 0.5}
    return Bioproxy(
        serving.url,
        folder,
        config,
        slot_save_path=serving.slot_save_path,
        warmup_backend_url=warmup.url,
        warmup_backend_pid=warmup.process.pid,  # as the bioproxy command sets it
    )


def templated(proxy, words):
    body = {"messages": [{"role": "user", "content": f"@long {words}"}], "max_tokens": 4}
    r = requests.post(proxy.proxy_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["X-Bioproxy-Cache"], r.json()["timings"]


def warmup_backend(proxy):
    """What /status says of the warmup llama-server."""
    status = requests.get(proxy.admin_url + "/status", timeout=5).json()
    return status["backend_mode"]["warmup_backend"]


def test_templates_are_evaluated_there_and_users_are_never_made_to_wait(tmp_path):
    (tmp_path / "long.txt").write_text(LONG)
    serving, warmup = start_pair(tmp_path)
    with serving, warmup, bioproxy_with(serving, warmup, tmp_path) as proxy:
        wait_until(lambda: proxy.all_warm(), timeout=180, what="the template warm")
        if os.path.exists("/proc/self/autogroup"):  # its session's priority, not only its own
            with open(f"/proc/{warmup.process.pid}/autogroup") as f:
                assert f.read().strip().endswith("nice 19")
        evaluated_here = prompt_tokens(serving)
        assert prompt_tokens(warmup) > 2500  # the template, evaluated there
        assert evaluated_here < 50  # here: at most the restore's proof

        cache, timings = templated(proxy, "Which rule keeps the nearest records?")
        assert cache in ("slot", "restored")
        assert timings["cache_n"] > 2500 and timings["prompt_n"] < 40, timings

        # An edit while users keep coming: nothing is cancelled, and the warmup ends.
        (tmp_path / "long.txt").write_text("Edited.\n" + LONG)
        wait_until(
            lambda: warmup_backend(proxy)["evaluating"] == "@long",
            timeout=30,
            what="the evaluation of the edit there",
        )
        # A templated request now waits for that evaluation, then restores what it saved.
        waiter = ThreadPoolExecutor(1).submit(templated, proxy, "Which rule logs rejects?")
        served = 0
        while proxy.templates()["@long"]["state"] == "warming":
            assert first_token_seconds(proxy.proxy_url) < 5
            served += 1
            time.sleep(0.3)
        assert served >= 3  # users came during the warmup
        assert proxy.templates()["@long"]["state"] == "warm"
        assert proxy.metric("bioproxy_warmup_cancellations_total") == 0
        cache, timings = waiter.result(timeout=60)
        assert cache in ("slot", "restored")
        assert timings["cache_n"] > 2500 and timings["prompt_n"] < 40, timings
        # Here: the users' own tokens, and none of the edited template.
        assert prompt_tokens(serving) - evaluated_here < 60 * (served + 1)

        cache, timings = templated(proxy, "Which rule logs the rejected ones?")
        assert timings["cache_n"] > 2500 and timings["prompt_n"] < 40, timings
        described = warmup_backend(proxy)
        assert described["usable"] is True, json.dumps(described)
        assert described["requests_waited"] == 1
        # The users' prompts stopped its process (SIGSTOP) while it evaluated the edit.
        assert described["hold"]["problem"] is None, json.dumps(described)
        assert described["hold"]["holds"] >= 1 and described["hold"]["stopped"] is False


def test_the_serving_llama_server_keeps_no_ram_copies_of_its_slots(tmp_path):
    """With llama.cpp's default --cache-ram, every task that starts waits while llama-server
    copies each idle slot whose tokens changed into its RAM cache: the request after a
    templated one waited for the template's copy, and the copies grew its memory by the
    template's size with every templated request. Started as the bioproxy command starts
    it (its templates evaluated by the warmup llama-server), it keeps none."""
    (tmp_path / "long.txt").write_text(LONG)
    serving, warmup = start_pair(tmp_path)
    with serving, warmup, bioproxy_with(serving, warmup, tmp_path) as proxy:
        wait_until(lambda: proxy.all_warm(), timeout=180, what="the template warm")
        before = resident_kib(serving.process.pid) / 1024
        for i in range(5):
            cache, timings = templated(proxy, f"Which rule number {i} applies?")
            assert cache in ("slot", "restored")
            assert timings["prompt_n"] < 40, timings  # warm, from its slot or its file
            assert first_token_seconds(proxy.proxy_url) < 5  # a plain request after it
        grown = resident_kib(serving.process.pid) / 1024 - before
    # One copy of the template's slot is some 60 MiB: five would be 300.
    assert grown < 40, f"llama-server's memory grew by {grown:.0f} MiB over 5 templated requests"


def test_a_warmup_llama_server_started_otherwise_is_not_used(tmp_path):
    (tmp_path / "long.txt").write_text(LONG)
    serving, _ = start_pair(tmp_path)
    other = LlamaServer(
        free_port(),
        slots=1,  # another slot layout: its files would not restore into serving's slots
        context=4096,
        slot_save_path=str(tmp_path / "slots"),
        log_path=str(tmp_path / "other.log"),
    )
    with serving, other, bioproxy_with(serving, other, tmp_path) as proxy:
        wait_until(lambda: proxy.all_warm(), timeout=180, what="the template warm")
        assert prompt_tokens(other) == 0
        assert prompt_tokens(serving) > 2500  # warmed in serving's own slots
        mode = requests.get(proxy.admin_url + "/status", timeout=5).json()["backend_mode"]
        assert mode["warmup_backend"]["usable"] is False
        assert "not the serving" in mode["warmup_backend"]["problem"]
