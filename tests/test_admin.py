"""The admin port: health and metrics, with llama.cpp faked by `responses`."""

from urllib.parse import urlsplit

import pytest
import requests
import responses

from tests.conftest import ADMIN_BASE, BACKEND


@responses.activate
def test_health_is_200_when_llama_cpp_answers(admin):
    responses.get(f"{BACKEND}/health", json={"status": "ok"})

    answer = admin.get("/health")

    assert answer.status_code == 200
    body = answer.get_json()
    assert body["status"] == "ok"
    assert body["backend"] == {"url": BACKEND, "status": "ok"}
    assert body["uptime_seconds"] >= 0


@responses.activate
def test_health_is_503_while_llama_cpp_loads(admin):
    responses.get(
        f"{BACKEND}/health",
        status=503,
        json={"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
    )

    answer = admin.get("/health")

    assert answer.status_code == 503
    body = answer.get_json()
    assert body["status"] == "degraded"
    assert body["backend"]["status"] == "loading"
    assert body["backend"]["detail"] == "503 Loading model"


@responses.activate
def test_health_is_503_when_llama_cpp_is_down(admin):
    responses.get(f"{BACKEND}/health", body=requests.ConnectionError("connection refused"))

    answer = admin.get("/health")

    assert answer.status_code == 503
    assert answer.get_json()["backend"]["status"] == "down"
    assert "connection refused" in answer.get_json()["backend"]["detail"]


@responses.activate
def test_health_can_answer_200_while_llama_cpp_is_down(admin):
    responses.get(f"{BACKEND}/health", body=requests.ConnectionError("connection refused"))

    answer = admin.get("/health?always_200")

    assert answer.status_code == 200
    assert answer.get_json()["status"] == "degraded"
    assert answer.get_json()["backend"]["status"] == "down"


@responses.activate
def test_admin_port_answers_only_its_own_paths(admin):
    answer = admin.get("/v1/models")

    assert answer.status_code == 404
    assert answer.get_json()["error"]["type"] == "not_found_error"
    assert len(responses.calls) == 0


def test_admin_rejects_other_methods_with_json(admin):
    answer = admin.post("/health")

    assert answer.status_code == 405
    assert answer.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in answer.headers["Allow"]


def test_metrics_are_prometheus_text(admin):
    answer = admin.get("/metrics")

    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    text = answer.get_data(as_text=True)
    assert "# TYPE bioproxy_http_request_duration_seconds histogram" in text
    assert "# TYPE bioproxy_upstream_errors_total counter" in text
    assert "# TYPE bioproxy_requests_in_flight gauge" in text


def test_status_page_is_html_that_reads_the_json_endpoints(admin):
    answer = admin.get("/")

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    page = answer.get_data(as_text=True)
    assert page.startswith("<!DOCTYPE html>")
    for endpoint in ('"/status"', '"/templates"', '"/health'):
        assert endpoint in page
    # Self-contained: no CDN, font or image from anywhere, and the browser is told so.
    assert "http://" not in page
    assert "https://" not in page
    assert "connect-src 'self'" in answer.headers["Content-Security-Policy"]


@responses.activate
def test_status_page_is_only_on_the_admin_port(client):
    responses.get(f"{BACKEND}/", body="llama.cpp's own page")

    answer = client.get("/")

    assert answer.get_data(as_text=True) == "llama.cpp's own page"


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",  # another site's page, in the admin's browser
        "http://evil.example:8089",  # a name pointed at 127.0.0.1 (DNS rebinding)
        "null",  # a sandboxed or file:// page
    ],
)
def test_web_pages_cannot_post_actions(make_app, origin):
    app = make_app(prefixes={"@code": "code.txt"})
    admin = app.test_client(base_url=ADMIN_BASE)
    host = urlsplit(origin).netloc or "localhost:8089"

    answer = admin.post("/templates/@code/warmup", headers={"Origin": origin, "Host": host})

    assert answer.status_code == 403
    assert answer.get_json()["error"]["code"] == "cross_site_request"
    assert app.extensions["bioproxy"].backend.warmth["@code"].forced is False


def test_tools_and_the_status_page_can_post_actions(make_app):
    app = make_app(prefixes={"@code": "code.txt"})
    admin = app.test_client(base_url=ADMIN_BASE)

    assert admin.post("/templates/@code/warmup").status_code == 202  # curl: no Origin
    own = admin.post("/templates/@code/warmup", headers={"Origin": ADMIN_BASE})
    assert own.status_code == 202


@pytest.mark.parametrize("path", ["/status", "/templates", "/metrics", "/health", "/"])
def test_a_page_under_another_name_cannot_read_the_admin_port(make_app, path):
    # Issue 16.9: a page that points its own name at 127.0.0.1 (DNS rebinding) read it.
    admin = make_app().test_client(base_url=ADMIN_BASE)

    answer = admin.get(path, headers={"Host": "evil.example:8089"})

    assert answer.status_code == 403
    assert answer.get_json()["error"]["code"] == "cross_site_request"
    for host in ("localhost:8089", "127.0.0.1:8089", "[::1]:8089"):
        assert admin.get(path, headers={"Host": host}).status_code in (200, 503)


def test_names_in_admin_hosts_reach_the_admin_port(make_app):
    admin = make_app(admin_hosts="metrics.lan, Box").test_client(base_url=ADMIN_BASE)

    assert admin.get("/metrics", headers={"Host": "metrics.lan:8089"}).status_code == 200
    assert admin.get("/metrics", headers={"Host": "box"}).status_code == 200
    assert admin.get("/metrics", headers={"Host": "other.lan"}).status_code == 403
