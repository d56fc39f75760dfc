"""Time to first token: when a streamed answer's first generated content went by."""

import time

from . import sse


def first_content_timed(chunks, started, metrics, template):
    """A streamed body that records its time to first token at its first generated content.

    Not at its first chunk: llama-server's web UI asks for progress events
    (`return_progress`), and those come, empty, long before the first token. Each chunk is
    looked into once it is on its way (the server asks for the next one, or closes the
    body): the client's first token waits for nothing here.
    """
    scan = ContentScan(started, metrics, template)
    try:
        for chunk in chunks:
            try:
                yield chunk
            finally:
                scan.add(chunk)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()


class ContentScan:
    """Reads a stream's events until one carries generated content, and times it then."""

    def __init__(self, started, metrics, template):
        self.started, self.metrics, self.template = started, metrics, template
        self.done, self.pending = False, b""

    def add(self, chunk):
        if self.done:
            return
        self.pending += chunk
        events = self.pending.split(b"\n\n")
        self.pending = events.pop()  # a part of an event yet to come
        if any(map(has_content, events)):
            seconds = time.monotonic() - self.started
            self.metrics.first_token.labels(self.template).observe(seconds)
            kind = "templated" if self.template else "plain"
            self.metrics.recent_first_tokens.add(seconds, kind)
            self.done, self.pending = True, b""
        elif len(self.pending) > CONTENT_SCAN_BYTES:
            self.done, self.pending = True, b""  # not an SSE stream of llama-server's: not timed


CONTENT_SCAN_BYTES = 64 * 1024


def has_content(event):
    """Whether an SSE event of llama-server's carries generated text or a tool call."""
    for data in sse.objects(event):
        if data.get("content"):  # /completion
            return True
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if choice.get("text") or (
                isinstance(delta, dict)
                and any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls"))
            ):
                return True
    return False
