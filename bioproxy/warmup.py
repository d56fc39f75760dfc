"""Keeping templates warm: watching their files, warming, saving and restoring their caches."""

import json
import logging
import time
from collections import deque

import gevent
from gevent.event import Event
from gevent.pool import Pool

from . import config, templates
from .registry import Registry, filename
from .scheduler import WARMUP, Scheduler, Ticket
from .slots import Slots
from .upstream import BackendError, iter_body

log = logging.getLogger(__name__)

# Stands in for the user's message when asking llama-server how it renders a template.
SENTINEL = "\u2063bioproxy-message\u2063"
RECENT_WARMUPS = 20  # evaluations /status lists
MAX_PAUSE = 600  # seconds: the longest pause before a failed template is tried again
# A restore proven: of the head completed again in its slot, llama-server evaluated at most
# this many tokens (it always evaluates the last one again).
RESTORE_SLACK = 4
# Seconds between looks at llama-server's slots while some are busy for nobody. Not less
# than a second and a bit: llama-server notices a closed connection only after a whole
# second in which no request of any client got a result, and each GET /slots is one.
BUSY_SLOTS_POLL = 1.5


class Entry:
    """One configured prefix: its template as last read, and the state of its cache."""

    def __init__(self, prefix, path):
        self.prefix = prefix
        self.path = path
        self.template = None  # the current Template, None while broken
        self.error = None  # why it is broken
        self.state = "pending"  # pending, warming, warm, stale, failed or broken
        self.tokens = None  # tokens of the warmed prefix
        self.last_warmup = None
        self.forced = False  # evaluate again even though a saved file exists
        self.failures = 0  # failed evaluations in a row
        self.requests = {"slot": 0, "restored": 0, "cold": 0}  # templated requests by cache
        self.retry_at = 0.0  # no new try before this time.monotonic()

    def describe(self, registry, model):
        digest = self.template.digest if self.template else None
        saved = registry.find(self.prefix, digest, model)
        return {
            "prefix": self.prefix,
            "file": self.path,
            "state": self.state,
            "error": self.error,
            "tokens": self.tokens,
            "digest": digest,
            "saved_file": saved["file"] if saved else None,
            "last_warmup": self.last_warmup,
            "requests": dict(self.requests),
        }


class Evaluation:
    """A template being evaluated into a slot, piece by piece; a user request cancels it."""

    def __init__(self, entry, slot, template):
        self.entry = entry
        self.slot = slot
        self.template = template  # the version evaluated: the file may change meanwhile
        self.response = None  # the upstream response of the piece under way
        self.cancelled = False
        self.started = time.monotonic()

    def cancel(self):
        self.cancelled = True
        if self.response is not None:
            # shutdown(), not close(): the warmer's greenlet is reading from it, and gets
            # the end of the stream; closing under a reader raises in the caller.
            self.response.raw.shutdown()


