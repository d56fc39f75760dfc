"""Serving a request that uses a slot: its place in the queue, its slot, a template's cache."""

import json
import logging
import string
from contextlib import nullcontext
from urllib.parse import quote

from flask import g

from . import injection
from .errors import RequestTooLarge, TemplateBroken
from .scheduler import GRANTED, USER, Ticket

log = logging.getLogger(__name__)

TAIL_BYTES = 16 * 1024
# A request found its template warm when llama-server reused the template's tokens but
# these few: where the template's text meets the user's, the tokens may be cut otherwise.
MISS_SLACK = 16


class Progress:
    """Whether a body streamed to its end (else llama-server may still be working on it)."""

    def __init__(self):
        self.complete = False

    def watch(self, chunks):
        yield from chunks
        self.complete = True


class Tail(Progress):
    """The last bytes of a body as it streams by, to read llama.cpp's timings at its end."""

    def __init__(self):
        super().__init__()
        self.data = b""

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


class Expansion:
    """A templated request's body, expanded with the template's text as it arrived."""

    def __init__(self, entry, template, data):
        self.entry = entry
        self.template = template  # that version: the file may change while it waits
        self.data = data  # the body to send, not yet pinned to a slot


def expand(state, match):
    """Expand a request's template, or raise the error that refuses it.

    Done before the request waits for a slot (or holds warmups off): a request refused
    here has taken nothing.
    """
    entry = state.warmer.entries[match.prefix]
    template = entry.template
    if template is None:
        raise TemplateBroken(
            f"template {entry.prefix} ({entry.path}) cannot be used: {entry.error}"
        )
    data = match.expand(template)
    limit = state.settings.max_request_bytes
    if len(data) > limit:
        # Each <{message}> gets the whole message: the body to send can be several times
        # the one received, and llama-server would spend seconds reading it to refuse it.
        raise RequestTooLarge(
            f"the request with template {entry.prefix} expanded is larger than "
            f"max_request_bytes ({limit} bytes)"
        )
    return Expansion(entry, template, data)


def forward(state, raw, body, match, expansion, send, watch=None):
    """Forward a request that makes llama-server evaluate a prompt, in a slot bioproxy chose.

    The request waits in the scheduler's queue for a slot and is pinned to it; a templated
    one goes, expanded, to a slot that holds its cache when one can. raw is the body as
    the client sent it, body that parsed, match the template found in it (or None) and
    expansion its expanded body. send(body, wrap) forwards a body and returns the
    streaming response. watch, a ClientWatch, ends the request if its client leaves
    before the answer starts.
    """
    warmer = state.warmer
    ticket = _ticket(warmer.slots, body, match)
    try:
        with watch.guard() if watch else nullcontext():
            if ticket is None:
                # Not one bioproxy can place (llama-server is down, or the body is not for
                # it): forwarded as it is, llama-server answers.
                if match is None:
                    return send(raw)
                return _templated(state, expansion, body, send, None)
            slot = warmer.scheduler.acquire(ticket)
            if match is not None:
                return _templated(state, expansion, body, send, ticket)
            progress = Progress()
            response = send(_pin(raw, body, slot), progress.watch)
    except BaseException:
        if ticket is not None and ticket.outcome == GRANTED:
            # Maybe sent: llama-server may still be at work in the slot (it stops once it
            # notices the closed connection, after the batch under way).
            release(warmer, ticket, drain=True)
        raise
    response.call_on_close(lambda: release(warmer, ticket, drain=not progress.complete))
    return response


