"""A user request never waits for a warmup: the warmup gives way and comes back later."""

import threading
import time

import requests

from tests.integration.conftest import start_llama
from tests.servers import Bioproxy, wait_until

# About 3,000 tokens (of the 4,096 a slot has): ten seconds or more of evaluation.
LONG = (
    "".join(
        f"Rule {i}: when the input holds item {i * 7 % 97}, keep the {i % 5 + 1} nearest "
        f"records and log the count of rejected ones as rule_{i}_rejected.\n"
        for i in range(80)
    )
    + "\n<{message}>"
)


def state(proxy):
    (template,) = proxy.templates().values()
    return template["state"]


def first_token_seconds(url):
    body = {
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "stream": True,
    }
    start = time.monotonic()
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if b'"content":"' in line:
                return time.monotonic() - start
    raise AssertionError("no token came")


def held_tokens(llama):
    """The most tokens a slot of llama-server's holds, as its GET /slots says."""
    slots = requests.get(llama.url + "/slots", timeout=10).json()
    return max(slot.get("n_prompt_tokens", 0) for slot in slots)


def prompt_tokens(llama):
    """llama-server's own count of the prompt tokens it evaluated (its --metrics)."""
    for line in requests.get(llama.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no llamacpp:prompt_tokens_total in /metrics")


def test_a_user_request_during_a_long_warmup_is_served_at_once(tmp_path):
    (tmp_path / "long.txt").write_text(LONG)
    config = {"prefixes": {"@long": "long.txt"}, "warmup_check_interval": 0.5}
    with (
        start_llama(tmp_path / "llama", slots=2) as llama,
        Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy,
    ):
        wait_until(lambda: state(proxy) == "warming", timeout=30, what="the warmup to start")
        # Half-way through the template, as llama-server counts what the slot holds.
        wait_until(
            lambda: held_tokens(llama) >= 1500, timeout=120, what="half of the template evaluated"
        )
        assert state(proxy) == "warming"

        waited = first_token_seconds(proxy.proxy_url)

        # The warmup had seconds to go; the user waited far less.
        assert waited < 3, waited
        wait_until(
            lambda: proxy.metric("bioproxy_warmup_cancellations_total") >= 1,
            what="the cancellation to be counted",
        )
        # Idle again, the warmup runs to its end.
        wait_until(lambda: state(proxy) == "warm", timeout=120, what="the template to be warm")
        assert proxy.metric("bioproxy_warmups_total", outcome="ok") == 1
        assert proxy.metric("bioproxy_warmups_total", outcome="failed") == 0
        # It went on from what its slot held: llama-server reused the first half then,
        # and evaluated the template about once in all (once more from the start: 1.5x).
        (template,) = proxy.templates().values()
        assert template["last_warmup"]["tokens_resumed"] >= 1400, template
        assert prompt_tokens(llama) <= 1.2 * template["tokens"] + 100
        # Giving way is a normal event: logged, but not as a fault.
        log = proxy.log()
        assert "gave way to a user request" in log
        assert [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line] == []


def test_no_warmup_starts_while_a_user_request_is_in_flight(tmp_path):
    (tmp_path / "short.txt").write_text("Answer briefly.\n<{message}>")
    config = {"prefixes": {"@short": "short.txt"}, "warmup_check_interval": 0.2}
    with (
        start_llama(tmp_path / "llama", slots=2) as llama,
        Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy,
    ):
        wait_until(lambda: state(proxy) == "warm", what="the first warmup")
        body = {
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        with requests.post(
            proxy.proxy_url + "/v1/chat/completions", json=body, stream=True, timeout=60
        ) as stream:
            chunks = stream.iter_content(chunk_size=None)
            next(chunks)
            requests.post(proxy.admin_url + "/templates/@short/warmup", timeout=5)
            time.sleep(1)  # five watcher passes
            assert state(proxy) == "stale"
            assert proxy.metric("bioproxy_warmups_total", outcome="ok") == 1
            for _ in chunks:
                pass
        wait_until(
            lambda: proxy.metric("bioproxy_warmups_total", outcome="ok") == 2,
            what="the warmup after the stream",
        )


def test_templated_requests_after_an_edit_share_one_evaluation_of_it(tmp_path):
    # Warmups in the serving llama-server's own slots: after an edit, the first templated
    # requests find the new text in no slot and no file. Each was evaluated in full beside
    # the others (bench.users_first --part load --ways here: 33x the p95 of the run with
    # no edit). A later one now waits for the slot where the version is evaluated, and is
    # answered there from what the first left.
    rules = "".join(LONG.splitlines(keepends=True)[:40])  # ~1,500 tokens
    template = tmp_path / "long.txt"
    template.write_text(f"Version 1.\n{rules}\n<{{message}}>")
    config = {"prefixes": {"@long": "long.txt"}, "warmup_check_interval": 0.2}
    with (
        # No RAM cache: llama-server would otherwise load the first one's copy for later
        # requests pinned to a slot holding other work (b11434), hiding what bioproxy does.
        start_llama(tmp_path / "llama", slots=2, extra_args=["--cache-ram", "0"]) as llama,
        Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy,
    ):
        wait_until(lambda: state(proxy) == "warm", what="the first warmup")
        (listed,) = proxy.templates().values()
        tokens, before = listed["tokens"], prompt_tokens(llama)
        template.write_text(f"Version 2.\n{rules}\n<{{message}}>")
        wait_until(lambda: state(proxy) != "warm", timeout=10, what="the edit to be seen")
        answers = {}

        def ask(question):
            body = {"messages": [{"role": "user", "content": f"@long {question}"}]}
            body["max_tokens"] = 4
            answer = requests.post(proxy.proxy_url + "/v1/chat/completions", json=body, timeout=120)
            answers[question] = answer

        first = threading.Thread(target=ask, args=("What does rule 3 keep?",))
        second = threading.Thread(target=ask, args=("What does rule 5 log?",))
        first.start()
        time.sleep(0.5)  # the first is being evaluated
        second.start()
        first.join(120)
        second.join(120)

        later = answers["What does rule 5 log?"]
        assert later.status_code == 200, later.text
        assert answers["What does rule 3 keep?"].status_code == 200
        assert later.headers["X-Bioproxy-Cache"] == "slot"
        assert later.json()["timings"]["cache_n"] >= tokens - 16
        wait_until(lambda: state(proxy) == "warm", what="the new version to be warm")
        # Evaluated about once in all: the warmup's pieces before the first request, the
        # rest by the first request, then the two questions and the warmup's last token.
        assert prompt_tokens(llama) - before <= 1.2 * tokens + 100


def test_a_plain_request_after_an_edit_keeps_to_its_own_slot(tmp_path):
    # After an edit the template's slot holds nothing of use, yet a plain request that
    # took it (the least recently used) evaluated its whole prompt again there, where
    # its own slot held all but its last token (bench.users_first: 9 tokens, not 1).
    template = tmp_path / "short.txt"
    template.write_text("Answer briefly.\n<{message}>")
    config = {"prefixes": {"@short": "short.txt"}, "warmup_check_interval": 0.2}

    def plain():
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}
        answer = requests.post(proxy.proxy_url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["timings"]

    with (
        start_llama(tmp_path / "llama", slots=2, extra_args=["--cache-ram", "0"]) as llama,
        Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy,
    ):
        wait_until(lambda: state(proxy) == "warm", what="the first warmup")
        plain()
        again = plain()
        assert again["prompt_n"] <= 2  # its slot held it
        template.unlink()  # broken: no version of it is warmed again meanwhile
        wait_until(lambda: state(proxy) == "broken", timeout=10, what="the edit to be seen")

        after = plain()

        assert after["prompt_n"] == again["prompt_n"]
        assert after["cache_n"] == again["cache_n"]
