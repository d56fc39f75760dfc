"""A slotted request's hold on its slot, from the grant to the end of its answer."""

import logging

log = logging.getLogger(__name__)

# A request found its template warm when llama-server reused the template's tokens but
# these few: where the template's text meets the user's, the tokens may be cut otherwise.
MISS_SLACK = 16


class Lease:
    """What one slotted request holds: its slot (if bioproxy placed it), its template.

    Ended exactly once (end()), by its answer's body when that closes, or by the request
    when it fails before an answer. The bookkeeping comes before the slot is handed on: it
    reads /slots, which must not yet show the next task.
    """

    def __init__(self, backend, ticket=None, entry=None, template=None, cache=None):
        self.backend = backend
        self.ticket = ticket  # granted, or None: llama-server places the request itself
        self.entry = entry  # the catalog entry of a templated request
        self.template = template  # the version it was expanded with
        self.cache = cache  # "slot", "restored" or "cold"
        self.ended = False

    @property
    def slot(self):
        return self.ticket.slot if self.ticket else None

    def end(self, body=None):
        """After the answer (body None: there was none): account for it, give the slot back."""
        if self.ended:
            return
        self.ended = True
        complete = body is not None and body.complete
        try:
            if self.template is not None and body is not None:
                self._account(body.timings() or {})
        finally:
            if self.ticket is not None:
                self._release(complete and body.status == 200, drain=not complete)

    def _account(self, timings):
        """The tokens llama-server reused and evaluated; a restore the answer disproves."""
        reused, evaluated = timings.get("cache_n"), timings.get("prompt_n")
        if not all(_count(n) for n in (reused, evaluated)):
            return
        prefix, metrics = self.entry.prefix, self.backend.metrics
        metrics.tokens_reused.labels(prefix).inc(reused)
        metrics.tokens_evaluated.labels(prefix).inc(evaluated)
        tokens = self.backend.warmth[prefix].tokens
        if self.cache == "restored" and not _found_warm(reused, tokens):
            self.backend.caches.restore_did_not_hold(self.entry, self.template, reused)

    def _release(self, succeeded, drain):
        """The slot holds the template if the request succeeded with the current version;
        any other request (plain, failed, cut off) leaves it holding nothing bioproxy can
        use. drain: the answer ended early, so the slot waits until llama-server is idle."""
        backend, slot = self.backend, self.ticket.slot
        try:
            if succeeded and self.template is not None and self.entry.is_current(self.template):
                backend.slots.mark(slot, self.entry.prefix, self.template.digest)
            else:
                backend.slots.forget(slot)
        except Exception:
            # Runs as a response's close callback: one that raises would skip the ones
            # after it (the request's own bookkeeping). The slot is then not known to hold it.
            log.exception("bookkeeping of slot %d failed", slot)
            backend.slots.forget(slot)
        finally:
            backend.scheduler.release(self.ticket, drain)


def _count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _found_warm(reused, tokens):
    """Whether an answer that reused this many tokens found a template of tokens warm."""
    return not tokens or reused >= tokens - min(MISS_SLACK, tokens // 2)
