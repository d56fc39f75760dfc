"""Serving a request that uses a slot: its place in the queue, its slot, a template's cache."""

import logging
import time
from contextlib import nullcontext

from . import injection
from .errors import RequestTooLarge, TemplateBroken
from .lease import Lease
from .scheduler import GRANTED, USER, Ticket
from .variants import Found

log = logging.getLogger(__name__)


class Expansion:
    """A templated request's body, expanded with the template's text as it arrived."""

    def __init__(self, entry, template, data):
        self.entry = entry
        self.template = template  # that version: the file may change while it waits
        self.data = data  # the body to send, not yet pinned to a slot
        # The cache it can reuse (see place()): found.key, what a slot holding it holds,
        # is the template's prefix or its variant's key; None when none applies.
        self.found = Found(None)

    def place(self, variants, match):
        """Find the cache it can reuse: in a chat that opened with the templated message,
        the template's own, or a variant's when more renders before the user's words."""
        if match.opening is not None:
            self.found = variants.find(self.entry, self.template, match)


def expand(catalog, match, limit):
    """Expand a request's template, or raise the error that refuses it.

    Done before the request waits for a slot (or holds warmups off): a request refused
    here has taken nothing. limit: max_request_bytes.
    """
    templates = {}
    for prefix in sorted(match.prefixes | {match.prefix}):
        entry = catalog[prefix]
        if entry.template is None:
            raise TemplateBroken(
                f"template {entry.prefix} ({entry.path}) cannot be used: {entry.error}"
            )
        templates[prefix] = entry.template
    entry, template = catalog[match.prefix], templates[match.prefix]
    data = match.expand(templates)
    if len(data) > limit:
        # Each <{message}> gets the whole message: the body to send can be several times
        # the one received, and llama-server would spend seconds reading it to refuse it.
        raise RequestTooLarge(
            f"the request with template {entry.prefix} expanded is larger than "
            f"max_request_bytes ({limit} bytes)"
        )
    return Expansion(entry, template, data)


def forward(backend, raw, body, expansion, send, watch=None):
    """Forward a request that makes llama-server evaluate a prompt, in a slot bioproxy chose.

    The request waits in the scheduler's queue for a slot and is pinned to it; a templated
    one goes, expanded, to a slot that holds its cache when one can. raw is the body as
    the client sent it, body that parsed, and expansion its template expanded (or None),
    placed (Expansion.place). send(data, lease) sends a body to llama.cpp and returns
    the response to the client, its answer's first chunk read; closed, it ends the lease.
    watch, a ClientWatch, ends the request if its client leaves before the answer starts.
    """
    ticket = _ticket(backend.slots.table, body, expansion)
    lease = None
    arrived = time.monotonic()
    try:
        with watch.guard() if watch else nullcontext():
            if ticket is not None and _evaluated_elsewhere_now(backend, expansion):
                # Restored once it is saved there, not evaluated twice. It waits as if in
                # the queue: counted there, and against queue_timeout.
                entry, template = expansion.entry, expansion.template
                timeout = backend.queue_timeout

                def evaluated():
                    backend.evaluator.wait_for(entry.prefix, template, timeout)

                backend.scheduler.wait_aside(ticket, evaluated)
            if ticket is not None:
                # After that wait: a file saved meanwhile is restored, not waited for.
                ticket.share = _share_seconds(backend, expansion)
                backend.scheduler.acquire(ticket)
            granted = time.monotonic()
            if expansion is None:
                lease = Lease(backend, ticket)
            else:
                # Before the slot is made ready: a restore changes what the slot holds.
                found = expansion.found
                lease = Lease(backend, ticket, expansion.entry, expansion.template, found.variant)
                lease.evaluated_first = body.get("return_progress") is not True
                lease.cache = lease.outcome = _made_ready(backend, ticket, expansion)
            lease.queued, lease.readied = granted - arrived, time.monotonic() - granted
            data = expansion.data if expansion else raw
            if expansion is not None:
                data = _with_model(data, body, backend.model)
            if ticket is not None:
                ticket.pinned = backend.pins() and lease.cache != "server"
                if ticket.pinned:
                    data = _pin(data, body, ticket.slot)
                else:
                    backend.scheduler.dispatch()  # no one shares its slot (_shares)
            return send(data, lease)
    except BaseException:
        if lease is not None:
            lease.end()  # maybe sent: llama-server may still be at work in the slot
        elif ticket is not None and ticket.outcome == GRANTED:
            backend.scheduler.release(ticket, drain=True)
        raise


