"""Clients that leave before their answer starts: llama-server must not go on for nobody.

bioproxy writes nothing to a client before llama-server's first byte, so it watches the
client's socket meanwhile and closes its upstream connection when the client goes.
llama-server then stops the request once it notices (it looks after each second in which
no request got a result) and the batch under way ends (-b 256 in bioproxy.llamacpp).

These tests watch llama-server's log for the slot's release instead of polling its
/slots: every GET /slots is a result, and polling faster than once a second would keep
llama-server from ever noticing the closed connection.
"""

import json
import socket
import time

import pytest
import requests

# About 2,700 tokens: llama-server reads them for ~12 s on 2 cores.
LONG_PROMPT = " ".join(f"word{i}" for i in range(700))
STARTED, RELEASED = "launch_slot_", "stop processing"
# llama-server looks for closed connections about once a second and stops after the batch
# under way (-b 256: up to a second more on a slow 2-core CPU). Measured 0.5 to 2.1 s on an
# Intel Xeon, 0.7 to 1.4 s on an AMD EPYC; without bioproxy's watch, the whole prompt (9 s).
RELEASED_WITHIN = 3


def send_raw(proxy, path, body):
    """A client socket that has sent a POST of body (JSON) and reads nothing yet."""
    data = json.dumps(body).encode()
    client = socket.create_connection(("127.0.0.1", proxy.proxy_port))
    client.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return client


def count_in_log(llama, text):
    with open(llama.log_path, errors="replace") as f:
        return f.read().count(text)


def wait_for(condition, timeout):
    """Poll condition until it holds; the seconds it took, or None after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def nothing_received(client):
    client.setblocking(False)
    try:
        return client.recv(1) is None
    except BlockingIOError:
        return True
    finally:
        client.setblocking(True)


def leave_and_time_the_slot(llama, client, started, busy_for):
    """Close the client busy_for s after its task started; seconds until its slot's release."""
    assert wait_for(lambda: count_in_log(llama, STARTED) > started, 30) is not None
    released = count_in_log(llama, RELEASED)
    time.sleep(busy_for)
    assert count_in_log(llama, RELEASED) == released, "finished before the client left"
    assert nothing_received(client)
    client.close()
    return wait_for(lambda: count_in_log(llama, RELEASED) > released, 60)


def assert_noticed_at_once(proxy, path, busy_for):
    """bioproxy's access log has the request as 499, ended when its client left."""
    line = [line for line in proxy.log().splitlines() if f" POST {path} " in line][-1]
    status, duration = line.split(f" POST {path} ")[1].split()[:2]
    assert status == "499"
    assert float(duration.removesuffix("ms")) < (busy_for + 1.0) * 1000


def assert_served_again(proxy):
    assert wait_for(proxy.settled, 10) is not None, "bioproxy did not get the slot back"
    answer = requests.post(
        proxy.proxy_url + "/completion", json={"prompt": "Hi", "n_predict": 4}, timeout=60
    )
    assert answer.status_code == 200
    assert proxy.metric("bioproxy_requests_in_flight") == 0


def leave(llama, proxy, path, body, busy_for):
    """Send body, hang up busy_for s after llama-server started on it; seconds until free."""
    started = count_in_log(llama, STARTED)
    client = send_raw(proxy, path, body)
    seconds = leave_and_time_the_slot(llama, client, started, busy_for)
    print(f"{path}: slot released {seconds} s after the client left")
    assert_noticed_at_once(proxy, path, busy_for)
    return seconds


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_client_leaving_while_its_prompt_is_read_frees_the_slot_within_3_s(
    llama, bioproxy, stream
):
    body = {"prompt": LONG_PROMPT, "n_predict": 8, "stream": stream, "cache_prompt": False}

    seconds = leave(llama, bioproxy, "/completion", body, busy_for=1.3)

    assert seconds is not None and seconds < RELEASED_WITHIN
    assert_served_again(bioproxy)


def test_a_client_leaving_a_non_streamed_generation_frees_the_slot_within_3_s(llama, bioproxy):
    body = {"prompt": "Count to a thousand:", "n_predict": 3000, "ignore_eos": True}

    seconds = leave(llama, bioproxy, "/completion", body, busy_for=2.3)

    assert seconds is not None and seconds < RELEASED_WITHIN
    assert_served_again(bioproxy)


def test_a_client_leaving_a_chat_request_frees_the_slot_within_3_s(llama, bioproxy):
    body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 8}

    seconds = leave(llama, bioproxy, "/v1/chat/completions", body, busy_for=1.7)

    assert seconds is not None and seconds < RELEASED_WITHIN
    assert_served_again(bioproxy)
