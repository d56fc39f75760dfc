"""A slotted request's hold on its slot, from the grant to the end of its answer."""

import logging

from .slot_table import named

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

    def __init__(self, backend, ticket=None, entry=None, template=None, variant=None, cache=None):
        self.backend = backend
        self.ticket = ticket  # granted, or None: llama-server places the request itself
        self.entry = entry  # the catalog entry of a templated request
        self.template = template  # the version it was expanded with
        self.variant = variant  # the template's variant it uses (see variants.py), or None
        self.cache = cache  # expected: "slot", "restored" or "cold" (X-Bioproxy-Cache)
        self.outcome = cache  # as measured by the answer's timings, once it has ended
        # Seconds it waited for its slot (bioproxy's queue), then for the slot to be made
        # ready (a restore, a variant's head): the access log's queued= and ready=.
        self.queued = self.readied = 0.0
        # Whether its answer's first byte comes only once the prompt is evaluated (not
        # with return_progress, whose first events come during the evaluation).
        self.evaluated_first = True
        self.ended = False

    @property
    def pinned(self):
        """Sent with id_slot: it ran in the slot bioproxy chose."""
        return self.ticket is not None and self.ticket.pinned

    @property
    def slot(self):
        return self.ticket.slot if self.ticket else None

    def end(self, body=None):
        """After the answer (body None: there was none): account for it, give the slot back."""
        if self.ended:
            return
        self.ended = True
        complete = body is not None and body.complete
        # Cut after its first byte (its client left, say): the prompt was evaluated.
        started = body is not None and body.status == 200 and bool(body.first)
        try:
            if self.template is not None and body is not None:  # an answer came
                timings = body.timings() or {}
                self._account(timings)
                if complete and body.status == 200:
                    self._left_in_ram(timings)
        finally:
            if self.ticket is not None:
                succeeded = complete and body.status == 200
                self._release(succeeded, started and self.evaluated_first, drain=not complete)

    def _account(self, timings):
        """The request counted by what its answer shows: the tokens llama-server reused and
        evaluated, and whether that found the template warm as expected."""
        prefix, metrics, variant = self.entry.prefix, self.backend.metrics, self.variant
        warmth = self.backend.warmth[prefix]
        tokens = variant.tokens if variant else warmth.tokens  # of the head it should reuse
        reused, evaluated = timings.get("cache_n"), timings.get("prompt_n")
        if all(is_count(n) for n in (reused, evaluated)):
            metrics.tokens_reused.labels(prefix).inc(reused)
            metrics.tokens_evaluated.labels(prefix).inc(evaluated)
            warm = found_warm(reused, tokens)
            if self.cache == "server":
                self.outcome = "server" if warm else "cold"  # llama-server's own cache
                if not warm and self.backend.slots.table.cleared:
                    self._not_in_ram(reused, tokens)
            elif self.cache == "cold":
                # Found all the same, in llama-server's own cache: b11434 loads a RAM copy
                # for a pinned request too, when its slot held other work (not when it
                # was empty). Known only with the head's length known. (A variant's cold
                # request reuses the head bioproxy evaluated for it first: still cold.)
                found = tokens and warm and variant is None and self._placed_for_template()
                self.outcome = "server" if found else "cold"
            elif not warm:
                self._missed(warmth, reused, tokens)
        metrics.template_requests.labels(prefix, self.outcome).inc()
        warmth.count_request(self.outcome)
        if variant is not None:
            variant.count_request(self.outcome)
            self.backend.variants.used(variant)

    def _not_in_ram(self, reused, tokens):
        """Left to llama-server's RAM cache, it found the template missing there: the
        requests after it are restored first (ram_cache.py)."""
        if self.backend.ram.missed():
            log.warning(
                "%s: llama-server's RAM cache did not hold it (reused %d of its %s tokens): "
                "templated requests on %s are restored from their saved files first from "
                "now on (a larger --cache-ram would keep them)",
                self.entry.prefix,
                reused,
                tokens,
                self.backend.name,
            )

    def _left_in_ram(self, timings):
        """Answered in full, its slot holds the template and this conversation: where
        llama-server clears idle slots, it copies that slot into its RAM cache at its next
        task's start (ram_cache.py). Not a variant's head, nor a request not placed for
        the template's cache (those hold prompts of their own)."""
        backend = self.backend
        if self.variant is not None or not self._placed_for_template():
            return
        if not backend.slots.table.cleared:
            return
        counts = [timings.get("cache_n"), timings.get("prompt_n"), timings.get("predicted_n", 0)]
        if all(is_count(n) for n in counts):
            backend.ram.left(self.entry.prefix, self.template.digest, sum(counts))

    def _placed_for_template(self):
        """Placed by bioproxy for the template's cache (not a templated completion, nor a
        chat whose template came in a later turn: those reuse prompts of their own)."""
        return self.ticket is not None and self.ticket.template is not None

    def _missed(self, warmth, reused, tokens):
        """Expected warm, measured cold: counted as a miss, logged once per kind."""
        prefix = self.entry.prefix
        self.outcome = "cold"
        self.backend.metrics.template_misses.labels(prefix, self.cache).inc()
        missed = self.variant.missed if self.variant else warmth.missed
        if self.cache not in missed:
            missed.add(self.cache)
            log.warning(
                "%s: expected warm (%s) in slot %s, but llama-server reused only %d of its "
                "%s tokens (logged once)",
                named(self.key),
                self.cache,
                self.slot,
                reused,
                tokens,
            )
        if self.cache == "restored":
            caches = self.backend.caches
            caches.restore_did_not_hold(self.entry, self.template, reused, tokens, self.variant)

    @property
    def key(self):
        """What the slot holds once answered: the template's prefix, or its variant's key."""
        return self.variant.key if self.variant else self.entry.prefix

    def _release(self, succeeded, evaluated, drain):
        """The slot holds the template if the request succeeded with the current version,
        or will once llama-server stops there if its answer was cut after the prompt was
        evaluated; any other request (plain, failed, cut before) leaves it holding nothing
        bioproxy can use. drain: the answer ended early, so the slot waits until
        llama-server is idle."""
        backend, slot = self.backend, self.ticket.slot
        try:
            # Only a chat request leaves the template's head there (a templated completion
            # holds its own prompt).
            chat = self.ticket.template is not None
            # A version before an edit is recorded too, and holds nothing while the edit
            # stands (SlotTable.holding).
            usable = chat and self.pinned
            if succeeded and usable:
                backend.slots.mark(slot, self.key, self.template.digest)
            elif evaluated and usable:
                backend.slots.settle(slot, self.key, self.template.digest)
            else:
                backend.slots.forget(slot)
        except Exception:
            # Runs as a response's close callback: one that raises would skip the ones
            # after it (the request's own bookkeeping). The slot is then not known to hold it.
            log.exception("bookkeeping of slot %d failed", slot)
            backend.slots.forget(slot)
        finally:
            backend.scheduler.release(self.ticket, drain)


def is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def found_warm(reused, tokens):
    """Whether an answer that reused this many tokens found a template of tokens warm."""
    return not tokens or reused >= tokens - min(MISS_SLACK, tokens // 2)
