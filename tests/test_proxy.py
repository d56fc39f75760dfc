"""The proxy port, with llama.cpp faked by `responses`."""

import gzip
import io
import json

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from bioproxy.errors import UpstreamUnavailable
from bioproxy.upstream import Upstream
from tests.conftest import BACKEND


def sent_to(path):
    """The requests llama.cpp received for a path (bioproxy also reads /props and /slots)."""
    return [c.request for c in responses.calls if c.request.path_url.split("?")[0] == path]


@responses.activate
def test_forwards_method_path_query_body_and_headers(client):
    responses.post(f"{BACKEND}/tokenize", json={"ok": True})
    body = b'{"content": "hi \xc3\xa9"}'

    answer = client.post(
        "/tokenize?trace=1&x=a%20b",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer k", "X-Custom": "1"},
    )

    assert answer.status_code == 200
    sent = responses.calls[0].request
    assert sent.method == "POST"
    assert sent.url == f"{BACKEND}/tokenize?trace=1&x=a%20b"
    assert sent.body == body
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Authorization"] == "Bearer k"
    assert sent.headers["X-Custom"] == "1"
    assert sent.headers["Content-Length"] == str(len(body))


@responses.activate
def test_keeps_the_raw_request_target(client):
    responses.get(f"{BACKEND}/a%2Fb/c", body=b"")

    client.get("/a%2Fb/c", environ_overrides={"RAW_URI": "/a%2Fb/c"})

    assert responses.calls[0].request.url == f"{BACKEND}/a%2Fb/c"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
@responses.activate
def test_forwards_every_method(client, method):
    responses.add(method, f"{BACKEND}/slots/0", body=b"done")

    answer = client.open("/slots/0", method=method)

    assert answer.status_code == 200
    assert responses.calls[0].request.method == method


@responses.activate
def test_drops_hop_by_hop_request_headers_and_adds_forwarded_ones(client):
    responses.get(f"{BACKEND}/props", json={})

    client.get(
        "/props",
        headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Upgrade": "websocket",
            "X-Forwarded-For": "10.0.0.1",
        },
        environ_overrides={"REMOTE_ADDR": "192.0.2.7"},
    )

    sent = responses.calls[0].request.headers
    for name in (
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "TE",
        "Proxy-Authorization",
        "Upgrade",
    ):
        assert name not in sent
    assert sent["X-Forwarded-For"] == "192.0.2.7"  # the client's own claim is not trusted
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"] == "localhost:8088"


@responses.activate
def test_a_trusted_x_forwarded_for_is_extended(make_app):
    responses.get(f"{BACKEND}/props", json={})
    client = make_app(trust_forwarded_for=True).test_client()

    client.get(
        "/props",
        headers={"X-Forwarded-For": "203.0.113.9"},
        environ_overrides={"REMOTE_ADDR": "127.0.0.1"},
    )

    assert responses.calls[0].request.headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"


