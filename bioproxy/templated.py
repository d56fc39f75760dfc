"""Serving a templated request: its slot, its cache, the expanded template, its timings."""

import json
import string
from urllib.parse import quote

from .errors import TemplateBroken
from .upstream import BackendError

TAIL_BYTES = 16 * 1024


class Tail:
    """The last bytes of a body as it streams by, to read llama.cpp's timings at its end."""

    def __init__(self):
        self.data = b""
        self.complete = False

    def watch(self, chunks):
        for chunk in chunks:
            self.data = (self.data + chunk)[-TAIL_BYTES:]
            yield chunk
        self.complete = True

    def timings(self):
        """The last "timings" object in the body (the final SSE event's), or None."""
        at = self.data.rfind(b'"timings":')
        if at < 0:
            return None
        text = self.data[at + len(b'"timings":') :].decode("utf-8", "replace")
        try:
            timings = json.JSONDecoder().raw_decode(text.lstrip())[0]
        except ValueError:
            return None
        return timings if isinstance(timings, dict) else None


def forward(state, match, send):
    """Expand the template into the request, in a slot that holds its cache when it can.

    send(body, watch) forwards a body and returns the streaming response.
    """
    warmer, metrics = state.warmer, state.metrics
    entry = warmer.entries[match.prefix]
    template = entry.template
    if template is None:
        raise TemplateBroken(
            f"template {entry.prefix} ({entry.path}) cannot be used: {entry.error}"
        )
    # Only chat requests match the warmed cache; completions are expanded, not pinned.
    slot, cache = take_slot(warmer, entry, template) if match.chat else (None, "cold")
    tail = Tail()
    try:
        response = send(match.expand(template, slot), tail.watch)
    except BaseException:
        if slot is not None:
            release_slot(warmer, entry, slot, template.digest, succeeded=False)
        raise
    metrics.template_requests.labels(entry.prefix, cache).inc()
    # Header values are latin-1: a prefix beyond ASCII goes percent-encoded.
    response.headers["X-Bioproxy-Template"] = quote(entry.prefix, safe=string.punctuation)
    response.headers["X-Bioproxy-Cache"] = cache

    def done():
        try:
            timings = tail.timings() or {}
            reused, evaluated = timings.get("cache_n"), timings.get("prompt_n")
            if isinstance(reused, int) and isinstance(evaluated, int):
                metrics.tokens_reused.labels(entry.prefix).inc(reused)
                metrics.tokens_evaluated.labels(entry.prefix).inc(evaluated)
        finally:
            if slot is not None:
                ok = tail.complete and response.status_code == 200
                release_slot(warmer, entry, slot, template.digest, succeeded=ok)

    response.call_on_close(done)
    return response


def take_slot(warmer, entry, template):
    """A slot taken for a templated request, and its cache state: slot, restored, cold.

    Returns (None, "cold") when llama-server's slots are unknown (it is down) or no slot
    came free within slot_timeout; the request then goes unpinned. A taken slot must be
    given back with release_slot().
    """
    slots = warmer.slots
    if slots.count == 0:
        try:
            slots.refresh()
        except BackendError:
            return None, "cold"
    slot = slots.pick(entry.prefix)
    if not slots.acquire(slot):
        return None, "cold"
    try:
        if slots.holds(slot, entry.prefix, template.digest):
            return slot, "slot"
        return slot, warmer.restore(entry, template, slot)
    except BaseException:
        slots.release(slot)
        raise


def release_slot(warmer, entry, slot, digest, succeeded):
    """After a templated request: the slot now holds the template if it succeeded."""
    slots = warmer.slots
    slots.finishing.add(slot)
    try:
        if succeeded and entry.template is not None and entry.template.digest == digest:
            slots.mark(slot, entry.prefix, digest)
        else:
            slots.forget(slot)
    finally:
        slots.finishing.discard(slot)
        slots.release(slot)
