"""Clients see llama.cpp through bioproxy exactly as they would see it directly."""

import re
import subprocess
from pathlib import Path

import pytest
import requests
from openai import OpenAI

from tests.integration.sse import assert_incremental, read_events, stream_text, timed_reads

README = Path(__file__).parents[2] / "README.md"


def chat(content, **extra):
    return {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "seed": 1,
        "max_tokens": 24,
        **extra,
    }


def completion(base_url, body):
    answer = requests.post(base_url + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_chat_completion_equals_direct(llama, bioproxy):
    body = chat("Name three colours.")

    direct = completion(llama.url, body)
    proxied = completion(bioproxy.proxy_url, body)

    assert proxied["choices"][0]["message"] == direct["choices"][0]["message"]
    assert proxied["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert proxied["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


def streamed(base_url, body):
    with requests.post(
        base_url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=60
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        return read_events(answer)


def test_streamed_chat_completion_equals_direct(llama, bioproxy):
    body = chat("Write a haiku about rivers.")

    direct = streamed(llama.url, body)
    proxied = streamed(bioproxy.proxy_url, body)

    assert proxied[-1][1] == "[DONE]"
    assert stream_text(proxied) == stream_text(direct)
    assert stream_text(proxied)


def test_events_arrive_as_llama_cpp_sends_them(bioproxy):
    body = chat("Count to one hundred.", max_tokens=64, ignore_eos=True, stream=True)

    reads = timed_reads(bioproxy.proxy_url + "/v1/chat/completions", body)

    # 64 tokens, a role event, the final event and [DONE]. A buffering proxy would
    # deliver them in a few reads at the end.
    assert_incremental(reads, events=66)


def test_back_to_back_streams_on_one_connection_all_succeed(bioproxy):
    # llama-server closes its connection after each streamed answer; the next request
    # must not fail on that dead pooled connection.
    body = chat("Hi", max_tokens=4, stream=True)
    with requests.Session() as session:
        for _ in range(40):
            with session.post(
                bioproxy.proxy_url + "/v1/chat/completions", json=body, stream=True, timeout=30
            ) as answer:
                assert answer.status_code == 200, answer.text
                assert read_events(answer)[-1][1] == "[DONE]"


def test_official_openai_client_works_through_the_proxy(llama, bioproxy):
    client = OpenAI(base_url=bioproxy.proxy_url + "/v1", api_key="no-key", max_retries=0)
    messages = [{"role": "user", "content": "Say hello to Ada."}]
    expected = completion(llama.url, chat(messages[0]["content"]))["choices"][0]["message"]

    answer = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, seed=1, max_tokens=24
    )
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, seed=1, max_tokens=24, stream=True
    )
    streamed_text = "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )

    assert answer.choices[0].message.content == expected["content"]
    assert streamed_text == expected["content"]
    assert [m.id for m in client.models.list().data]


def test_health_and_metrics_on_the_proxy_port_are_llama_cpp_s(llama, bioproxy):
    proxied = requests.get(bioproxy.proxy_url + "/health", timeout=5)
    assert proxied.status_code == 200
    assert proxied.json() == requests.get(llama.url + "/health", timeout=5).json()

    metrics = requests.get(bioproxy.proxy_url + "/metrics", timeout=5).text
    assert "llamacpp:" in metrics
    assert "bioproxy_" not in metrics


def test_admin_endpoints_are_on_the_admin_port_only(bioproxy):
    health = requests.get(bioproxy.admin_url + "/health", timeout=5)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["uptime_seconds"] > 0

    metrics = requests.get(bioproxy.admin_url + "/metrics", timeout=5).text
    assert "bioproxy_http_request_duration_seconds_bucket" in metrics
    assert "llamacpp:" not in metrics

    models = requests.get(bioproxy.admin_url + "/v1/models", timeout=5)
    assert models.status_code == 404
    assert models.json()["error"]["type"] == "not_found_error"


def readme_curl_blocks():
    """The README's bash blocks that hold curl examples."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [block for block in blocks if block.lstrip().startswith(("curl ", "#"))]


def test_readme_curl_examples_work_as_written(bioproxy):
    blocks = readme_curl_blocks()
    script = "\n".join(blocks)
    expected = len(re.findall(r"^curl ", script, re.M))
    assert expected >= 5
    script = script.replace("localhost:8088", f"127.0.0.1:{bioproxy.proxy_port}")
    script = script.replace("localhost:8089", f"127.0.0.1:{bioproxy.admin_port}")

    # Each example runs exactly as written; curl only reports its status code.
    prelude = "curl() { command curl -s -o /dev/null -w '%{http_code}\\n' \"$@\"; }\n"
    result = subprocess.run(
        ["bash", "-c", prelude + script], capture_output=True, text=True, timeout=120
    )

    assert result.stdout.split() == ["200"] * expected, result.stderr


@pytest.mark.parametrize("path", ["/v1/models", "/props", "/slots"])
def test_get_endpoints_equal_direct(llama, bioproxy, path):
    direct = requests.get(llama.url + path, timeout=5)
    proxied = requests.get(bioproxy.proxy_url + path, timeout=5)

    assert proxied.status_code == direct.status_code
    assert proxied.headers["Content-Type"] == direct.headers["Content-Type"]
    assert without_clock(proxied.json()) == without_clock(direct.json())


def without_clock(body):
    """/v1/models stamps each model with the current second ("created"): not compared."""
    for model in body.get("data", []) if isinstance(body, dict) else []:
        model.pop("created", None)
    return body
