"""A template after a client's own system message, against a real llama-server (issue 11).

Most chat clients send a system message of their own before the user's: the prompt then
opens with it, and the template's warmed cache does not apply. bioproxy serves each such
shape as a variant of the template: its first request is evaluated in full and reported
cold, and from the second on only the user's words are, across restarts too where
llama-server can save its slots. Warm is what llama-server's timings say; the answers are
the ones llama-server gives the same messages without any cache (see test_llama_configs).
"""

import contextlib
import json

import pytest
import requests

from bioproxy.testing import USERS_CONFIGS, examples_workdir, expanded, users_llama, wait_until
from tests.integration.test_llama_configs import post, same_answer, tokenize
from tests.servers import Bioproxy

SYSTEM_MESSAGE = {"role": "system", "content": "You are a patient teacher. Answer in one line."}
QUESTIONS = ["How do I reverse a list?", "How do I sort a dict by value?", "What does zip do?"]


def body(*messages):
    return {
        "messages": list(messages),
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 5,
    }


def user(text):
    return {"role": "user", "content": text}


def ask(url, question, system=SYSTEM_MESSAGE):
    return post(url, body(system, user(f"@code {question}")))


def sequence(bp):
    """The variant's three questions, with plain and other-template requests between."""
    seen = [ask(bp.proxy_url, QUESTIONS[0]), ask(bp.proxy_url, QUESTIONS[1])]
    post(bp.proxy_url, body(user("What is the capital of France?")))
    post(bp.proxy_url, body(user("@review def f(x): return x*2")))
    seen.append(ask(bp.proxy_url, QUESTIONS[2]))
    return seen


def reference(llama, work, question, system=SYSTEM_MESSAGE, prefix="@code"):
    """llama-server's own answer to the expanded messages, with no cache at all."""
    messages = body(system, user(expanded(work, f"{prefix} {question}")))
    return post(llama.url, {**messages, "cache_prompt": False}).json()


@pytest.mark.parametrize("config", ["np2-slot-save-path", "slot-save-path", "defaults"])
def test_a_system_message_s_second_request_evaluates_only_the_user_s_words(tmp_path, config):
    args, has_folder = USERS_CONFIGS[config]
    folder = tmp_path / "slots" if has_folder else None
    work, settings = examples_workdir(tmp_path, folder)
    with users_llama(tmp_path, args, folder) as llama, Bioproxy(llama.url, work, settings) as bp:
        wait_until(bp.all_warm, what="every template warm", describe=lambda: bp.log()[-3000:])
        seen = sequence(bp)
        misses = bp.metric("bioproxy_template_cache_misses_total")
        words = [len(tokenize(llama.url, question, None)) for question in QUESTIONS]
        uncached = [reference(llama, work, question) for question in QUESTIONS]
        wrong = reference(llama, work, QUESTIONS[2], prefix="@review")
        log = bp.log()

    brief = [(a.headers["X-Bioproxy-Cache"], a.json()["timings"]) for a in seen]
    print(config, *brief, sep="\n")
    assert seen[0].headers["X-Bioproxy-Cache"] == "cold", brief  # a new shape: said so
    assert len({a.headers["X-Bioproxy-Variant"] for a in seen}) == 1, brief
    for answer, n, reference_answer in zip(seen[1:], words[1:], uncached[1:], strict=True):
        timings = answer.json()["timings"]
        assert timings["prompt_n"] <= n + 16, brief  # only the words, from the second use
        assert answer.headers["X-Bioproxy-Cache"] != "cold", brief
        assert same_answer(answer.json(), reference_answer), (answer.json(), reference_answer)
    assert not same_answer(wrong, uncached[2])  # the comparison can fail
    assert misses == 0, log


@contextlib.contextmanager
def lab(tmp_path):
    """llama-server with -np 2 and a slot folder, bioproxy in front, every template warm;
    again the same servers (files and state kept) when entered again."""
    args, _ = USERS_CONFIGS["np2-slot-save-path"]
    folder = tmp_path / "slots"
    work = tmp_path / "bioproxy"
    if work.exists():
        settings = json.loads((work / "config.json").read_text())
    else:
        work, settings = examples_workdir(tmp_path, folder)
    with users_llama(tmp_path, args, folder) as llama, Bioproxy(llama.url, work, settings) as bp:
        wait_until(bp.all_warm, what="every template warm")
        yield llama, bp, work


def test_a_variant_is_restored_after_llama_server_and_bioproxy_restart(tmp_path):
    with lab(tmp_path) as (llama, bp, work):
        first = ask(bp.proxy_url, QUESTIONS[0])
        wait_until(lambda: saved_variant(bp), what="the variant saved")
    with lab(tmp_path) as (llama, bp, work):
        answer = ask(bp.proxy_url, QUESTIONS[1])
        wait_until(lambda: restored(saved_variant(bp)), what="the request counted")
        listed = saved_variant(bp)
        words = len(tokenize(llama.url, QUESTIONS[1], None))
        uncached = reference(llama, work, QUESTIONS[1])

    assert first.headers["X-Bioproxy-Cache"] == "cold"
    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.headers["X-Bioproxy-Variant"] == first.headers["X-Bioproxy-Variant"]
    timings = answer.json()["timings"]
    assert timings["prompt_n"] <= words + 16 and timings["cache_n"] > 900, timings
    assert same_answer(answer.json(), uncached)
    assert listed["requests"]["restored"] == 1 and listed["bytes"] > 0


def restored(variant):
    return variant is not None and (variant["requests"] or {}).get("restored")


def saved_variant(bp):
    """The @code variant /templates lists with a saved file, or None."""
    templates = requests.get(bp.admin_url + "/templates", timeout=10).json()["templates"]
    code = next(t for t in templates if t["prefix"] == "@code")
    return next((v for v in code["variants"] if v["saved_file"]), None)


def test_a_follow_up_after_a_system_message_evaluates_only_its_new_words(tmp_path):
    with lab(tmp_path) as (llama, bp, work):
        opening = user(f"@code {QUESTIONS[0]}")
        first = post(bp.proxy_url, body(SYSTEM_MESSAGE, opening))
        reply = {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]}
        answer = post(bp.proxy_url, body(SYSTEM_MESSAGE, opening, reply, user("And in place?")))
        sent = user(expanded(work, opening["content"]))
        reference_body = body(SYSTEM_MESSAGE, sent, reply, user("And in place?"))
        uncached = post(llama.url, {**reference_body, "cache_prompt": False}).json()
        # The same conversation without the template: what a lost template would answer.
        lost = body(SYSTEM_MESSAGE, user(QUESTIONS[0]), reply, user("And in place?"))
        wrong = post(llama.url, {**lost, "cache_prompt": False}).json()

    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert same_answer(answer.json(), uncached), (answer.json(), uncached)
    assert not same_answer(wrong, uncached)
    timings = answer.json()["timings"]
    # The system message, the template and the first turn reused: the new words evaluated.
    assert timings["cache_n"] > 900 and timings["prompt_n"] < 40, timings
