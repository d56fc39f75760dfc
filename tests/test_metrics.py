"""Request metrics: bounded labels, upstream errors, requests in flight."""

import re

import pytest
import requests
import responses
from prometheus_client.parser import text_string_to_metric_families

from bioproxy.metrics import FirstTokens, endpoint
from tests.conftest import BACKEND


def samples(admin):
    """{(name, sorted labels): value} from the admin port's /metrics."""
    text = admin.get("/metrics").get_data(as_text=True)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def request_count(admin, path_label, status):
    key = (
        "bioproxy_http_request_duration_seconds_count",
        (("endpoint", path_label), ("method", "GET"), ("status", status)),
    )
    return samples(admin).get(key, 0)


class FakeRequest:
    def __init__(self, target):
        self.environ = {"RAW_URI": target}


@pytest.mark.parametrize(
    "path, label",
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/health", "/health"),
        ("/slots/3", "/slots/{id}"),
        # llama-server routes every one of these to its slot actions.
        ("/slots/x", "/slots/{id}"),
        ("/slots/0/", "/slots/{id}"),
        ("/slots%2F0?action=save", "/slots/{id}"),
        # Labelled by the endpoint llama-server serves them with.
        ("/v1/chat%2Fcompletions", "/v1/chat/completions"),
        ("/v1/chat/completion%u0073?x=1", "/v1/chat/completions"),
        ("/random/path/123", "other"),
        ("/v1/chat/completions/extra", "other"),
        ("/slots/0/x", "other"),
    ],
)
def test_endpoint_label_is_bounded(path, label):
    assert endpoint(FakeRequest(path)) == label


@responses.activate
def test_requests_are_counted_by_endpoint_and_status(client, admin):
    responses.get(re.compile(f"{BACKEND}/.*"), json={})

    client.get("/v1/models")
    client.get("/v1/models")
    for n in range(5):
        client.get(f"/no/such/path/{n}")

    assert request_count(admin, "/v1/models", "200") == 2
    assert request_count(admin, "other", "200") == 5
    labels = {dict(k[1]).get("endpoint") for k in samples(admin)} - {None}
    assert labels == {"/v1/models", "other"}


@responses.activate
def test_admin_requests_are_not_counted(admin):
    admin.get("/metrics")
    admin.get("/metrics")

    assert not any(
        name == "bioproxy_http_request_duration_seconds_count" for name, _ in samples(admin)
    )


@responses.activate
def test_upstream_errors_are_counted_by_kind(client, admin):
    responses.get(f"{BACKEND}/a", body=requests.ConnectionError("refused"))
    responses.get(f"{BACKEND}/b", body=requests.ReadTimeout("slow"))

    # buffered: the client reads the whole answer and closes it, as a server does.
    client.get("/a", buffered=True)
    client.get("/b", buffered=True)
    client.get("/b", buffered=True)

    found = samples(admin)
    assert found[("bioproxy_upstream_errors_total", (("kind", "upstream_unavailable"),))] == 1
    assert found[("bioproxy_upstream_errors_total", (("kind", "upstream_timeout"),))] == 2
    assert found[("bioproxy_requests_in_flight", ())] == 0


@responses.activate
def test_a_streamed_response_is_in_flight_until_closed(client, admin):
    responses.get(f"{BACKEND}/stream", body=b"data: 1\n\n")

    answer = client.get("/stream", buffered=False)
    assert samples(admin)[("bioproxy_requests_in_flight", ())] == 1
    answer.close()
    assert samples(admin)[("bioproxy_requests_in_flight", ())] == 0


@responses.activate
def test_made_up_methods_create_no_series(client, admin):
    for method in ("XYZA", "PROPFIND", "BREW"):
        assert client.open("/v1/models", method=method).status_code == 405

    methods = {dict(labels).get("method") for _, labels in samples(admin)} - {None}
    assert methods == set()


@responses.activate
def test_a_stream_records_its_time_to_first_token_and_is_logged(client, admin, caplog):
    responses.post(
        f"{BACKEND}/completion",
        body=b'data: {"content": "a"}\n\n',
        content_type="text/event-stream",
    )
    caplog.set_level("INFO", logger="bioproxy.access")

    client.post("/completion", data=b'{"stream": true}').close()

    first = samples(admin)
    assert first[("bioproxy_time_to_first_token_seconds_count", (("template", ""),))] == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bioproxy.access"]
    assert re.fullmatch(
        r"\S+ POST /completion 200 [\d.]+ms template=- cache=- backend=\S+"
        r" queued=[\d.]+ms ready=[\d.]+ms",
        line,
    ), line


def test_recent_first_tokens_are_grouped_in_buckets_of_the_last_minutes():
    recent = FirstTokens(window=60, bucket=15)
    for at, seconds in [(0, 9.0), (100, 0.1), (101, 0.3), (102, 0.2), (116, 0.05)]:
        recent.add(seconds, now=at)
    recent.add(2.0, "templated", now=103)

    buckets = recent.buckets(now=150)

    assert buckets == [
        {"at": 90, "kind": "plain", "count": 3, "p50_ms": 200.0, "p95_ms": 300.0},
        {"at": 90, "kind": "templated", "count": 1, "p50_ms": 2000.0, "p95_ms": 2000.0},
        {"at": 105, "kind": "plain", "count": 1, "p50_ms": 50.0, "p95_ms": 50.0},
    ]


@pytest.mark.parametrize(
    "events, timed",
    [
        # llama-server's web UI asks for progress: the first events carry none of the answer.
        ([b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}'], False),
        (
            [b'data: {"choices":[{"delta":{}}],"prompt_progress":{"total":900,"processed":0}}'],
            False,
        ),
        ([b'data: {"choices":[{"delta":{"content":"Hi"}}]}'], True),
        ([b'data: {"choices":[{"delta":{"reasoning_content":"Hm"}}]}'], True),
        ([b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}'], True),
        ([b'data: {"choices":[{"text":"Hi","index":0}]}'], True),  # /v1/completions
        ([b'data: {"content":"","tokens":[]}', b'data: {"content":"a"}'], True),  # /completion
        ([b"data: [DONE]"], False),
    ],
)
@responses.activate
def test_time_to_first_token_is_taken_at_the_first_generated_content(client, admin, events, timed):
    responses.post(
        f"{BACKEND}/v1/chat/completions",
        body=b"".join(e + b"\n\n" for e in events),
        content_type="text/event-stream",
    )

    client.post("/v1/chat/completions", data=b'{"stream": true, "messages": []}').close()

    count = samples(admin).get(
        ("bioproxy_time_to_first_token_seconds_count", (("template", ""),)), 0
    )
    assert count == (1 if timed else 0)
