"""bioproxy in front of llama-server started each way its users start it (issue 11).

`llama-server -m MODEL --port P` and the flags users add to it: slots automatic or -np 1 to
8, a unified KV cache or not, its RAM cache on or off, idle slots cleared or kept, an API
key, a slot folder or none. For each: after warmup, every templated request evaluates only
the user's words, and over a mixed sequence bioproxy evaluates no more prompt tokens than
the same llama-server alone (the same expanded messages, sent straight to it). Warm is
what llama-server's own timings say.

The answers through bioproxy are llama-server's to the same expanded messages evaluated
without any cache: the same first-token distribution, within the noise that llama.cpp's
own prompt cache brings. Not the same text: at temperature 0 llama-server alone, reusing
the template from its own cache, answered "```python" where it answered "You can sort"
without (b11434, this model), its top tokens' log-probabilities moving by up to ~0.2 with
where a prompt is split into batches. A wrong prefix moves them further (checked below).
"""

import pytest
import requests

from bioproxy.testing import (
    BACKEND_KEY,
    MIXED_SEQUENCE,
    USERS_CONFIGS,
    examples_workdir,
    expanded,
    users_llama,
    wait_until,
)
from tests.integration.conftest import start_llama
from tests.servers import Bioproxy


def chat_body(content, **extra):
    messages = [{"role": "user", "content": content}]
    return {
        "messages": messages,
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 5,
        **extra,
    }


