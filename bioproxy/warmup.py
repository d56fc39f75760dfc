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

    def __init__(self, entry, slot):
        self.entry = entry
        self.slot = slot
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
            # Look again soon while llama-server is down (requests go unscheduled until it
            # answers) or busy in slots bioproxy did not give out (they stay unused meanwhile).
            soon = self.backend_was_down or self.scheduler.foreign
            self.wake.wait(min(self.interval, 1.0) if soon else self.interval)
            self.wake.clear()

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
                if entry.template is not None:
                    entry.state = "stale"
        self.backend_was_down = False
        self.scheduler.update_foreign(released)  # also serves the queue if slots were added
        for entry in self.due():
            if entry.prefix not in self.warming:
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
            if entry.forced or self.restore(entry, template, slot) != "restored":
                self.evaluate(entry, template, slot)
        finally:
            self.scheduler.release(ticket)

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
        run = Evaluation(entry, slot)
        self.evaluations.add(run)
        try:
            head = self.rendered_head(template)
            # In pieces: llama-server notices a closed connection only between batches,
            # so a user who arrives waits for one piece, not for the whole template.
            evaluated = 0
            for cut in _cuts(head, self.piece_chars):
                if self.only_when_idle and self.users:
                    run.cancel()
                if run.cancelled:
                    raise BackendError("warmup", "a user request arrived")
                answer = self.evaluate_prefix(head[:cut], run)
                evaluated += answer.get("timings", {}).get("prompt_n", 0)
            tokens = int(answer["tokens_evaluated"])
        except Exception as e:
            if run.cancelled:
                entry.state = "stale"  # again when bioproxy is idle
                self.remember(run, "cancelled")
                self.metrics.warmup_cancellations.labels(entry.prefix).inc()
                log.info("warming template %s gave way to a user request", entry.prefix)
                return
            # Any other failure leaves the template retryable, after a growing pause.
            entry.failures += 1
            entry.retry_at = time.monotonic() + min(self.interval * 2**entry.failures, 600)
            entry.state = "failed"
            entry.last_warmup = {"at": time.time(), "outcome": "failed", "error": str(e)}
            self.remember(run, "failed")
            self.metrics.warmups.labels(entry.prefix, "failed").inc()
            log.warning("warming template %s failed: %s", entry.prefix, e)
            return
        finally:
            self.evaluations.discard(run)
        seconds = time.monotonic() - run.started
        entry.tokens = tokens
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
        self.save(entry, template, slot, tokens)
        # After the save: what the slot last ran is then what bioproxy saw last.
        self.slots.mark(slot, entry.prefix, template.digest)
        entry.state = "warm"

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
        name = filename(entry.prefix, template.digest, self.slots.model)
        try:
            saved = self.slots.save(slot, name)
            # The prefix plus the one token llama-server generates; anything else means
            # another request ran in the slot first and its cache would be saved instead.
            if not tokens <= saved <= tokens + 1:
                raise BackendError("save", f"saved {saved} tokens, evaluated {tokens}")
        except BackendError as e:
            self.metrics.saves.labels(entry.prefix, "failed").inc()
            hint = " (is llama-server's --slot-save-path set?)" if e.status == 501 else ""
            log.warning("saving template %s failed%s: %s", entry.prefix, hint, e)
            return
        self.registry.record(entry.prefix, template.digest, self.slots.model, saved)
        self.metrics.saves.labels(entry.prefix, "ok").inc()
        log.info("template %s saved: %d tokens in %s", entry.prefix, saved, name)

    def restore(self, entry, template, slot):
        """Load the template's saved cache into the slot: "restored", or "cold" if it can't."""
        saved = self.registry.find(entry.prefix, template.digest, self.slots.model)
        if saved is None:
            return "cold"
        try:
            tokens = self.slots.restore(slot, saved["file"])
        except BackendError as e:
            # A missing or corrupt file answers 400 and leaves the slot empty.
            self.slots.forget(slot)
            self.metrics.restores.labels(entry.prefix, "failed").inc()
            log.warning("restoring template %s failed: %s", entry.prefix, e)
            current = self.registry.entries.get(entry.prefix)
            if e.status == 400 and current and current["file"] == saved["file"]:
                self.registry.forget(entry.prefix)
                entry.state = "stale"
                self.wake.set()
            return "cold"
        self.slots.mark(slot, entry.prefix, template.digest)
        entry.tokens, entry.state = tokens, "warm"
        self.metrics.restores.labels(entry.prefix, "ok").inc()
        log.info("template %s restored into slot %d: %d tokens", entry.prefix, slot, tokens)
        return "restored"

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
