"""Reading server-sent events as they arrive."""

import json
import time


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
