"""Time to first token: when a streamed answer's first generated content went by."""

import json
import time


def first_content_timed(chunks, started, metrics, template):
    """A streamed body that records its time to first token at its first generated content.

    Not at its first chunk: llama-server's web UI asks for progress events
    (`return_progress`), and those come, empty, long before the first token.
    """
    timed, pending = False, b""
    try:
        for chunk in chunks:
            if not timed:
                pending += chunk
                events = pending.split(b"\n\n")
                pending = events.pop()  # a part of an event yet to come
                if any(map(has_content, events)):
                    seconds = time.monotonic() - started
                    metrics.first_token.labels(template).observe(seconds)
                    metrics.recent_first_tokens.add(seconds, "templated" if template else "plain")
                    timed, pending = True, b""
                elif len(pending) > CONTENT_SCAN_BYTES:
                    timed, pending = True, b""  # not an SSE stream of llama-server's: not timed
            yield chunk
    finally:
        if hasattr(chunks, "close"):
            chunks.close()


CONTENT_SCAN_BYTES = 64 * 1024


def has_content(event):
    """Whether an SSE event of llama-server's carries generated text or a tool call."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            data = json.loads(line[5:])
        except ValueError:
            continue  # [DONE], or not JSON
        if not isinstance(data, dict):
            continue
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