def _templated(state, expansion, body, send, ticket):
    """Forward an expanded request, in the ticket's slot if any."""
    warmer, metrics = state.warmer, state.metrics
    entry, template = expansion.entry, expansion.template
    slot = ticket.slot if ticket else None
    data = expansion.data if slot is None else _pin(expansion.data, body, slot)
    cache = "cold"
    if ticket is not None and ticket.template is not None:
        # A slot that held the template still does unless another task ran there since.
        held = warmer.slots.holds(slot, entry.prefix, template.digest)
        cache = "slot" if held else warmer.restore(entry, template, slot)
    tail = Tail()
    response = send(data, tail.watch)
    metrics.template_requests.labels(entry.prefix, cache).inc()
    entry.requests[cache] += 1
    g.template, g.cache = entry.prefix, cache  # for the access log and the metrics
    # Header values are latin-1: a prefix beyond ASCII goes percent-encoded.
    response.headers["X-Bioproxy-Template"] = quote(entry.prefix, safe=string.punctuation)
    response.headers["X-Bioproxy-Cache"] = cache

    def done():
        try:
            timings = tail.timings() or {}
            reused, evaluated = timings.get("cache_n"), timings.get("prompt_n")
            counts = (reused, evaluated)
            if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
                metrics.tokens_reused.labels(entry.prefix).inc(reused)
                metrics.tokens_evaluated.labels(entry.prefix).inc(evaluated)
                if cache == "restored" and not _reused(reused, entry.tokens):
                    warmer.restore_did_not_hold(entry, template, reused)
        finally:
            if ticket is not None:
                ok = tail.complete and response.status_code == 200
                release(warmer, ticket, template.digest if ok else None, not tail.complete)

    response.call_on_close(done)
    return response


def _reused(reused, tokens):
    """Whether an answer that reused this many tokens found a template of tokens warm."""
    return not tokens or reused >= tokens - min(MISS_SLACK, tokens // 2)


def release(warmer, ticket, digest=None, drain=False):
    """After a request: its slot holds its template if given the digest it succeeded with.

    Any other request (plain, failed, cut off) leaves the slot holding nothing bioproxy
    can use. The bookkeeping comes before the slot is handed on: it reads /slots, which
    must not yet show the next task. drain: the request ended before its answer did, so
    the slot waits until llama-server shows it idle.
    """
    slots, entry = warmer.slots, warmer.entries.get(ticket.template)
    try:
        if digest and entry is not None and entry.template and entry.template.digest == digest:
            slots.mark(ticket.slot, entry.prefix, digest)
        else:
            slots.forget(ticket.slot)
    except Exception:
        # Runs as a response's close callback: one that raises would skip the ones after
        # it (the request's own bookkeeping). The slot is then simply not known to hold it.
        log.exception("bookkeeping of slot %d failed", ticket.slot)
        slots.forget(ticket.slot)
    finally:
        warmer.scheduler.release(ticket, drain)
        if drain:
            warmer.drained()


def _ticket(slots, body, match):
    """The scheduler Ticket for a request, or None when bioproxy cannot place it."""
    if slots.count == 0:
        return None  # llama-server has not answered the warmer yet (it may be down)
    wanted = body.get("id_slot", -1)
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted >= slots.count:
        return None  # llama-server will say what is wrong with it
    # Only chat requests match a warmed cache; templated completions are placed as plain.
    template = match.prefix if match and match.chat else None
    return Ticket(USER, template, wanted if wanted >= 0 else None)


def check_pinnable(raw, body):
    """BadRequest now, before the request takes a slot, if pinning it would fail later.

    A body that _pin must rebuild fails to be rebuilt when it holds a lone surrogate escape.
    """
    if _rebuilt_to_pin(raw, body):
        injection.dump(body)


def _rebuilt_to_pin(raw, body):
    """Whether pinning rebuilds the body: it names id_slot itself, or does not start with
    "{" (a BOM, UTF-16). Otherwise "id_slot" is written in front of its bytes."""
    return "id_slot" in body or not raw.lstrip().startswith(b"{")


def _pin(raw, body, slot):
    """The client's body pinned to a slot, its bytes otherwise untouched when it can be."""
    if body.get("id_slot", -1) == slot:
        return raw
    if _rebuilt_to_pin(raw, body):
        return injection.dump({**body, "id_slot": slot})
    rest = raw.lstrip()[1:]  # after the object's "{"
    return b'{"id_slot":%d%s' % (slot, b"" if rest.lstrip().startswith(b"}") else b",") + rest
