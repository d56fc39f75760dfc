"""deploy/nginx/bioproxy.conf, in Debian's nginx, in front of bioproxy and llama-server."""

import subprocess
from pathlib import Path

import pytest
import requests

from tests.integration.sse import assert_incremental, timed_reads
from tests.servers import JSONHandler, Nginx, free_port, serve_http

SITE = Path(__file__).parents[2] / "deploy" / "nginx" / "bioproxy.conf"


@pytest.fixture(scope="module")
def nginx(bioproxy, tmp_path_factory):
    port = free_port()
    site = SITE.read_text()
    assert "listen 80;" in site and "server 127.0.0.1:8088;" in site
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    site = site.replace("127.0.0.1:8088", f"127.0.0.1:{bioproxy.proxy_port}")
    server = Nginx(tmp_path_factory.mktemp("nginx"), site).start(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_streams_stay_streams_through_nginx(nginx):
    body = {
        "messages": [{"role": "user", "content": "Count to one hundred."}],
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    assert_incremental(timed_reads(nginx + "/v1/chat/completions", body), events=66)


def test_curl_probes_work_through_nginx(nginx):
    result = subprocess.run(["curl", "-fsS", nginx + "/health"], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert '"status":"ok"' in result.stdout


def test_admin_endpoints_are_not_reachable_through_nginx(nginx):
    metrics = requests.get(nginx + "/metrics", timeout=5).text

    assert "bioproxy_" not in metrics  # llama.cpp's metrics, through the proxy port
    assert "uptime_seconds" not in requests.get(nginx + "/health", timeout=5).text


def test_nginx_refuses_bodies_over_bioproxy_s_limit(nginx):
    answer = requests.post(nginx + "/completion", data=b"x" * (8 * 1024 * 1024 + 1), timeout=30)

    assert answer.status_code == 413


class EchoHandler(JSONHandler):
    """Answers with what it was sent: the request line's version and the headers."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_json({"version": self.request_version, "headers": dict(self.headers)})


def test_nginx_passes_the_client_address_over_http_1_1_keepalive(tmp_path):
    echo = serve_http(EchoHandler)
    port = free_port()
    site = SITE.read_text().replace("listen 80;", f"listen 127.0.0.1:{port};")
    site = site.replace("127.0.0.1:8088", f"127.0.0.1:{echo.server_address[1]}")
    server = Nginx(tmp_path, site).start(port)
    try:
        sent = requests.get(
            f"http://127.0.0.1:{port}/x", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=5
        ).json()
    finally:
        server.stop()
        echo.shutdown()

    assert sent["version"] == "HTTP/1.1"
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers.get("connection", "") == ""  # no "close": the connection is kept
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