def _evaluated_elsewhere_now(backend, expansion):
    """Whether the warmup llama-server evaluates the template version of this request
    now, and the request would restore its file once saved: the template's own cache
    (a variant's head is evaluated apart), with no saved file of that version already
    (a warmup forced again evaluates it anew)."""
    if backend.evaluator is None or expansion is None:
        return False
    entry, template = expansion.entry, expansion.template
    if expansion.found.key != entry.prefix:  # no cache to reuse, or a variant's key
        return False
    evaluates = backend.evaluator.evaluates(entry.prefix, template)
    return evaluates and backend.caches.find(entry.prefix, template) is None


def _made_ready(backend, ticket, expansion):
    """A templated request's cache: "slot" (its slot holds it), "restored", "server" (left
    to llama-server's own cache, unpinned) or "cold" (evaluated, or not placed by bioproxy)."""
    entry, template, found = expansion.entry, expansion.template, expansion.found
    if ticket is None or ticket.template is None:
        return "cold"  # not placed by bioproxy, or no warmed cache applies
    # A slot that held the template still does unless another task ran there since.
    if backend.slots.holds(ticket.slot, found.key, template.digest):
        return "server" if not backend.pins() else "slot"
    if found.variant is not None:
        return backend.variants.make_ready(found, entry, template, ticket.slot)
    if backend.caches.unsupported:
        # No slot files: unpinned, llama-server places it and loads its own copy of the
        # template from its RAM cache (--cache-ram) if it kept one; pinned to an empty
        # slot, it would not (b11434 loads for a pinned task only when its slot holds
        # other work: docs/TEMPLATES.md).
        return "server"
    warmth = backend.warmth[entry.prefix]
    # Not a request whose client named its slot: llama-server runs it there, and pinned to
    # a slot it cleared, it loads nothing from its RAM cache.
    left = not backend.pins() and ticket.wanted is None
    if left and backend.ram.take(entry.prefix, template.digest, warmth.tokens):
        # llama-server clears idle slots into its RAM cache, which keeps templates and
        # holds a copy of this one as counted (ram_cache.py): it loads that copy, with
        # the conversation it carries, where a restore would give back the template alone.
        return "server"
    # Unpinned too when llama-server clears idle slots: the restored slot, or the copy of
    # it llama-server keeps in its RAM cache when it clears it, is where it places it. A
    # restore that fails leaves it pinned and cold: it then fills its slot.
    return backend.caches.restore_for_request(entry, warmth, template, ticket.slot)


def _share_seconds(backend, expansion):
    """How long a templated request may wait for a busy slot where a request or a warmup
    of its template version runs (Scheduler._shares), rather than evaluate the template
    again beside it: what an evaluation would take (its last here, else an estimate by
    its tokens), at most half of queue_timeout. 0 when it would not be evaluated: a
    variant's head, or a version saved (a restore takes milliseconds)."""
    if expansion is None or expansion.found.key != expansion.entry.prefix:
        return 0.0
    entry, template = expansion.entry, expansion.template
    if backend.caches.find(entry.prefix, template) is not None:
        return 0.0
    return min(backend.warmth[entry.prefix].evaluation_estimate(), backend.queue_timeout / 2)


def _ticket(slots, body, expansion):
    """The scheduler Ticket for a request, or None when bioproxy cannot place it."""
    if slots.count == 0:
        return None  # llama-server has not answered the warmer yet (it may be down)
    wanted = body.get("id_slot", -1)
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted >= slots.count:
        return None  # llama-server will say what is wrong with it
    # Only a chat whose opening message is templated reuses a warmed cache: the others
    # (templated completions, a template in a later turn) are placed as plain.
    template = expansion.found.key if expansion else None
    digest = expansion.template.digest if template else None
    return Ticket(USER, template, wanted if wanted >= 0 else None, digest=digest)


def check_pinnable(raw, body):
    """BadRequest now, before the request takes a slot, if pinning it would fail later.

    A body that _pin must rebuild fails to be rebuilt when it holds a lone surrogate escape.
    """
    if _rebuilt_to_pin(raw, body):
        injection.dump(body)


def _with_model(data, body, model):
    """A templated body sent to a router's unit names its model, if the client's did not
    (the router needs one: bioproxy chose where it goes, by the template)."""
    if model is None or body.get("model"):
        return data
    return b'{"model":%s,%s' % (injection.dump(model), data.lstrip()[1:])


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
