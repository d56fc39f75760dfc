"""What bioproxy knows of llama-server's RAM cache (--cache-ram) where it clears idle slots.

With a unified KV cache (llama-server's default without -np), every task that starts
copies each idle slot into the RAM cache and empties it (b11434, --cache-idle-slots). A
request that llama-server places itself (unpinned) is loaded from that cache: the entry
that shares the longest start with its prompt, if the prompt reuses at least a quarter
of the entry. The entry is moved out of the cache into the slot, and comes back, longer
by the request's answer, when the next task starts. So a template's copy there carries
the conversation that used it: a later turn of that conversation finds all of it,
where a restore from the template's file gives back the template alone.

bioproxy sees none of this: llama-server does not say what its RAM cache holds, nor how
large it is. What it knows comes from two measurements: once per llama-server start,
a probe (probe() below, run by warmer.py) tells whether the cache keeps a template at
all (a --cache-ram too small for one keeps none); and each request left to the cache
says in its timings whether its template was found there. Between the two, bioproxy
counts the copies that each templated request leaves behind and each one left to the
cache takes away. A request is left to the cache only where the count says a copy is
there, else its template is restored from its file first; the first request that
finds it missing sets every later one back to restoring, until llama-server restarts.

Not counted, so found only by a miss: copies evicted past --cache-ram, and a copy passed
over for another. llama-server takes a copy only if it is better than the best before
it in both the share of itself reused and the share of the prompt (in the cache's
order), so a short plain conversation's copy, most of which a request reuses (the chat
template's opening), can hide a template's copy that carries a long answer.
"""

import logging
import time
from collections import deque

from .lease import found_warm, is_count
from .scheduler import WARMUP, Ticket
from .upstream import BackendError
from .warmth import State

log = logging.getLogger(__name__)

# llama-server skips an entry the request would reuse less than a quarter of (b11434,
# server_prompt_cache::load): a copy counts as found only above this share.
REUSED_SHARE = 0.3

# The copies of one template counted at most: llama-server evicts the oldest first, and
# where requests are restored first their copies are never taken.
COPIES_COUNTED = 32
# Seconds before a probe that failed (llama-server did not answer it) is tried again,
# doubled after each failure in a row, up to PROBE_RETRY_MAX.
PROBE_RETRY = 60.0
PROBE_RETRY_MAX = 3600.0

# What /status says of it, by RamCache.keeps.
NOTES = {
    None: "whether its RAM cache keeps templates is not measured yet, so each templated "
    "request is restored from its saved file first",
    True: "its RAM cache keeps templates (measured): a templated request whose template it "
    "holds a copy of is left to it, with the conversation that copy carries; the others "
    "are restored from their saved files first",
    False: "its RAM cache did not keep a template (measured; a larger --cache-ram would), "
    "so each templated request is restored from its saved file first",
}


class RamCache:
    """One llama-server's RAM cache, as far as bioproxy has measured and counted it."""

    def __init__(self):
        # None: not measured since llama-server started; True: a template came back from
        # it; False: a template was found missing there.
        self.keeps = None
        self.copies = {}  # (key, digest) -> tokens of each copy of that head left there
        self.probe_at = 0.0  # no probe before this time.monotonic() (one failed)
        self.failures = 0  # probes in a row that failed
        # Counts the restarts: a probe that spans one measured the server before it.
        self.generation = 0

    def reset(self):
        """llama-server restarted: an empty cache, maybe of another size."""
        self.keeps = None
        self.copies.clear()
        self.probe_at = 0.0
        self.failures = 0
        self.generation += 1

    def probe_failed(self):
        """No probe again before a pause that doubles with each failure in a row."""
        pause = min(PROBE_RETRY * 2**self.failures, PROBE_RETRY_MAX)
        self.failures += 1
        self.probe_at = time.monotonic() + pause

    def left(self, key, digest, tokens):
        """A request (or the probe) ended with the head (key, digest) in a slot, tokens in
        all: llama-server copies that slot into its RAM cache at its next task's start."""
        self.copies.setdefault((key, digest), deque(maxlen=COPIES_COUNTED)).append(tokens)

    def holds(self, key, digest, head_tokens):
        """The copy of that head llama-server would load for a new question (tokens), or
        None: not measured to keep templates, or no copy counted that it would reuse."""
        copies = self.copies.get((key, digest))
        if not self.keeps or not copies or not head_tokens:
            return None
        shortest = min(copies)  # the one reused the most, for a new question
        return shortest if head_tokens >= REUSED_SHARE * shortest else None

    def take(self, key, digest, head_tokens):
        """Whether to leave a request of that head to the RAM cache (holds()); if so, its
        copy is taken: llama-server moves it into the request's slot."""
        copy = self.holds(key, digest, head_tokens)
        if copy is None:
            return False
        self.copies[(key, digest)].remove(copy)
        return True

    def measured(self, keeps):
        self.keeps = keeps
        self.failures = 0
        if not keeps:
            self.copies.clear()

    def missed(self):
        """A request left to llama-server found its template missing: if it was left to
        this cache (measured to keep templates), restore first from now on. Whether it
        was (to log it once)."""
        if self.keeps is not True:
            return False
        self.measured(False)
        return True


