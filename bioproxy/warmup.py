"""One template's warmup in one llama-server: restore its saved cache, else evaluate it.

With a warmup llama-server (warmup_backend_url, evaluator.py), the template is evaluated
and saved there, beside users, and then restored here like any saved cache. Otherwise an
evaluation waits until no user is in flight (with warmup_only_when_idle), and runs behind
every user request in the scheduler's queue; a restore takes milliseconds and goes ahead.
Both take a slot of their own from the scheduler, so no request runs beside them in it.
"""

import logging
import time
from collections import deque

import gevent

from .evaluation import Evaluation, GaveWay, Superseded
from .scheduler import WARMUP, Ticket
from .slot_api import SlotsUnsupported
from .slot_table import UNKNOWN, partial_digest
from .upstream import BackendError

log = logging.getLogger(__name__)

RECENT_WARMUPS = 20  # evaluations /status lists
PARTIAL_WAIT = 2.0  # seconds for llama-server to stop a piece cancelled for a user
# What a warmup's restore came to.
RESTORED, EVALUATE, FAILED = "restored", "evaluate", "failed"
# An evaluation in the warmup llama-server whose template changed meanwhile.
SUPERSEDED = "superseded"


class Warmups:
    """The warmups of one llama-server's templates, and the last ones' outcomes."""

    def __init__(self, backend, catalog, interval, piece_chars):
        self.backend = backend
        self.catalog = catalog
        self.interval = interval  # the first pause after a failure, doubled after each
        self.piece_chars = piece_chars
        self.recent = deque(maxlen=RECENT_WARMUPS)  # evaluations' outcomes, newest last

    def warm(self, prefix):
        """Make a template's cache warm in a slot and saved: restore it, else evaluate it."""
        backend, entry, warmth = self.backend, self.catalog[prefix], self.backend.warmth[prefix]
        elsewhere = None  # the template version the warmup llama-server saved, if any
        if warmth.forced or backend.caches.find(prefix, entry.template) is None:
            elsewhere = self.evaluate_elsewhere(entry, warmth)
            if elsewhere is SUPERSEDED:
                return
            if elsewhere is None:
                # Evaluating here takes seconds and slows every slot: users first. (A
                # restore takes milliseconds and goes ahead.)
                backend.gate.wait_until_idle()
        # Behind every user request in the queue. One that evaluates here waits for a
        # busy slot where a request of its version runs, which leaves it there, as a
        # request does (Scheduler._shares).
        template = entry.template
        evaluates = elsewhere is None and template is not None
        if evaluates and not warmth.forced:
            evaluates = backend.caches.find(prefix, template) is None
        share = warmth.evaluation_estimate() if evaluates else 0.0
        ticket = Ticket(WARMUP, prefix, digest=template and template.digest, share=share)
        slot = backend.scheduler.acquire(ticket)
        try:
            # The wait may have been long: warm the text as it is now, if still usable.
            template = entry.template
            if template is None:
                return
            if ticket.digest != template.digest:  # edited while it waited
                ticket.digest = template.digest  # the version its slot will hold (_shares)
                backend.scheduler.dispatch()
            if elsewhere is not None:
                # Saved there: restored here, even if forced again meanwhile.
                if self.restore(entry, warmth, template, slot) == EVALUATE:
                    self.not_restored(entry, warmth, template, slot, elsewhere)
            elif warmth.forced or self.restore(entry, warmth, template, slot) == EVALUATE:
                self.evaluate(entry, warmth, template, slot)
        finally:
            backend.scheduler.release(ticket)

    def evaluate_elsewhere(self, entry, warmth):
        """Evaluate and save the template in the warmup llama-server: the version saved,
        SUPERSEDED, or None when there is none or it cannot (then it is warmed here)."""
        evaluator = self.backend.evaluator
        if evaluator is None:
            return None
        with evaluator.lock:
            model = self.backend.slots.table.model
            if not evaluator.usable(model):
                return None
            template = entry.template  # read after usable(), which waits for answers
            if template is None:
                return None
            warmth.mark_warming()
            log.info("warming template %s in the warmup llama-server", entry.prefix)
            run = Evaluation(entry, evaluator.SLOT, template, evaluator.prompts, gate=None)
            try:
                with evaluator.evaluating(entry.prefix, template):
                    head = self.backend.prompts.fetch_head(template)
                    with evaluator.held():
                        tokens, evaluated = run.run(head, self.piece_chars, in_one_piece=True)
                    if self.backend.slots.table.model != model:
                        raise BackendError("warmup", "llama-server's model changed meanwhile")
                    caches = self.backend.caches
                    caches.save(entry.prefix, template, run.slot, tokens, api=evaluator.api)
            except Exception as e:
                if not entry.is_current(template):
                    self.superseded(run)
                    return SUPERSEDED
                warmth.mark_stale()  # warmed here now, or by the next pass
                if isinstance(e, SlotsUnsupported):
                    evaluator.refuse(f"it cannot save slots ({e})")
                else:
                    evaluator.pause(f"warming {entry.prefix} there failed ({e})")
                return None
        self.warmed(run, warmth, tokens, evaluated)
        return template

    def not_restored(self, entry, warmth, template, slot, saved):
        """The file the warmup llama-server saved did not restore here (or its proof failed)."""
        backend = self.backend
        if saved is template and backend.caches.find(entry.prefix, template) is None:
            if backend.slots.holds(slot, entry.prefix, template.digest):
                # The proof evaluated the head here in full: save that instead.
                self.evaluate(entry, warmth, template, slot)
                return
            if backend.slots.table.model is not None:
                # Not a restart meanwhile: the two do not share a slot folder.
                backend.evaluator.refuse("a slot it saved did not restore (another folder?)")
        warmth.mark_stale()  # warmed by the next pass

    def restore(self, entry, warmth, template, slot):
        """Restore the saved cache and prove it: RESTORED, EVALUATE (no usable file) or FAILED.

        A restore that failed for another reason than its file (blocked behind another
        request's generation, refused, a 500) leaves the template failed, to be tried
        again after a pause: an evaluation in the same slot would block just the same.
        """
        caches = self.backend.caches
        try:
            if not caches.restore(entry, warmth, template, slot):
                return EVALUATE
            return RESTORED if caches.prove(entry.prefix, template, slot) else EVALUATE
        except SlotsUnsupported:
            return EVALUATE  # this llama-server cannot restore (no --slot-save-path)
        except BackendError as e:
            warmth.mark_failed(time.monotonic(), e, self.interval, time.time())
            return FAILED

    def evaluate(self, entry, warmth, template, slot):
        backend = self.backend
        warmth.mark_warming()
        log.info("warming template %s in slot %d", entry.prefix, slot)
        run = Evaluation(entry, slot, template, backend.prompts, backend.gate)
        partial, warmth.partial = warmth.partial, None
        backend.gate.runs.add(run)  # from here, a user arriving cancels it
        try:
            held = backend.slots.holds(slot, entry.prefix, template.digest)
            after = 0 if held else self.resumable(entry, template, slot, partial)
            head = backend.prompts.fetch_head(template)
            tokens, evaluated = run.run(head, self.piece_chars, in_one_piece=held, after=after)
        except Superseded:
            self.superseded(run)
            return
        except GaveWay:
            self.gave_way(run, warmth)
            return
        except Exception as e:
            # Whatever failed, an edit or a user that came meanwhile decides the outcome.
            if not entry.is_current(template):
                self.superseded(run)
            elif run.cancelled:
                self.gave_way(run, warmth)
            else:
                self.failed(run, warmth, e)
            return
        finally:
            backend.gate.runs.discard(run)
        try:
            backend.caches.save(entry.prefix, template, slot, tokens)
        except BackendError as e:
            if e.status is not None:
                # llama-server answered, so it did not restart: the slot still holds the
                # evaluation, and the next try finds it there.
                backend.slots.mark(slot, entry.prefix, template.digest, ran=True)
            self.failed(run, warmth, e)
            return
        # After the save: what the slot last ran is then what bioproxy saw last.
        backend.slots.mark(slot, entry.prefix, template.digest, ran=True)
        self.warmed(run, warmth, tokens, evaluated)

    def resumable(self, entry, template, slot, partial):
        """Characters of the head this slot still holds from a warmup that gave way (0:
        none), as GET /slots shows it: no other task ran there since."""
        if partial is None or partial[:2] != (slot, template.digest):
            return 0
        done = partial[2]
        if not self.backend.slots.holds(slot, entry.prefix, partial_digest(template.digest, done)):
            return 0
        log.info(
            "warming template %s goes on after %d characters in slot %d", entry.prefix, done, slot
        )
        return done

    def keep_partial(self, run, warmth):
        """After a warmup gave way: mark what its slot holds, for the next to go on from.

        Once llama-server has stopped the piece under way (it does between batches), the
        slot's last task is the warmup's: resumable() then checks that it still is. Until
        then the slot stays the warmup's, so no request lands there meanwhile. Not when
        requests go unpinned: llama-server may place one there meanwhile, whose task would
        be taken for the warmup's (and it clears idle slots then anyway).
        """
        if not run.done or not self.backend.pins():
            return
        slots, deadline = self.backend.slots, time.monotonic() + PARTIAL_WAIT
        key, digest = run.entry.prefix, partial_digest(run.template.digest, run.done)
        try:
            while slots.fetch_states().get(run.slot, UNKNOWN)[1] and time.monotonic() < deadline:
                gevent.sleep(0.05)  # still processing the piece it was cancelled in
            slots.mark(run.slot, key, digest, ran=True)
        except BackendError:
            return
        if slots.table.holding(run.slot) == key:
            warmth.partial = (run.slot, run.template.digest, run.done)

    def superseded(self, run):
        # The pass that read the edit made the template stale, and that stands.
        self.remember(run, "superseded")
        log.info("warming template %s stopped: its file changed", run.entry.prefix)

    def gave_way(self, run, warmth):
        self.keep_partial(run, warmth)
        warmth.mark_stale()  # again when bioproxy is idle
        self.remember(run, "cancelled")
        self.backend.metrics.warmup_cancellations.labels(run.entry.prefix).inc()
        log.info("warming template %s gave way to a user request", run.entry.prefix)

    def failed(self, run, warmth, error):
        prefix = run.entry.prefix
        warmth.mark_failed(time.monotonic(), error, self.interval, time.time())
        self.remember(run, "failed")
        self.backend.metrics.warmups.labels(prefix, "failed").inc()
        log.warning("warming template %s failed: %s", prefix, error)

    def warmed(self, run, warmth, tokens, evaluated):
        """Evaluated, and saved unless llama-server cannot save: the template is warm."""
        prefix, seconds, metrics = run.entry.prefix, run.seconds, self.backend.metrics
        last = {
            "at": time.time(),
            "outcome": "ok",
            "seconds": round(seconds, 3),
            "tokens_evaluated": evaluated,
        }
        if run.resumed is not None:
            last["tokens_resumed"] = run.resumed  # reused from the warmup that gave way
        else:
            warmth.evaluation_seconds = seconds  # what routing weighs an evaluation at
        # Saved under its own digest, so usable if the file goes back to it; but if the
        # file changed meanwhile, the template is not warm: the new text is warmed next.
        warmth.mark_warm(tokens, last, current=run.entry.is_current(run.template))
        self.remember(run, "ok")
        metrics.warmups.labels(prefix, "ok").inc()
        metrics.warmup_seconds.labels(prefix).observe(seconds)
        log.info("template %s warmed: %d tokens in %.2f s", prefix, tokens, seconds)

    def remember(self, run, outcome):
        """Keep the last evaluations' outcomes for /status."""
        self.recent.append(
            {
                "template": run.entry.prefix,
                "at": time.time(),
                "outcome": outcome,
                "seconds": round(run.seconds, 3),
            }
        )
