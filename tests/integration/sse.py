"""Reading server-sent events as they arrive."""

import json
import time

import requests


def read_events(response, on_event=None):
    """[(seconds since the call, data)] for each `data:` event of a streamed response."""
    start = time.monotonic()
    events, buffer = [], b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            for line in raw.split(b"\n"):
                if line.startswith(b"data: "):
                    events.append((time.monotonic() - start, line[6:].decode()))
                    if on_event:
                        on_event(events)
    return events


def stream_text(events):
    """The concatenated content deltas of a chat completion stream."""
    text = ""
    for _, data in events:
        if data != "[DONE]":
            delta = json.loads(data)["choices"][0]["delta"]
            text += delta.get("content") or ""
    return text


def timed_reads(url, body):
    """[(seconds since the request was sent, events in that read)] of a streamed POST."""
    start = time.monotonic()
    reads = []
    with requests.post(url, json=body, stream=True, timeout=60) as answer:
        assert answer.status_code == 200, answer.text
        for chunk in answer.iter_content(chunk_size=None):
            reads.append((time.monotonic() - start, chunk.count(b"data: ")))
    return reads


def assert_incremental(reads, events):
    """The events came in many reads spread over the whole stream, not at its end."""
    assert sum(n for _, n in reads) >= events
    assert len(reads) >= events // 2
    first, last = reads[0][0], reads[-1][0]
    assert first < last / 2
