"""bioproxy in front of llama-server as its users start it: `llama-server -m MODEL --port P`.

llama.cpp's defaults then: slots automatic, a unified KV cache, and idle slots copied to
its RAM cache and cleared whenever a task starts (issue 11). Warm is what llama-server's
own timings say: the template's tokens reused, only the user's words evaluated.
"""

import json
import shutil
from pathlib import Path

import pytest
import requests

from bioproxy.llamacpp import LlamaServer
from tests.integration.test_slot_faults import wait_until
from tests.servers import Bioproxy, free_port

# The example templates users get (@code ~900 tokens, @review ~270): the chat template's
# own few tokens that every request shares (24 here) stay under llama-server's 10 % prompt
# similarity, so a request is not placed beside a slot holding another prompt.
EXAMPLES = Path(__file__).parents[2] / "examples"


def users_llama(folder, slot_folder=None):
    return LlamaServer(
        free_port(),
        defaults=True,
        slot_save_path=str(slot_folder) if slot_folder else None,
        log_path=str(folder / "llama-server.log"),
    )


def workdir(folder, slot_folder=None):
    work = folder / "bioproxy"
    shutil.copytree(EXAMPLES, work)
    config = {**json.loads((work / "config.json").read_text()), "warmup_check_interval": 1}
    if slot_folder:
        config["slot_save_path"] = str(slot_folder)
    return work, config


def chat(bioproxy, text):
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 4}
    answer = requests.post(bioproxy.proxy_url + "/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer


@pytest.mark.parametrize("slot_folder", [False, True], ids=["defaults", "with-slot-save-path"])
def test_templated_requests_evaluate_only_the_user_s_words(tmp_path, slot_folder):
    folder = tmp_path / "slots" if slot_folder else None
    work, config = workdir(tmp_path, folder)
    with users_llama(tmp_path, folder) as llama, Bioproxy(llama.url, work, config) as bp:
        assert requests.get(llama.url + "/props", timeout=10).json()["total_slots"] > 1
        templates = lambda: bp.templates().values()  # noqa: E731
        wait_until(lambda: all(t["state"] == "warm" for t in templates()), what="warm")
        sequence = [
            "@code How do I reverse a list?",
            "What is the capital of France?",
            "@review def f(x): return x*2",
            "@code How do I sort a dict by value?",
            "Name three colours.",
            "@code What does zip do?",
            "@review for i in range(len(xs)): print(xs[i])",
        ]
        seen = []
        for text in sequence:
            answer = chat(bp, text)
            timings = answer.json()["timings"]
            seen.append((text, answer.headers.get("X-Bioproxy-Cache"), timings))
        log = bp.log()
        misses = bp.metric("bioproxy_template_cache_misses_total")

    brief = [(text, cache, t["cache_n"], t["prompt_n"]) for text, cache, t in seen]
    print(*brief, sep="\n")  # with pytest -s: the figures docs/TEMPLATES.md quotes
    for text, cache, timings in seen:
        if text.startswith("@"):
            # The template reused; evaluated: the words, the chat template's few tokens.
            assert timings["cache_n"] > 200 and timings["prompt_n"] < 40, brief
            assert cache != "cold", brief
    assert misses == 0, log


def test_a_follow_up_turn_keeps_the_template_and_evaluates_only_its_new_words(tmp_path):
    # Issue 11.4: the follow-up went with the opening message raw, the template gone.
    work, config = workdir(tmp_path)
    with users_llama(tmp_path) as llama, Bioproxy(llama.url, work, config) as bp:
        # Every warmup done: one that starts between two turns empties the slot the first
        # turn left (bioproxy learns that llama-server clears idle slots by seeing it).
        templates = lambda: bp.templates().values()  # noqa: E731
        wait_until(lambda: all(t["state"] == "warm" for t in templates()), what="warm")
        opening = {"role": "user", "content": "@code How do I reverse a list?"}
        first = chat(bp, opening["content"])
        reply = first.json()["choices"][0]["message"]["content"]
        turns = [opening, {"role": "assistant", "content": reply}]
        body = {
            "messages": [*turns, {"role": "user", "content": "And in place?"}],
            "temperature": 0,
            "max_tokens": 4,
        }
        answer = requests.post(bp.proxy_url + "/v1/chat/completions", json=body, timeout=120)

    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Bioproxy-Template"] == "@code"
    timings = answer.json()["timings"]
    # The template and the first turn reused: the reply and the new words evaluated.
    assert timings["cache_n"] > 900 and timings["prompt_n"] < 40, timings