def post(url, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer


def through_bioproxy(folder, args, slot_folder, key):
    keys = {"backend_api_key": key} if key else {}
    work, config = examples_workdir(folder, slot_folder, **keys)
    with users_llama(folder, args, slot_folder) as llama, Bioproxy(llama.url, work, config) as bp:
        wait_until(bp.all_warm, what="every template warm", describe=lambda: bp.log()[-3000:])
        seen = []
        for text in MIXED_SEQUENCE:
            answer = post(bp.proxy_url, chat_body(text))
            seen.append((text, answer.headers.get("X-Bioproxy-Cache"), answer.json()))
        status = requests.get(bp.admin_url + "/status", timeout=10).json()
        misses = bp.metric("bioproxy_template_cache_misses_total")
        return work, seen, status, misses, bp.log()


def alone(folder, work, args, slot_folder, key):
    """The same sequence sent straight to a new llama-server of the same configuration,
    with its own cache; then each templated message once more with no cache at all."""
    with users_llama(folder, args, slot_folder) as llama:
        answers = [
            post(llama.url, chat_body(expanded(work, text)), key).json() for text in MIXED_SEQUENCE
        ]
        uncached = {
            text: post(llama.url, chat_body(expanded(work, text), cache_prompt=False), key).json()
            for text in MIXED_SEQUENCE
            if text.startswith("@")
        }
        # The same words in the other template: what a wrong cache would answer.
        for text in list(uncached):
            prefix, _, words = text.partition(" ")
            other = "@review" if prefix == "@code" else "@code"
            wrong = chat_body(expanded(work, f"{other} {words}"), cache_prompt=False)
            uncached["wrong " + text] = post(llama.url, wrong, key).json()
        words = {
            text: len(tokenize(llama.url, text.partition(" ")[2], key))
            for text in MIXED_SEQUENCE
            if text.startswith("@")
        }
    return answers, uncached, words


def tokenize(url, text, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = requests.post(url + "/tokenize", json={"content": text}, headers=headers, timeout=10)
    return answer.json()["tokens"]


def first_tokens(answer):
    """The first generated token's top 5, token -> log-probability."""
    top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return {t["token"]: t["logprob"] for t in top}


def same_answer(answer, reference, noise=0.35):
    """Whether two answers come from the same prompt, as far as llama.cpp's numerics let
    one tell: most of their top 5 first tokens shared, each as likely within noise."""
    ours, theirs = first_tokens(answer), first_tokens(reference)
    shared = ours.keys() & theirs.keys()
    return len(shared) >= 3 and all(abs(ours[t] - theirs[t]) <= noise for t in shared)


@pytest.mark.parametrize("config", USERS_CONFIGS, ids=list(USERS_CONFIGS))
def test_warm_with_each_configuration_users_run(tmp_path, config):
    args, has_folder = USERS_CONFIGS[config]
    folder = tmp_path / "slots" if has_folder else None
    key = BACKEND_KEY if "--api-key" in args else None
    work, seen, status, misses, log = through_bioproxy(tmp_path / "via", args, folder, key)
    (tmp_path / "alone").mkdir()
    direct, uncached, words = alone(
        tmp_path / "alone", work, args, folder and tmp_path / "own", key
    )

    brief = [
        (text, cache, a["timings"]["cache_n"], a["timings"]["prompt_n"], d["timings"]["prompt_n"])
        for (text, cache, a), d in zip(seen, direct, strict=True)
    ]
    print(config, status["backend_mode"], *brief, sep="\n")  # pytest -s: docs/TEMPLATES.md
    for text, cache, answer in seen:
        if not text.startswith("@"):
            continue
        timings = answer["timings"]
        # Only the user's words, and the chat template's few tokens after them.
        assert timings["prompt_n"] <= words[text] + 16, brief
        assert cache != "cold", brief  # bioproxy expected it warm, and it was
        assert same_answer(answer, uncached[text]), (text, answer, uncached[text])
        # The comparison tells prompts apart: the other template's answer is not this one.
        assert not same_answer(uncached["wrong " + text], uncached[text]), text
    evaluated = sum(a["timings"]["prompt_n"] for _, _, a in seen)
    assert evaluated <= sum(d["timings"]["prompt_n"] for d in direct), brief
    assert misses == 0, log


def test_a_follow_up_turn_keeps_the_template_and_evaluates_only_its_new_words(tmp_path):
    # Issue 11.4: the follow-up went with the opening message raw, the template gone.
    work, config = examples_workdir(tmp_path)
    with users_llama(tmp_path, []) as llama, Bioproxy(llama.url, work, config) as bp:
        # Every warmup done: one that starts between two turns empties the slot the first
        # turn left (bioproxy learns that llama-server clears idle slots by seeing it).
        wait_until(bp.all_warm, what="every template warm")
        opening = {"role": "user", "content": "@code How do I reverse a list?"}
        first = post(bp.proxy_url, chat_body(opening["content"]))
        reply = first.json()["choices"][0]["message"]["content"]
        turns = [opening, {"role": "assistant", "content": reply}]
        body = {**chat_body(""), "messages": [*turns, {"role": "user", "content": "And in place?"}]}
        answer = post(bp.proxy_url, body)
        # llama-server's own answer to the conversation as sent, with no cache; and to the
        # same conversation with the template lost, which the comparison must tell apart.
        sent = {"role": "user", "content": expanded(work, opening["content"])}
        as_sent = {**body, "messages": [sent, *body["messages"][1:]], "cache_prompt": False}
        uncached = post(llama.url, as_sent).json()
        raw = {"role": "user", "content": "How do I reverse a list?"}
        lost = {**body, "messages": [raw, *body["messages"][1:]], "cache_prompt": False}
        wrong = post(llama.url, lost).json()

    assert answer.headers["X-Bioproxy-Template"] == "@code"
    timings = answer.json()["timings"]
    # The template and the first turn reused: the reply and the new words evaluated.
    assert timings["cache_n"] > 900 and timings["prompt_n"] < 40, timings
    assert same_answer(answer.json(), uncached), (answer.json(), uncached)
    assert not same_answer(wrong, uncached)


@pytest.mark.parametrize("cache_ram", [None, 16], ids=["default-cache-ram", "cache-ram-16"])
def test_later_turns_evaluate_only_their_new_words_where_idle_slots_are_cleared(
    tmp_path, cache_ram
):
    # llama.cpp's defaults with a slot folder: each templated request was restored from
    # the template's file first, so a later turn got the template back without the turns
    # before it and evaluated them all again (turns 2-4: 69, 125, 180 tokens). Where the
    # RAM cache keeps the conversation (measured by bioproxy, not assumed), it is left to
    # that; where a --cache-ram of 16 MiB keeps nothing, bioproxy measures that too and
    # restores, and llama-server alone could do no better.
    args = [] if cache_ram is None else ["--cache-ram", str(cache_ram)]
    slots = tmp_path / "slots"
    work, config = examples_workdir(tmp_path, slots)
    with users_llama(tmp_path, args, slots) as llama, Bioproxy(llama.url, work, config) as bp:

        def measured():
            mode = requests.get(bp.admin_url + "/status", timeout=10).json()["backend_mode"]
            return mode["ram_cache_keeps_templates"] is not None and mode

        wait_until(bp.all_warm, what="every template warm")
        mode = wait_until(measured, what="the RAM cache measured", timeout=60)
        messages = [{"role": "user", "content": "@code How do I reverse a list?"}]
        turns = []
        for words in ("And in place?", "What about a tuple?", "And a string?", None):
            answer = post(bp.proxy_url, {**chat_body(""), "messages": messages})
            turns.append((answer.headers["X-Bioproxy-Cache"], answer.json()["timings"]))
            if words is None:
                break
            post(bp.proxy_url, chat_body("Name a colour."))  # a task between the turns
            reply = answer.json()["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": words})
        log = bp.log()

    print(mode, *turns, sep="\n")  # pytest -s: the figures in docs/TEMPLATES.md
    assert mode["ram_cache_keeps_templates"] is (cache_ram is None), (mode, log[-3000:])
    # The first turn: restored, or the copy the RAM cache probe left (it probes @code).
    assert turns[0][0] in ("restored", "server"), turns
    assert all(t["cache_n"] > 900 for _, t in turns), turns  # the template, every turn
    later = turns[1:]
    if cache_ram is None:
        assert [cache for cache, _ in later] == ["server"] * 3, turns
        assert all(t["prompt_n"] < 40 for _, t in later), turns  # only the new turn
        assert [t["cache_n"] for _, t in later] == sorted(t["cache_n"] for _, t in later)
    else:
        assert [cache for cache, _ in later] == ["restored"] * 3, turns
        assert "did not keep" in log, log[-3000:]


def test_back_to_back_requests_keep_their_template_s_slot(tmp_path):
    # Issue 11.5, with the llama-server bioproxy starts itself (-np 2, a slot folder): a
    # request sent the moment the previous one's answer ended found that slot not yet
    # given back, and was restored into the other one, evicting @review.
    work, config = examples_workdir(tmp_path, tmp_path / "slots")
    with start_llama(tmp_path) as llama, Bioproxy(llama.url, work, config) as bp:
        wait_until(bp.all_warm, what="every template warm")
        first = post(bp.proxy_url, chat_body("@code How do I reverse a list?"))
        caches = [first.headers["X-Bioproxy-Cache"]]  # restored, if @code's warmup ran first
        for question in ("What does zip do?", "How do I sort a dict?", "What is a set?"):
            answer = post(bp.proxy_url, chat_body(f"@code {question}"))
            caches.append(answer.headers["X-Bioproxy-Cache"])
        review = post(bp.proxy_url, chat_body("@review x = 1"))

    assert caches[1:] == ["slot"] * 3, caches
    assert review.headers["X-Bioproxy-Cache"] == "slot"  # never evicted
    assert review.json()["timings"]["cache_n"] > 200


def test_a_llama_server_started_with_no_slots_is_said_so(tmp_path):
    # llama-server -m MODEL --port P --no-slots answers GET /slots 501. bioproxy cannot
    # see its slots: it warmed nothing and logged "not ready, warmups wait", as if that
    # would pass, with nothing in /status. Now it says why, once, and passes requests on.
    work, config = examples_workdir(tmp_path)
    with users_llama(tmp_path, ["--no-slots"]) as llama, Bioproxy(llama.url, work, config) as bp:

        def notes():
            mode = requests.get(bp.admin_url + "/status", timeout=10).json()["backend_mode"]
            return [note for note in mode["notes"] if "--no-slots" in note]

        wait_until(notes, what="the note on --no-slots", timeout=30)
        answer = post(bp.proxy_url, chat_body("@code How do I reverse a list?"))
        log = bp.log()

    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"]
    assert answer.json()["timings"]["prompt_n"] > 500  # evaluated whole: nothing was warmed
    assert log.count("hides its slots") == 1, log
    assert "not ready" not in log, log
