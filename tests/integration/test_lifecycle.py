"""Running bioproxy for real: the command, SIGTERM with streams in flight, SIGHUP reloads."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from tests.servers import Bioproxy, free_port, wait_until

COMMAND = str(Path(sys.executable).parent / "bioproxy")


def long_stream(url, tokens=300):
    body = {
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    answer = requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    assert answer.status_code == 200
    return answer


def read_to_end(answer):
    """The whole body of a stream; raises if the connection is cut."""
    return b"".join(answer.iter_content(chunk_size=None))


def refused(url):
    try:
        requests.get(url + "/health", timeout=2)
    except requests.ConnectionError:
        return True
    return False


def test_the_command_takes_the_original_flags_prints_the_banner_and_stops_on_sigterm(
    llama, tmp_path
):
    (tmp_path / "code.txt").write_text("Answer about code.\n<{message}>")
    (tmp_path / "config.json").write_text(json.dumps({"prefixes": {"@code": "code.txt"}}))
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOPROXY_")}
    env["BIOPROXY_STATE_DIR"] = str(tmp_path / "state")
    command = [
        COMMAND,
        "-config",
        str(tmp_path / "config.json"),
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-admin-host",
        "127.0.0.1",
        "-admin-port",
        str(admin_port),
        "-backend",
        llama.url,
    ]
    with open(tmp_path / "out.log", "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: "Proxy server is running" in (tmp_path / "out.log").read_text(),
            timeout=30,
            what="the banner",
        )
        banner = (tmp_path / "out.log").read_text()
        assert f"Proxy listening on: http://127.0.0.1:{port}" in banner
        assert f"Backend llama.cpp:  {llama.url}" in banner
        assert f"Admin:              http://127.0.0.1:{admin_port}" in banner
        assert "@code -> code.txt" in banner
        assert f"curl http://127.0.0.1:{port}/v1/models" in banner
        assert requests.get(f"http://127.0.0.1:{admin_port}/health", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200

        process.send_signal(signal.SIGTERM)  # the command became gunicorn's master

        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_check_config_names_a_broken_template_and_fails(tmp_path):
    (tmp_path / "good.txt").write_text("Fine.\n<{message}>")
    (tmp_path / "bad.txt").write_text("Leak: <{../../etc/passwd}>\n<{message}>")
    config = {"prefixes": {"@good": "good.txt", "@bad": "bad.txt"}}
    (tmp_path / "config.json").write_text(json.dumps(config))

    result = subprocess.run(
        [COMMAND, "-config", str(tmp_path / "config.json"), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1, result.stdout
    assert "@good: good.txt" in result.stdout and "ok" in result.stdout
    assert "@bad: BROKEN:" in result.stdout


def test_sigterm_lets_a_stream_in_flight_finish_and_exits_0(llama, tmp_path):
    with Bioproxy(llama.url, tmp_path) as proxy:
        stream = long_stream(proxy.proxy_url)
        chunks = stream.iter_content(chunk_size=None)
        first = next(chunks)

        proxy.process.send_signal(signal.SIGTERM)

        wait_until(lambda: refused(proxy.proxy_url), timeout=5, what="new connections refused")
        rest = b"".join(chunks)  # the stream goes on to its end
        assert (first + rest).rstrip().endswith(b"data: [DONE]")
        assert proxy.process.wait(timeout=30) == 0
        assert "warmer stopped" in proxy.log()


def test_sighup_reloads_config_and_templates_without_dropping_a_connection(llama, tmp_path):
    (tmp_path / "a.txt").write_text("Template A.\n<{message}>")
    (tmp_path / "b.txt").write_text("Template B.\n<{message}>")
    config = {"prefixes": {"@a": "a.txt"}, "warmup_check_interval": 0.5}
    with Bioproxy(llama.url, tmp_path, config) as proxy:
        wait_until(lambda: proxy.templates()["@a"]["state"] == "warm", what="@a warm")
        stream = long_stream(proxy.proxy_url)
        chunks = stream.iter_content(chunk_size=None)
        first = next(chunks)
        config["prefixes"]["@b"] = "b.txt"
        (tmp_path / "config.json").write_text(json.dumps(config))
        statuses = []
        probing = True

        def probe():  # other clients keep coming during the reload
            while probing:
                try:
                    answer = requests.get(proxy.proxy_url + "/health", timeout=10)
                    statuses.append(answer.status_code)
                except requests.RequestException as e:
                    statuses.append(repr(e))
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            proxy.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "@b" in proxy.templates(), timeout=30, what="@b after the reload")
            rest = b"".join(chunks)
        finally:
            probing = False
            prober.join()

        assert (first + rest).rstrip().endswith(b"data: [DONE]")
        assert statuses and set(statuses) == {200}
        wait_until(lambda: proxy.templates()["@b"]["state"] == "warm", what="@b warm")
        assert proxy.process.poll() is None  # the same server, reloaded


def test_a_reload_with_a_broken_config_keeps_the_running_one(llama, tmp_path):
    (tmp_path / "a.txt").write_text("Template A.\n<{message}>")
    config = {"prefixes": {"@a": "a.txt"}, "warmup_check_interval": 0.5}
    with Bioproxy(llama.url, tmp_path, config) as proxy:
        stream = long_stream(proxy.proxy_url, tokens=100)
        (tmp_path / "config.json").write_text('{"prefixes": {"@a": "a.txt"},')  # cut short

        proxy.process.send_signal(signal.SIGHUP)

        assert read_to_end(stream).rstrip().endswith(b"data: [DONE]")
        wait_until(
            lambda: "configuration error, the running one stays" in proxy.log(),
            timeout=15,
            what="the reload to be refused",
        )
        time.sleep(2)  # a broken reload used to stop gunicorn here
        assert proxy.process.poll() is None
        assert requests.get(proxy.proxy_url + "/v1/models", timeout=10).status_code == 200
        assert list(proxy.templates()) == ["@a"]

        config["prefixes"]["@b"] = "a.txt"
        (tmp_path / "config.json").write_text(json.dumps(config))
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "@b" in proxy.templates(), timeout=30, what="the fixed config")