class Warmer:
    """The templates, their saved caches and the slots that hold them."""

    def __init__(self, settings, base_dir, upstream, metrics):
        self.upstream = upstream
        self.metrics = metrics
        self.base_dir = base_dir
        self.root = config.resolve_path(settings.template_root, base_dir)
        self.max_bytes = settings.max_template_bytes
        self.interval = settings.warmup_check_interval
        self.warmup_timeout = settings.upstream_timeout
        self.entries = {p: Entry(p, path) for p, path in settings.prefixes.items()}
        self.slots = Slots(upstream, settings.slot_timeout)
        self.scheduler = Scheduler(
            self.slots, settings.queue_max_length, settings.queue_timeout, metrics
        )
        self.only_when_idle = settings.warmup_only_when_idle
        self.concurrency = settings.warmup_concurrency
        self.piece_chars = settings.warmup_piece_chars
        slot_folder = settings.slot_save_path
        self.registry = Registry(
            config.resolve_path(settings.state_dir, base_dir),
            config.resolve_path(slot_folder, base_dir) if slot_folder else None,
        )
        self.backend_was_down = False
        self.users = 0  # user requests in flight
        self.idle = Event()  # set while there are none
        self.idle.set()
        self.evaluations = set()  # Evaluations under way
        self.recent = deque(maxlen=RECENT_WARMUPS)  # their outcomes, newest last
        self.wake = Event()
        self.greenlet = None
        # Warmups run in their own greenlets, so that a pass (reloading templates, reading
        # llama-server's slots) never waits for one: a warmup may wait long for a slot.
        self.pool = Pool(self.concurrency)
        self.warming = set()  # prefixes with a warmup greenlet
        for prefix in list(self.registry.entries):
            if prefix not in self.entries:
                self.registry.forget(prefix)  # a template no longer configured
        self.reload()

    # The watcher: a loop of passes, each catching its own errors.

    def start(self):
        self.greenlet = gevent.spawn(self.run)

    def stop(self):
        """Stop watching and warming: the evaluation under way, if any, is abandoned."""
        if self.greenlet is None or self.greenlet.dead:
            return
        for evaluation in list(self.evaluations):
            evaluation.cancel()  # closes its connection, so llama-server stops too
        self.greenlet.kill()
        self.pool.kill()
        # No pass will read the slots again: what llama-server was busy with is not known.
        self.scheduler.foreign.clear()
        self.scheduler.dispatch()
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
        if self.scheduler.foreign:
            # Slots busy for nobody bioproxy knows stay unused until idle: look again
            # soon, but not more often than BUSY_SLOTS_POLL (see there).
            return BUSY_SLOTS_POLL
        return self.interval

    def drained(self):
        """A request gave its slot back before its answer ended: look at the slot soon."""
        gevent.spawn_later(BUSY_SLOTS_POLL, self.wake.set)

    def request_warmup(self, prefix):
        """Evaluate a template again at the next pass, which starts now."""
        entry = self.entries[prefix]
        entry.state, entry.forced = "stale", True
        self.wake.set()

    def check(self, wait=True):
        """One pass: re-read the templates, look at llama-server, warm what needs it.

        wait: return only once the warmups it started have ended (the tests' way); the
        watcher's loop does not wait, and skips templates whose warmup is still going.
        """
        self.reload()
        released = self.scheduler.releases
        try:
            restarted = self.slots.refresh()
        except BackendError as e:
            if not self.backend_was_down:
                log.warning("llama-server is not ready, warmups wait: %s", e)
            self.backend_was_down = True
            return
        if restarted or self.backend_was_down:
            log.warning("llama-server restarted or changed model: making templates warm again")
            for entry in self.entries.values():
                # A failed one keeps its pause: a warmup that crashed llama-server must
                # not crash it again as soon as it is back.
                if entry.template is not None and entry.state != "failed":
                    entry.state = "stale"
        self.backend_was_down = False
        self.scheduler.update_foreign(released)  # also serves the queue if slots were added
        for entry in self.due():
            if entry.prefix in self.warming:
                continue
            if self.pool.full() and not wait:
                # The watcher never waits for room here: the running warmups may be
                # waiting for a slot that only a later pass can free (one busy with work
                # bioproxy did not start is free once a pass sees it idle). The next pass
                # starts the rest. (wait, the tests' way, waits for them all anyway.)
                break
            self.warming.add(entry.prefix)
            self.pool.spawn(self.warm_logged, entry)
        if wait:
            self.pool.join()

    def describe_warmups(self):
        """The evaluations under way and the templates waiting for a warmup."""
        now = time.monotonic()
        running = [
            {
                "template": run.entry.prefix,
                "slot": run.slot,
                "seconds": round(now - run.started, 3),
            }
            for run in self.evaluations
        ]
        busy = {run.entry.prefix for run in self.evaluations}
        pending = [
            {"template": e.prefix, "state": e.state, "retry_in": _remaining(e.retry_at, now)}
            for e in self.entries.values()
            if e.template is not None and e.state in ("stale", "failed") and e.prefix not in busy
        ]
        return {
            "running": running,
            "pending": pending,
            "users_in_flight": self.users,
            "recent": list(self.recent),
        }

    def due(self):
        """The templates that need a warmup now."""
        now = time.monotonic()
        return [
            entry
            for entry in self.entries.values()
            if entry.template is not None
            and entry.state in ("stale", "failed")
            and (entry.state != "failed" or now >= entry.retry_at)
        ]

    def reload(self):
        """Read every template again; one whose content changed becomes stale."""
        for entry in self.entries.values():
            try:
                template = templates.load(
                    entry.prefix, entry.path, self.base_dir, self.root, self.max_bytes
                )
            except templates.TemplateError as e:
                if entry.error != str(e):
                    log.error("template %s is broken: %s", entry.prefix, e)
                entry.template, entry.error, entry.state = None, str(e), "broken"
                self.metrics.template_broken.labels(entry.prefix).set(1)
                continue
            if entry.template is None or entry.template.digest != template.digest:
                change = "added" if entry.state == "pending" else "changed"
                log.info("template %s %s: %s", entry.prefix, change, entry.path)
                entry.template, entry.error, entry.state = template, None, "stale"
                self.metrics.template_broken.labels(entry.prefix).set(0)

    # Warming, saving and restoring.

    def warm_logged(self, entry):
        try:
            self.warm(entry)
        except Exception:
            log.exception("warming template %s failed", entry.prefix)
        finally:
            self.warming.discard(entry.prefix)
            if entry.state == "stale":
                self.wake.set()  # edited while it was warmed: the new text now

    def current(self, entry, template):
        """Whether template is still the entry's text: a pass may have read an edit since."""
        return entry.template is not None and entry.template.digest == template.digest

    def warm(self, entry):
        """Make a template's cache warm in a slot and saved: restore it, else evaluate it."""
        template = entry.template
        saved = self.registry.find(entry.prefix, template.digest, self.slots.model)
        if (entry.forced or saved is None) and self.only_when_idle:
            # Evaluating takes seconds and slows every slot: users first. (A restore
            # takes milliseconds and goes ahead.)
            self.idle.wait()
        # Behind every user request in the queue.
        ticket = Ticket(WARMUP, entry.prefix)
        slot = self.scheduler.acquire(ticket)
        try:
            # The wait may have been long: warm the text as it is now, if still usable.
            template = entry.template
            if template is None:
                return
            if entry.forced or self.warm_from_file(entry, template, slot) == "evaluate":
                self.evaluate(entry, template, slot)
        finally:
            self.scheduler.release(ticket)

    def warm_from_file(self, entry, template, slot):
        """Restore the saved cache: "restored", "evaluate" (no usable file), or "failed".

        A restore that failed for another reason than its file (blocked behind another
        request's generation, refused, a 500) leaves the template failed, to be tried
        again after a pause: an evaluation in the same slot would block just the same.
        """
        try:
            if not self.load_saved(entry, template, slot):
                return "evaluate"
            return self.prove(entry, template, slot)
        except BackendError as e:
            if e.status == 501:
                return "evaluate"  # this llama-server cannot restore (no --slot-save-path)
            self.retry_later(entry, e)
            return "failed"

    def prove(self, entry, template, slot):
        """Complete the head once in the slot just restored: "restored" if that reused it.

        A restore is not a task: a slot only restored shows in GET /slots just as a new
        server's empty slot does, so a restart would go unnoticed and the next request be
        sent to an empty slot as warm. The completion leaves a task id there, which a
        restart takes away, and its timings show whether the restore held (the head
        reused, its last token evaluated again). "evaluate" when it did not: the file is
        forgotten, and the head, now evaluated in the slot, saved again.
        """
        body = {
            "prompt": self.rendered_head(template),
            "n_predict": 0,
            "id_slot": slot,
            "cache_prompt": True,
        }
        try:
            answer = self.upstream.call("POST", "/completion", body, self.warmup_timeout)
        except BackendError:
            self.slots.forget(slot)  # what it holds is not known
            raise
        self.slots.mark(slot, entry.prefix, template.digest, ran=True)
        evaluated = (answer.get("timings") or {}).get("prompt_n")
        if isinstance(evaluated, int) and evaluated <= RESTORE_SLACK:
            return "restored"
        log.warning(
            "template %s was restored into slot %d, yet llama-server evaluated %s of its "
            "tokens again: saving it again",
            entry.prefix,
            slot,
            evaluated,
        )
        saved = self.registry.find(entry.prefix, template.digest, self.slots.model)
        if saved is not None:
            self.registry.forget(entry.prefix, saved["file"])
        return "evaluate"

    def retry_later(self, entry, error):
        """The template is not warm: try again after a pause that doubles with each failure."""
        entry.failures += 1
        entry.retry_at = time.monotonic() + min(self.interval * 2**entry.failures, MAX_PAUSE)
        entry.state = "failed"
        entry.last_warmup = {"at": time.time(), "outcome": "failed", "error": str(error)}

    # Users first: the proxy reports every request, and a warmup gives way to them.

    def user_started(self):
        self.users += 1
        self.idle.clear()
        self.cancel_warmup()

    def user_finished(self):
        self.users -= 1
        if self.users == 0:
            self.idle.set()
            if any(
                e.state == "stale" and e.prefix not in self.warming for e in self.entries.values()
            ):
                self.wake.set()  # a warmup that gave way resumes now, not at the next pass

    def cancel_warmup(self):
        """Shut the running evaluations' connections down, so llama-server stops them."""
        if self.only_when_idle:
            for evaluation in self.evaluations:
                evaluation.cancel()

    def evaluate(self, entry, template, slot):
        entry.state = "warming"
        log.info("warming template %s in slot %d", entry.prefix, slot)
        run = Evaluation(entry, slot, template)
        self.evaluations.add(run)
        try:
            tokens, evaluated = self.evaluate_pieces(template, run)
        except Exception as e:
            if not self.current(entry, template):
                # Edited meanwhile: the pass that read the edit made the template stale
                # (or broken), and that stands.
                self.remember(run, "superseded")
                log.info("warming template %s stopped: its file changed", entry.prefix)
            elif run.cancelled:
                self.gave_way(run)
            else:
                self.warmup_failed(run, e)
            return
        finally:
            self.evaluations.discard(run)
        try:
            self.save(entry, template, slot, tokens)
        except BackendError as e:
            if e.status is not None:
                # llama-server answered, so it did not restart: the slot still holds the
                # evaluation, and the next try finds it there.
                self.slots.mark(slot, entry.prefix, template.digest, ran=True)
            self.warmup_failed(run, e)
            return
        # After the save: what the slot last ran is then what bioproxy saw last.
        self.slots.mark(slot, entry.prefix, template.digest, ran=True)
        self.warmed(run, tokens, evaluated)

    def evaluate_pieces(self, template, run):
        """Evaluate the template's head into the run's slot: (its tokens, tokens evaluated)."""
        head = self.rendered_head(template)
        # In pieces: llama-server notices a closed connection only between batches,
        # so a user who arrives waits for one piece, not for the whole template.
        cuts = _cuts(head, self.piece_chars)
        if self.slots.holds(run.slot, run.entry.prefix, template.digest):
            # Already there (a save failed after it): a shorter piece would cut the
            # slot's cache back to that piece, and the rest be evaluated again.
            cuts = cuts[-1:]
        evaluated = 0
        for cut in cuts:
            if self.only_when_idle and self.users:
                run.cancel()
            if run.cancelled:
                raise BackendError("warmup", "a user request arrived")
            if not self.current(run.entry, template):
                raise BackendError("warmup", "the template changed")
            answer = self.evaluate_prefix(head[:cut], run)
            evaluated += answer.get("timings", {}).get("prompt_n", 0)
        return int(answer["tokens_evaluated"]), evaluated

    def gave_way(self, run):
        entry = run.entry
        entry.state = "stale"  # again when bioproxy is idle
        self.remember(run, "cancelled")
        self.metrics.warmup_cancellations.labels(entry.prefix).inc()
        log.info("warming template %s gave way to a user request", entry.prefix)

    def warmup_failed(self, run, error):
        entry = run.entry
        self.retry_later(entry, error)
        self.remember(run, "failed")
        self.metrics.warmups.labels(entry.prefix, "failed").inc()
        log.warning("warming template %s failed: %s", entry.prefix, error)

    def warmed(self, run, tokens, evaluated):
        """Evaluated, and saved unless llama-server cannot save: the template is warm."""
        entry, seconds = run.entry, time.monotonic() - run.started
        entry.last_warmup = {
            "at": time.time(),
            "outcome": "ok",
            "seconds": round(seconds, 3),
            "tokens_evaluated": evaluated,
        }
        self.remember(run, "ok")
        self.metrics.warmups.labels(entry.prefix, "ok").inc()
        self.metrics.warmup_seconds.labels(entry.prefix).observe(seconds)
        entry.forced, entry.failures = False, 0
        log.info("template %s warmed: %d tokens in %.2f s", entry.prefix, tokens, seconds)
        # Saved under its own digest, so usable if the file goes back to it; but if the
        # file changed meanwhile, the template is not warm: the new text is warmed next.
        if self.current(entry, run.template):
            entry.tokens, entry.state = tokens, "warm"

    def remember(self, run, outcome):
        """Keep the last evaluations' outcomes for /status."""
        seconds = round(time.monotonic() - run.started, 3)
        self.recent.append(
            {
                "template": run.entry.prefix,
                "at": time.time(),
                "outcome": outcome,
                "seconds": seconds,
            }
        )

    def save(self, entry, template, slot, tokens):
        """Save the evaluated slot to its file and record it.

        A llama-server that cannot save (501: no --slot-save-path) leaves the template warm
        in its slot only. Any other failure raises BackendError.
        """
        name = filename(entry.prefix, template.digest, self.slots.model)
        try:
            saved = self.slots.save(slot, name)
            # The prefix plus the one token llama-server generates; anything else means
            # another request ran in the slot first, or llama-server restarted (a new
            # server saves its empty slot: 0 tokens, and no error).
            if not tokens <= saved <= tokens + 1:
                raise BackendError(
                    f"POST /slots/{slot}?action=save", f"saved {saved} tokens, evaluated {tokens}"
                )
        except BackendError as e:
            self.metrics.saves.labels(entry.prefix, "failed").inc()
            if e.status == 501:
                log.warning("template %s not saved (no --slot-save-path?): %s", entry.prefix, e)
                return
            # The file may be half written (a full disk), or written later by a save
            # llama-server had queued behind another request: it no longer holds this
            # template for sure, and a partial file would keep the disk full.
            self.registry.forget(entry.prefix, name)
            self.registry.delete_file(name)
            raise
        self.registry.record(entry.prefix, template.digest, self.slots.model, saved)
        self.metrics.saves.labels(entry.prefix, "ok").inc()
        log.info("template %s saved: %d tokens in %s", entry.prefix, saved, name)

    def restore(self, entry, template, slot):
        """For a user request: load the template's saved cache into its slot.

        "restored", or "cold" when it cannot: the request then goes on without it, and
        leaves the slot holding the template once answered.
        """
        try:
            return "restored" if self.load_saved(entry, template, slot) else "cold"
        except BackendError:
            return "cold"

    def restore_did_not_hold(self, entry, template, reused):
        """A user's answer after a restore reused less than the template: the file is bad."""
        log.warning(
            "template %s was restored for a request, yet llama-server reused only %d of its "
            "%d tokens: its saved file is not used again",
            entry.prefix,
            reused,
            entry.tokens,
        )
        saved = self.registry.find(entry.prefix, template.digest, self.slots.model)
        if saved is not None:
            self.discard(entry, saved)

    def load_saved(self, entry, template, slot):
        """Restore the template's saved cache into the slot: whether there was one to use.

        A file that llama-server cannot read (400) or that holds something else is
        forgotten, and the template warmed again; other failures raise BackendError.
        """
        saved = self.registry.find(entry.prefix, template.digest, self.slots.model)
        if saved is None:
            return False
        spoiled = self.registry.check(saved)
        if spoiled:
            # llama-server restores a file with corrupted KV data without a word, and its
            # answers are then garbage: never restore what is not what bioproxy saved.
            self.restore_failed(entry, slot, f"{saved['file']}: {spoiled}")
            self.discard(entry, saved)
            return False
        try:
            tokens = self.slots.restore(slot, saved["file"])
        except BackendError as e:
            self.restore_failed(entry, slot, e)
            if e.status != 400:
                raise
            self.discard(entry, saved)  # missing, corrupt or from another build
            return False
        if tokens != saved.get("tokens", tokens):
            # Not what bioproxy saved there, e.g. a save llama-server ran after bioproxy
            # had given up waiting for it.
            self.restore_failed(entry, slot, f"restored {tokens} tokens, saved {saved['tokens']}")
            self.discard(entry, saved)
            return False
        self.slots.mark(slot, entry.prefix, template.digest)
        if self.current(entry, template):
            entry.tokens, entry.state, entry.failures = tokens, "warm", 0
            entry.last_warmup = {
                "at": time.time(),
                "outcome": "restored",
                "saved_at": saved.get("saved_at"),
                "tokens": tokens,
            }
        self.metrics.restores.labels(entry.prefix, "ok").inc()
        log.info("template %s restored into slot %d: %d tokens", entry.prefix, slot, tokens)
        return True

    def restore_failed(self, entry, slot, error):
        # What the slot holds now is unknown (a 400 empties it).
        self.slots.forget(slot)
        self.metrics.restores.labels(entry.prefix, "failed").inc()
        log.warning("restoring template %s failed: %s", entry.prefix, error)

    def discard(self, entry, saved):
        """Forget a saved file that cannot be used, and warm the template again now."""
        self.registry.forget(entry.prefix, saved["file"])
        entry.state = "stale"
        self.wake.set()

    def evaluate_prefix(self, text, run):
        """Evaluate text into the run's slot, reusing what it holds; llama-server's last event."""
        body = {"prompt": text, "n_predict": 0, "id_slot": run.slot, "cache_prompt": True}
        # Streamed, so that shutting the connection down stops llama-server at once.
        run.response = self.upstream.open(
            "POST", "/completion", {**body, "stream": True}, self.warmup_timeout
        )
        try:
            if run.cancelled or (self.only_when_idle and self.users):
                run.cancel()  # a user came while the call was being made
            return _final_event(b"".join(iter_body(run.response)))
        finally:
            run.response = None

    def rendered_head(self, template):
        """The prompt text before the user's message, exactly as llama-server renders it."""
        messages = [{"role": "user", "content": template.render(SENTINEL)}]
        prompt = self.upstream.call("POST", "/apply-template", {"messages": messages})["prompt"]
        cut = prompt.find(SENTINEL)
        if cut < 0:
            raise BackendError("POST /apply-template", "the chat template dropped the message")
        return prompt[:cut]


def _remaining(at, now):
    return round(at - now, 3) if at > now else 0


def _final_event(body):
    """The last `data:` event of a server-sent event stream, decoded."""
    events = [line[6:] for line in body.splitlines() if line.startswith(b"data: {")]
    if not events:
        raise BackendError("POST /completion", "the stream held no event")
    return json.loads(events[-1])


def _cuts(text, size):
    """Ends of growing prefixes of text, about size apart, at line ends when there are any."""
    cuts, start = [], 0
    while start + size < len(text):
        end = text.find("\n", start + size)
        if end < 0:
            break
        cuts.append(end + 1)
        start = end + 1
    return [*cuts, len(text)] if not cuts or cuts[-1] != len(text) else cuts