def keyed(make_app, **settings):
    return make_app(api_key="s3cret-ключ", **settings).test_client()


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Basic s3cret", "Bearer s3cret", "Bearer s3cret-ключ-and-more"],
)
@responses.activate
def test_with_an_api_key_requests_without_it_get_401_and_are_not_forwarded(make_app, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    answer = keyed(make_app).post("/v1/chat/completions", data=b"{}", headers=headers)

    assert_openai_error(answer, 401, "invalid_api_key")
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert len(responses.calls) == 0


@responses.activate
def test_the_right_key_passes_and_is_not_forwarded_to_llama_cpp(make_app):
    responses.post(f"{BACKEND}/tokenize", json={"tokens": []})
    client = keyed(make_app)

    # As a WSGI server passes the header's UTF-8 bytes: decoded as latin-1.
    answer = client.post(
        "/tokenize",
        data=b"{}",
        headers={"Authorization": "Bearer s3cret-ключ".encode().decode("latin-1")},
    )

    assert answer.status_code == 200
    assert "Authorization" not in sent_to("/tokenize")[0].headers


@responses.activate
def test_probes_and_preflights_need_no_key(make_app):
    responses.get(f"{BACKEND}/health", json={"status": "ok"})
    responses.add("OPTIONS", f"{BACKEND}/v1/chat/completions", status=204)
    client = keyed(make_app)

    assert client.get("/health").status_code == 200
    assert client.options("/v1/chat/completions").status_code == 204
    assert client.get("/v1/models").status_code == 401


@responses.activate
def test_llama_server_s_own_key_goes_with_proxied_requests_and_bioproxy_s_calls(make_app):
    responses.post(f"{BACKEND}/tokenize", json={"tokens": []})
    responses.get(f"{BACKEND}/health", json={"status": "ok"})
    app = make_app(backend_api_key="llama-key")

    app.test_client().post("/tokenize", data=b"{}", headers={"Authorization": "Bearer mine"})
    app.extensions["bioproxy"].backend.upstream.health()

    assert [c.request.headers["Authorization"] for c in responses.calls] == [
        "Bearer llama-key",
        "Bearer llama-key",
    ]


@responses.activate
def test_passes_status_headers_and_body_back_but_not_hop_by_hop_headers(client):
    responses.get(
        f"{BACKEND}/v1/models",
        status=418,
        body=b"\x00raw bytes\xff",
        content_type="application/octet-stream",
        headers={
            "X-Upstream": "yes",
            "Connection": "X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Server": "llama.cpp",
        },
    )

    answer = client.get("/v1/models")

    assert answer.status_code == 418
    assert answer.get_data() == b"\x00raw bytes\xff"
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.headers["X-Upstream"] == "yes"
    for name in ("X-Hop", "Keep-Alive", "Connection", "Server"):
        assert name not in answer.headers


@responses.activate
def test_passes_a_gzip_body_as_bytes_with_true_headers(client):
    payload = json.dumps({"data": ["x" * 2000]}).encode()
    compressed = gzip.compress(payload)
    responses.get(
        f"{BACKEND}/v1/models",
        body=compressed,
        content_type="application/json",
        headers={"Content-Encoding": "gzip", "Content-Length": str(len(compressed))},
    )

    answer = client.get("/v1/models", headers={"Accept-Encoding": "gzip"})

    assert answer.get_data() == compressed
    assert answer.headers["Content-Encoding"] == "gzip"
    assert answer.headers["Content-Length"] == str(len(compressed))
    assert gzip.decompress(answer.get_data()) == payload
    assert responses.calls[0].request.headers["Accept-Encoding"] == "gzip"


@responses.activate
def test_adds_no_content_type_of_its_own(client):
    responses.delete(f"{BACKEND}/thing", status=204, body=b"", content_type=None)

    answer = client.delete("/thing")

    assert answer.status_code == 204
    assert "Content-Type" not in answer.headers


@responses.activate
def test_admin_paths_on_the_proxy_port_go_to_llama_cpp(client):
    responses.get(f"{BACKEND}/health", json={"status": "ok"})
    responses.get(f"{BACKEND}/metrics", body="llamacpp:prompt_tokens_total 1\n")

    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/metrics").get_data() == b"llamacpp:prompt_tokens_total 1\n"
    assert [c.request.url for c in responses.calls] == [f"{BACKEND}/health", f"{BACKEND}/metrics"]


def assert_openai_error(answer, status, code):
    assert answer.status_code == status
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


@responses.activate
def test_unreachable_backend_is_a_502_json_error(client):
    responses.get(f"{BACKEND}/v1/models", body=requests.ConnectionError("refused"))

    error = assert_openai_error(client.get("/v1/models"), 502, "upstream_unavailable")
    assert BACKEND in error["message"]


@responses.activate
def test_no_response_in_time_is_a_504_json_error(client):
    responses.post(f"{BACKEND}/completion", body=requests.ReadTimeout("read timed out"))

    assert_openai_error(client.post("/completion", data=b"{}"), 504, "upstream_timeout")


@responses.activate
def test_body_over_the_limit_is_a_413_and_never_forwarded(make_app):
    client = make_app(max_request_bytes=100).test_client()

    answer = client.post("/completion", data=b"x" * 101)

    assert_openai_error(answer, 413, "request_too_large")
    assert len(responses.calls) == 0


@responses.activate
def test_chunked_body_over_the_limit_is_a_413(make_app):
    client = make_app(max_request_bytes=100).test_client()

    answer = client.post(
        "/completion",
        input_stream=io.BytesIO(b"x" * 500),
        environ_overrides={"wsgi.input_terminated": True},
        headers={"Transfer-Encoding": "chunked"},
    )

    assert_openai_error(answer, 413, "request_too_large")
    assert len(responses.calls) == 0


@responses.activate
def test_body_at_the_limit_is_forwarded(make_app):
    responses.post(f"{BACKEND}/tokenize", json={})
    client = make_app(max_request_bytes=100).test_client()

    assert client.post("/tokenize", data=b"x" * 100).status_code == 200
    assert responses.calls[0].request.body == b"x" * 100


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/xml"])
@responses.activate
def test_a_prompt_labelled_as_something_else_than_json_is_a_415(client, content_type):
    answer = client.post("/v1/chat/completions", data=b"{}", content_type=content_type)

    assert_openai_error(answer, 415, "unsupported_media_type")
    assert len(responses.calls) == 0


@pytest.mark.parametrize(
    "content_type",
    [
        None,  # curl --data-binary with -H "Content-Type:"
        "application/json; charset=utf-8",
        "application/vnd.api+json",
        "application/x-www-form-urlencoded",  # curl -d's default
        "text/plain;charset=UTF-8",  # fetch() with a string body
    ],
)
@responses.activate
def test_json_bodies_under_the_labels_common_clients_send_are_forwarded(client, content_type):
    responses.post(f"{BACKEND}/completion", json={"content": "ok"})

    answer = client.post("/completion", data=b'{"prompt": "hi"}', content_type=content_type)

    assert answer.status_code == 200
    assert json.loads(sent_to("/completion")[0].body)["prompt"] == "hi"


class BreaksAfterFirstRead(io.RawIOBase):
    """A socket stand-in that delivers one piece, then fails as a reset connection would."""

    def __init__(self, first):
        self.first = first

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.first is None:
            raise ConnectionResetError("connection reset by peer")
        n = len(self.first)
        buffer[:n], self.first = self.first, None
        return n


@responses.activate
def test_upstream_failing_mid_body_cuts_the_client_off(app, client):
    first = b'data: {"content": "Hel"}\n\n'
    responses.post(
        f"{BACKEND}/v1/chat/completions",
        body=io.BufferedReader(BreaksAfterFirstRead(first)),
        content_type="text/event-stream",
    )

    answer = client.post("/v1/chat/completions", data=b"{}", buffered=False)
    chunks = answer.response
    assert next(chunks) == first
    with pytest.raises(ConnectionResetError):
        next(chunks)
    answer.close()

    metrics = app.extensions["bioproxy"].metrics
    assert metrics.upstream_errors.labels("upstream_cut")._value.get() == 1
    assert metrics.in_flight._value.get() == 0


@responses.activate
def test_repeated_headers_survive_both_ways(client):
    responses.get(
        f"{BACKEND}/props",
        json={},
        headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")],
    )

    answer = client.get(
        "/props", headers=[("Accept", "text/plain"), ("Accept", "application/json")]
    )

    assert answer.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert responses.calls[0].request.headers["Accept"] == "text/plain, application/json"


@responses.activate
def test_cookies_from_one_answer_are_not_sent_with_the_next_request(make_app):
    responses.get(f"{BACKEND}/props", json={}, headers={"Set-Cookie": "session=alice; Path=/"})
    app = make_app()

    app.test_client().get("/props")
    app.test_client().get("/props")

    assert "Cookie" not in responses.calls[1].request.headers


@responses.activate
def test_raw_non_ascii_bytes_in_the_target_are_percent_encoded(client):
    responses.get(f"{BACKEND}/caf%C3%A9?q=%C3%A9", body=b"")
    raw = "/café?q=é".encode().decode("latin-1")  # as a WSGI server passes raw bytes

    answer = client.get("/x", environ_overrides={"RAW_URI": raw})

    assert answer.status_code == 200
    assert responses.calls[0].request.url == f"{BACKEND}/caf%C3%A9?q=%C3%A9"


def closed_without_answer():
    from http.client import RemoteDisconnected

    from urllib3.exceptions import ProtocolError

    return requests.ConnectionError(
        ProtocolError("Connection aborted.", RemoteDisconnected("closed without response"))
    )


@responses.activate
def test_a_pooled_connection_closed_under_us_is_retried_once(client):
    responses.post(f"{BACKEND}/v1/chat/completions", body=closed_without_answer())
    responses.post(f"{BACKEND}/v1/chat/completions", json={"ok": True})

    answer = client.post("/v1/chat/completions", data=b'{"stream": true}')

    assert answer.status_code == 200
    assert [r.body for r in sent_to("/v1/chat/completions")] == [b'{"stream": true}'] * 2


@responses.activate
def test_a_second_closed_connection_is_a_502(client):
    responses.post(f"{BACKEND}/completion", body=closed_without_answer())
    responses.post(f"{BACKEND}/completion", body=closed_without_answer())

    assert_openai_error(client.post("/completion", data=b"{}"), 502, "upstream_unavailable")
    assert len(sent_to("/completion")) == 2


@responses.activate
def test_refused_and_timed_out_requests_are_not_sent_twice(client):
    responses.post(f"{BACKEND}/a", body=requests.ConnectionError("refused"))
    responses.post(f"{BACKEND}/b", body=requests.ReadTimeout("slow"))

    client.post("/a", data=b"{}")
    client.post("/b", data=b"{}")

    assert [c.request.url for c in responses.calls] == [f"{BACKEND}/a", f"{BACKEND}/b"]


@responses.activate
def test_a_request_without_the_key_does_not_hold_warmups_off(make_app):
    class Evaluation:  # a warmup under way
        cancelled = False

        def cancel(self):
            self.cancelled = True

    app = make_app(api_key="k")
    gate = app.extensions["bioproxy"].backend.gate
    gate.runs.add(running := Evaluation())

    answer = app.test_client().post("/v1/chat/completions", data=b"{}")
    answer.close()

    assert answer.status_code == 401
    assert not running.cancelled
    assert gate.users == 0 and gate.idle.is_set()
    assert app.extensions["bioproxy"].metrics.in_flight._value.get() == 0


@pytest.mark.parametrize(
    "target",
    [
        "@127.0.0.1:9/steal",  # joined to backend_url: http://llama.test:8081@127.0.0.1:9/steal
        "http://127.0.0.1:9/steal",
        "127.0.0.1:9",
        "*",
        "steal",
    ],
)
@responses.activate
def test_only_origin_form_targets_are_forwarded(client, target):
    answer = client.get("/steal", environ_overrides={"RAW_URI": target})

    assert answer.status_code == 400
    assert answer.get_json()["error"]["code"] == "invalid_request_target"
    # Nothing but bioproxy's own look at llama.cpp (its /props and /slots).
    assert {c.request.url.split("?")[0] for c in responses.calls} <= {
        f"{BACKEND}/props",
        f"{BACKEND}/slots",
    }


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=40))
def test_no_origin_form_target_changes_the_upstream_host(rest):
    upstream = Upstream("http://127.0.0.1:8081", 1, 1, 1)
    target = "/" + rest
    seen = []

    def record(prepared, **kwargs):
        seen.append(parse_url(prepared.url))
        raise requests.ConnectionError("recorded")

    upstream.adapter.send = record
    with pytest.raises(UpstreamUnavailable):
        upstream.send("GET", target, [], b"")
    assert (seen[0].scheme, seen[0].host, seen[0].port, seen[0].auth) == (
        "http",
        "127.0.0.1",
        8081,
        None,
    )


def test_the_upstream_refuses_a_target_that_is_not_origin_form():
    with pytest.raises(ValueError, match="not an origin-form request target"):
        Upstream("http://127.0.0.1:8081", 1, 1, 1).send("GET", "@evil:1/x", [], b"")
