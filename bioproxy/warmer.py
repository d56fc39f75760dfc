"""Keeping one llama-server's templates warm: a loop of passes, each warming what is due.

A pass re-reads the templates, looks at llama-server's slots (a restart, a new model, slots
busy for nobody), and starts a warmup for each template that needs one: restore its saved
cache, else evaluate it and save it. Warmups run in greenlets of their own, behind every
user request in the scheduler's queue, so a pass never waits for one.
"""

import logging
import time

import gevent
from gevent.event import Event
from gevent.pool import Pool

from . import ram_cache
from .slot_api import IsRouter, SlotsHidden
from .upstream import BackendError
from .warmth import State
from .warmup import Warmups

log = logging.getLogger(__name__)

# Seconds between looks at llama-server's slots while some are busy for nobody. Not less
# than a second and a bit: llama-server notices a closed connection only after a whole
# second in which no request of any client got a result, and each GET /slots is one.
BUSY_SLOTS_POLL = 1.5


class Warmer:
    """The watcher of one llama-server: its passes, and the warmups they start."""

    def __init__(self, backend, catalog, interval, concurrency, piece_chars):
        self.backend = backend
        self.catalog = catalog
        self.interval = interval
        self.warmups = Warmups(backend, catalog, interval, piece_chars)
        self.backend_was_down = False
        self.wake = Event()
        self.greenlet = None
        # A warmup may wait long for a slot: in a pool of its own, a pass never waits.
        self.pool = Pool(concurrency)
        self.warming = set()  # prefixes with a warmup greenlet
        self.probe = None  # the greenlet measuring llama-server's RAM cache (ram_cache.py)

    # The loop.

    def start(self):
        self.greenlet = gevent.spawn(self.run)

    def stop(self):
        """Stop watching and warming: the evaluation under way, if any, is abandoned."""
        if self.greenlet is None or self.greenlet.dead:
            return
        for run in list(self.backend.gate.runs):
            run.cancel()  # closes its connection, so llama-server stops too
        self.greenlet.kill()
        self.pool.kill()
        if self.probe is not None:
            self.probe.kill()
        self.backend.scheduler.forget_foreign()  # no pass will read the slots again
        log.info("warmer stopped")

    def run(self):
        while True:
            try:
                self.check(wait=False)
            except Exception:
                log.exception("warmup pass failed")
            self.wake.wait(self.pause())
            self.wake.clear()

    def pause(self):
        """Seconds until the next pass."""
        if self.backend_was_down:
            # Requests go unscheduled until llama-server answers: look again soon.
            return min(self.interval, 1.0)
        if self.backend.scheduler.foreign:
            # Slots busy for nobody bioproxy knows stay unused until idle: look again
            # soon, but not more often than BUSY_SLOTS_POLL (see there).
            return BUSY_SLOTS_POLL
        return self.interval

    def poke_soon(self):
        """A slot was given back before its answer ended: look at it soon."""
        gevent.spawn_later(BUSY_SLOTS_POLL, self.wake.set)

    def request_warmup(self, prefix):
        """Evaluate a template again at the next pass, which starts now."""
        self.backend.warmth[prefix].mark_stale(forced=True)
        self.wake.set()

    def resume_when_idle(self):
        """The last user is done: a warmup that gave way resumes now, not at the next pass."""
        if any(self.due_now(prefix) for prefix in self.backend.warmth):
            self.wake.set()

    def check(self, wait=True):
        """One pass: re-read the templates, look at llama-server, warm what needs it.

        wait: return only once the warmups it started have ended (the tests' way); the
        watcher's loop does not wait, and skips templates whose warmup is still going.
        """
        backend = self.backend
        self.reload()
        released = backend.scheduler.releases
        try:
            restarted = backend.slots.refresh()
        except IsRouter:
            backend.discover()  # its models become backends of their own
            return
        except SlotsHidden as e:
            # Not a llama-server that is not ready yet: it never shows them.
            if not backend.slots_hidden:
                log.warning(
                    "llama-server hides its slots (started with --no-slots; %s): bioproxy "
                    "cannot see what they hold, so it warms no template and sends requests "
                    "on unscheduled; start llama-server without --no-slots",
                    e,
                )
                backend.left_routing()
            backend.slots_hidden = self.backend_was_down = True
            return
        except BackendError as e:
            if not self.backend_was_down:
                log.warning("llama-server is not ready, warmups wait: %s", e)
                backend.left_routing()
            self.backend_was_down = True
            if e.status == 400:
                backend.load_if_room()  # a router's model it does not run now
            return
        if restarted or self.backend_was_down:
            log.warning("llama-server restarted or changed model: making templates warm again")
            backend.rejoin()
            for prefix, warmth in backend.warmth.items():
                if self.catalog[prefix].template is not None:
                    warmth.mark_restarted()
        self.backend_was_down = backend.slots_hidden = False
        backend.failures = 0
        backend.scheduler.update_foreign(released)  # also serves the queue if slots were added
        now = time.monotonic()
        for prefix, warmth in backend.warmth.items():
            if self.catalog[prefix].template is None or not warmth.due(now):
                continue
            if not backend.serves(prefix):
                continue  # warm on other backends (warm_backends)
            if prefix in self.warming:
                continue
            if len(self.warming) >= self.pool.size and not wait:
                # The watcher never waits for room here: the running warmups may be
                # waiting for a slot that only a later pass can free (one busy with work
                # bioproxy did not start is free once a pass sees it idle). The next pass
                # starts the rest, as soon as one ends (warm_logged). Counted by what is
                # warming, not by the pool: a warmup that just ended leaves the pool only
                # at the hub's next turn, after the pass it woke. (wait, the tests' way,
                # waits for them all anyway.)
                break
            self.warming.add(prefix)
            self.pool.spawn(self.warm_logged, prefix)
        backend.check_joined()
        if not self.warming and self.probe is None and ram_cache.wanted(backend, self.catalog):
            self.probe = gevent.spawn(self.probe_ram_cache)
        if wait:
            self.pool.join()
            if self.probe is not None:
                self.probe.join()

    def probe_ram_cache(self):
        try:
            ram_cache.probe(self.backend, self.catalog)
        except Exception:
            log.exception("looking at llama-server's RAM cache failed")
        finally:
            self.probe = None

    def reload(self):
        """Read the templates again: one whose text is new is stale (on every backend)."""
        self.backend.reload_templates()

    def due_now(self, prefix):
        warmth = self.backend.warmth[prefix]
        stale = warmth.state == State.STALE and prefix not in self.warming
        return stale and self.catalog[prefix].template is not None

    def warm_logged(self, prefix):
        try:
            self.warmups.warm(prefix)
        except Exception:
            log.exception("warming template %s failed", prefix)
        finally:
            self.warming.discard(prefix)
            # A template still due (this one edited while it was warmed, or one a pass
            # left for want of room in the pool): the next pass now, not an interval on.
            if any(self.due_now(other) for other in self.backend.warmth):
                self.wake.set()
            self.backend.check_joined()

    def describe(self):
        """The evaluations under way and the templates waiting for a warmup, for /status."""
        now = time.monotonic()
        runs = self.backend.gate.runs
        running = [
            {"template": run.entry.prefix, "slot": run.slot, "seconds": round(run.seconds, 3)}
            for run in runs
        ]
        busy = {run.entry.prefix for run in runs}
        pending = [
            {
                "template": prefix,
                "state": warmth.state.value,
                "retry_in": round(warmth.retry_at - now, 3) if warmth.retry_at > now else 0,
            }
            for prefix, warmth in self.backend.warmth.items()
            if self.catalog[prefix].template is not None
            and warmth.state in (State.STALE, State.FAILED)
            and prefix not in busy
        ]
        return {
            "running": running,
            "pending": pending,
            "users_in_flight": self.backend.gate.users,
            "recent": list(self.warmups.recent),
        }
