"""Scheduling with a real llama-server and gunicorn: shared slots, the queue, its limits."""

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bioproxy import templates
from tests.integration.conftest import start_llama
from tests.integration.test_templates import chat
from tests.servers import Bioproxy, wait_until

# Three templates of ~250 tokens: short enough to evaluate at -ub 1 in a few seconds.
TOPICS = {
    "@sql": "SQL queries for a PostgreSQL database of orders and customers",
    "@shell": "POSIX shell scripts that run on a small Debian server",
    "@css": "CSS layouts for a newspaper's article pages",
}


def template_text(topic):
    rules = "".join(
        f"Rule {i}: when a question touches part {i} of {topic}, answer with the shortest "
        f"correct example first and one sentence of reasoning after it.\n"
        for i in range(8)
    )
    return f"You are an assistant for {topic}.\n{rules}Question: <{{message}}>\nAnswer briefly."


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """llama-server with 2 slots whose answers do not depend on what runs beside them.

    -ub 1 evaluates every token alone, so a cached prefix gives the same answer as a cold
    prompt (see test_templates.exact). With flash attention on (llama-server's default on
    CPU), a request's answer still changed with what the other slot was doing: measured on
    llama-server alone, 3 of 16 concurrent greedy answers differed from the same requests
    sent one at a time; with -fa off, none of 32 did.
    """
    folder = tmp_path_factory.mktemp("mixed")
    for prefix, topic in TOPICS.items():
        (folder / f"{prefix[1:]}.txt").write_text(template_text(topic))
    config = {
        "prefixes": {prefix: f"{prefix[1:]}.txt" for prefix in TOPICS},
        "warmup_check_interval": 0.5,
    }
    with start_llama(folder / "llama", slots=2, extra_args=["-ub", "1", "-fa", "off"]) as llama:
        proxy = Bioproxy(llama.url, folder, config, slot_save_path=llama.slot_save_path)
        with proxy:
            wait_until(
                proxy.all_warm,
                timeout=300,
                what="three templates warm",
            )
            yield llama, proxy, folder


def uncached(llama, body):
    """llama-server's answer with no cache at all."""
    answer = requests.post(
        llama.url + "/v1/chat/completions", json={**body, "cache_prompt": False}, timeout=300
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["timings"]["cache_n"] == 0
    return answer.json()["choices"][0]["message"]["content"]


def test_concurrent_mixed_traffic_gets_the_answers_of_an_uncached_server(mixed):
    llama, proxy, folder = mixed
    questions = ["How do I count rows?", "How do I list files?", "What is flexbox?"]
    requests_ = [(prefix, q) for prefix in TOPICS for q in questions[:2]]
    requests_ += [(None, "Name a colour."), (None, "Name a fruit.")]
    expected = {}
    for prefix, question in requests_:
        if prefix is None:
            expected[prefix, question] = uncached(llama, chat(question, max_tokens=16))
        else:
            path = str(folder / f"{prefix[1:]}.txt")
            template = templates.load(prefix, path, str(folder), str(folder), 1 << 20)
            body = chat(template.render(question), max_tokens=16)
            expected[prefix, question] = uncached(llama, body)

    def send(item):
        prefix, question = item
        content = f"{prefix} {question}" if prefix else question
        answer = requests.post(
            proxy.proxy_url + "/v1/chat/completions", json=chat(content, max_tokens=16), timeout=300
        )
        assert answer.status_code == 200, answer.text
        return item, answer

    # Eight clients at once on two slots, twice over: the queue and the slots take turns.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests_ * 2))

    for (prefix, question), answer in answers:
        body = answer.json()
        assert body["choices"][0]["message"]["content"] == expected[prefix, question]
        if prefix is not None:
            assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored")
            assert body["timings"]["cache_n"] > 200, (prefix, body["timings"])
    assert proxy.metric("bioproxy_queue_wait_seconds_count") >= len(answers)
    wait_until(proxy.settled, timeout=5, what="every slot idle, the queue empty")


def long_stream(url):
    """A streamed request that keeps its slot busy for seconds; its response, open."""
    body = chat("Count from one to one thousand.", max_tokens=400, stream=True)
    body["ignore_eos"] = True
    answer = requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    assert answer.status_code == 200
    return answer


def status(proxy):
    return requests.get(proxy.admin_url + "/status", timeout=5).json()


def queue_length(proxy):
    return len(status(proxy)["queue"])


def wait_for_slots(proxy):
    """Until bioproxy has read llama-server's slots (before that, requests go unscheduled)."""
    wait_until(lambda: status(proxy)["slots"], timeout=10, what="bioproxy to know the slots")


def test_a_full_queue_answers_503_and_a_client_that_leaves_the_queue_is_dropped(tmp_path):
    config = {"queue_max_length": 1, "queue_timeout": 60}
    with (
        start_llama(tmp_path / "llama", slots=1) as llama,
        Bioproxy(llama.url, tmp_path, config) as proxy,
    ):
        wait_for_slots(proxy)
        busy = long_stream(proxy.proxy_url)
        # A client that waits in the queue, then hangs up.
        raw = json.dumps(chat("Hello")).encode()
        leaving = socket.create_connection(("127.0.0.1", proxy.proxy_port))
        leaving.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
        )
        wait_until(lambda: queue_length(proxy) == 1, timeout=10, what="a queued request")

        refused = requests.post(proxy.proxy_url + "/v1/chat/completions", json=chat("Hi"))

        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        assert proxy.metric("bioproxy_queue_rejections_total", reason="full") == 1

        leaving.close()
        wait_until(lambda: queue_length(proxy) == 0, timeout=2, what="the queue to empty")
        assert proxy.metric("bioproxy_queue_abandoned_total") == 1

        # The slot's own request was never disturbed, and the next one is served.
        assert b"[DONE]" in b"".join(busy.iter_content(None))
        assert requests.post(proxy.proxy_url + "/v1/chat/completions", json=chat("Hi")).ok