def probe(backend, catalog):
    """Measure once whether llama-server's RAM cache keeps a template (RamCache.keeps).

    The largest warm template with a saved file is restored into a slot; a one-token
    prompt follows there (which copies the template into the RAM cache first), then the
    template's head: its timings say whether it came back from that cache. Users first:
    it waits behind them in the queue (and until none is in flight, where warmups do),
    since where the cache cannot keep it the head is evaluated (once).
    """
    backend.gate.wait_until_idle()
    warm = [entry for entry in catalog if _probeable(backend, entry)]
    if not warm or backend.ram.keeps is not None:
        return
    # The largest: where its KV cache fits in the RAM cache, the others' do too (a
    # --cache-ram of 16 MiB kept the bundled model's 257-token template, not its 911).
    entry = max(warm, key=lambda e: backend.warmth[e.prefix].tokens)
    template, warmth, ram = entry.template, backend.warmth[entry.prefix], backend.ram
    generation = ram.generation
    ticket = Ticket(WARMUP, entry.prefix, digest=template.digest)
    slot = backend.scheduler.acquire(ticket)
    try:
        if not backend.caches.restore(entry, warmth, template, slot, mark=False):
            return
        head = backend.prompts.fetch_head(template)
        # Both pinned to the probe's slot, where users' requests do not wait behind them.
        # Pinned to a slot holding other work, b11434 copies that work into its RAM
        # cache and loads the best copy it holds for the prompt, as for an unpinned one.
        backend.prompts.complete(slot, " ")
        answer = backend.prompts.complete(slot, head)
        timings = answer.get("timings") if isinstance(answer, dict) else None
        reused, evaluated = _counts(timings)
    except BackendError as e:
        log.warning("could not look at llama-server's RAM cache on %s: %s", backend.name, e)
        ram.probe_failed()
        return
    finally:
        backend.slots.forget(slot)  # llama-server clears it at its next task's start
        backend.scheduler.release(ticket)
    if ram.generation != generation:
        return  # llama-server restarted meanwhile: measured again once warm
    keeps = found_warm(reused, warmth.tokens)
    ram.measured(keeps)
    if keeps:
        ram.left(entry.prefix, template.digest, reused + evaluated)  # the head's slot
    (log.info if keeps else log.warning)(
        "llama-server on %s clears idle slots; its RAM cache %s %s (reused %d of %s "
        "tokens): templated requests %s",
        backend.name,
        "keeps" if keeps else "did not keep",
        entry.prefix,
        reused,
        warmth.tokens,
        "are left to it where it holds their template" if keeps else "restore first",
    )


def _counts(timings):
    """(cache_n, prompt_n plus predicted_n) of a completion's timings; BackendError if
    they are not there."""
    timings = timings if isinstance(timings, dict) else {}
    reused, prompt = timings.get("cache_n"), timings.get("prompt_n")
    predicted = timings.get("predicted_n", 0)
    if not all(is_count(n) for n in (reused, prompt, predicted)):
        raise BackendError("POST /completion", f"the answer's timings are not counts: {timings}")
    return reused, prompt + predicted


def wanted(backend, catalog):
    """Whether to probe now: llama-server clears idle slots and saves them, its RAM cache
    is not measured since it started, and a template is warm with a saved file."""
    if backend.ram.keeps is not None or not backend.slots.table.cleared:
        return False
    if time.monotonic() < backend.ram.probe_at:
        return False
    if backend.caches.unsupported:
        return False
    return any(_probeable(backend, entry) for entry in catalog)


def _probeable(backend, entry):
    warmth = backend.warmth.get(entry.prefix)
    if entry.template is None or warmth is None or warmth.state != State.WARM:
        return False
    return bool(warmth.tokens) and backend.caches.find(entry.prefix, entry.template) is not None