def test_a_request_that_waits_too_long_gets_a_503_not_a_hang(tmp_path):
    with (
        start_llama(tmp_path / "llama", slots=1) as llama,
        Bioproxy(llama.url, tmp_path, {"queue_timeout": 0.5}) as proxy,
    ):
        wait_for_slots(proxy)
        busy = long_stream(proxy.proxy_url)
        outcome = {}
        waiter = threading.Thread(
            target=lambda: outcome.update(
                answer=requests.post(proxy.proxy_url + "/v1/chat/completions", json=chat("Hi"))
            )
        )
        waiter.start()
        waiter.join(timeout=10)

        assert outcome["answer"].status_code == 503
        assert outcome["answer"].json()["error"]["code"] == "queue_timeout"
        busy.close()


def test_eight_slots_serve_concurrent_templated_and_plain_requests(tmp_path):
    for prefix, topic in TOPICS.items():
        (tmp_path / f"{prefix[1:]}.txt").write_text(template_text(topic))
    config = {
        "prefixes": {prefix: f"{prefix[1:]}.txt" for prefix in TOPICS},
        "warmup_check_interval": 0.5,
    }
    with (
        start_llama(tmp_path / "llama", slots=8) as llama,
        Bioproxy(llama.url, tmp_path, config, slot_save_path=llama.slot_save_path) as proxy,
    ):
        wait_until(
            proxy.all_warm,
            timeout=120,
            what="three templates warm",
        )
        contents = [f"{prefix} Question {i}?" for i in range(4) for prefix in TOPICS]
        contents += [f"Plain question {i}?" for i in range(4)]

        def send(content):
            return requests.post(
                proxy.proxy_url + "/v1/chat/completions",
                json=chat(content, max_tokens=8),
                timeout=120,
            )

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, contents))

        assert [a.status_code for a in answers] == [200] * len(contents)
        for content, answer in zip(contents, answers, strict=True):
            if content.startswith("@"):
                assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored"), content
                assert answer.json()["timings"]["cache_n"] > 200, content
        assert [s["id"] for s in status(proxy)["slots"]] == list(range(8))
        wait_until(proxy.settled, timeout=5, what="every slot idle, the queue empty")
        assert proxy.metric("bioproxy_slots", state="idle") == 8
