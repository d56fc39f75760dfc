"""One llama-server as one unit: its slots, their queue, its saved caches, its warmer.

The app factory builds one for each configured llama-server, in a Pool (pool.py).
"""

import dataclasses
import logging
import time
from contextlib import contextmanager, nullcontext
from urllib.parse import urlsplit

import gevent
from flask import current_app

from .caches import SavedCaches
from .config import backend_state_dir
from .errors import BackendStalled, UpstreamTimeout
from .evaluator import Evaluator
from .gate import Gate
from .hold import Hold
from .pool import serving
from .prompts import Prompts
from .ram_cache import NOTES as RAM_NOTES
from .ram_cache import RamCache
from .registry import Registry
from .scheduler import Scheduler
from .slot_api import SlotApi
from .slot_table import UNKNOWN, SlotTable
from .upstream import BackendError, Upstream
from .variants import Variants
from .warmer import Warmer
from .warmth import State, Warmth

log = logging.getLogger(__name__)

# A router's model states that hold a server of its own (and count against --models-max).
RUNNING = ("loading", "loaded", "sleeping")


class BackendHung(Exception):
    """Thrown into a request's greenlet that waits for a llama-server gone silent."""


def get_backend():
    """The first llama-server (the only one with backend_url)."""
    return current_app.extensions["bioproxy"].backend


class Slots:
    """The slot table, kept up to date through the slot API: each method asks llama-server."""

    def __init__(self, table, api):
        self.table = table
        self.api = api
        self.told_cleared = False  # what the log last said of table.cleared

    def refresh(self):
        """Read /props and /slots; True when llama-server restarted or changed its model."""
        try:
            props, slots = self.api.fetch_slots()
        except BackendError:
            self.table.unreachable()
            raise
        restarted = self.table.update(props, slots, time.time())
        self._tell_clearing()
        return restarted

    def holds(self, slot, key, digest):
        """Whether the slot still holds this template version (key: the template's prefix
        or its variant's key)."""
        if self.table.holding(slot) != key:
            return False  # no need to ask
        states = self.fetch_states()
        held = self.table.holds(slot, key, digest, states.get(slot, UNKNOWN))
        self._tell_clearing()
        return held

    def mark(self, slot, key, digest, ran=False):
        """Record that the slot holds this template version now (see SlotTable.mark)."""
        states = self.fetch_states()
        self.table.mark(slot, key, digest, states.get(slot, UNKNOWN), ran)

    def settle(self, slot, key, digest):
        """Record that the slot will hold this template version once idle (SlotTable.settle)."""
        states = self.fetch_states()
        self.table.settle(slot, key, digest, states.get(slot, UNKNOWN))

    def fetch_states(self):
        states = self.api.fetch_states()
        self.table.observe(states)
        self._tell_clearing()
        return states

    def _tell_clearing(self):
        """Log it once each time what bioproxy knows of idle-slot clearing changes."""
        if self.table.cleared == self.told_cleared:
            return
        self.told_cleared = self.table.cleared
        log.warning(
            "llama-server clears idle slots (a unified KV cache): requests go unpinned, "
            "for it to place where the template is (its RAM cache keeps cleared slots)"
            if self.table.cleared
            else "requests are pinned to their slots again"
        )

    def forget(self, slot):
        self.table.forget(slot)


def upstream(settings, url, api_key, model=None):
    """A llama-server at url, with the settings' timeouts and that llama-server's API key
    (and the model, of a router's)."""
    return Upstream(
        url,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.upstream_timeout,
        health_timeout=settings.health_timeout,
        api_key=api_key,
        model=model,
    )


class Backend:
    """One llama-server and what bioproxy keeps of it (spec: a config.Spec). Built without
    I/O: create_app() reads its files (open()), its warmer reaches it."""

    def __init__(self, settings, spec, catalog, metrics):
        self.settings, self.spec = settings, spec  # to make a router's units (discover)
        self.name = spec.name
        self.model = spec.model  # of a router's models, or None
        # A configured llama-server found to be a router, its models not named: it is not
        # a unit itself, bioproxy makes one of each model it lists (discover()).
        self.router = False
        self.listed = None  # the models it listed last, as the log last said
        self.found = set()  # the units discover() made of a router's models, in the pool
        self.aliases = ()  # other names of its model, as the router lists them
        self.pool = None  # the Pool it is in, which takes the units it makes
        self.upstream = upstream(settings, spec.url, spec.api_key, spec.model)
        self.metrics = metrics
        self.catalog = catalog
        self.slots = Slots(SlotTable(catalog.digest), SlotApi(self.upstream, settings.slot_timeout))
        self.queue_timeout = settings.queue_timeout  # also the longest wait for the evaluator
        self.scheduler = Scheduler(
            self.slots.table, settings.queue_max_length, settings.queue_timeout, metrics, spec.name
        )
        self.warmth = {entry.prefix: Warmth(entry.prefix) for entry in catalog}
        self.prompts = Prompts(self.upstream, settings.upstream_timeout, settings.slot_timeout)
        self.warmer = Warmer(
            self,
            catalog,
            settings.warmup_check_interval,
            settings.warmup_concurrency,
            settings.warmup_piece_chars,
        )
        # A slot given back before its answer ended: the watcher looks at it soon.
        self.scheduler.on_drain = self.warmer.poke_soon
        self.gate = Gate(settings.warmup_only_when_idle, on_idle=self.warmer.resume_when_idle)
        registry = Registry(spec.state_dir, spec.slot_save_path)
        self.caches = SavedCaches(registry, self.slots, self.prompts, metrics, self.discarded)
        self.variants = Variants(self, settings.variant_budget_bytes)
        self.evaluator = None
        self.slots_hidden = False  # GET /slots answered 501 (--no-slots), last time asked
        self.ram = RamCache()  # its RAM cache, where it clears idle slots (ram_cache.py)
        if settings.warmup_backend_url:
            evaluator = upstream(settings, settings.warmup_backend_url, spec.api_key)
            pid, port = settings.warmup_backend_pid, urlsplit(settings.warmup_backend_url).port
            # Stopped half its read timeout at most per evaluation (see hold.py).
            hold = Hold(pid, port or 80, settings.upstream_timeout / 2) if pid else None
            self.evaluator = Evaluator(
                evaluator, settings.slot_timeout, settings.upstream_timeout, hold
            )

        # The backends whose warmth a change of a template's text makes stale (pool.py).
        self.siblings = [self]
        # Failed requests in a row that did not reach llama-server (refused, timed out).
        self.failures = 0
        # From its start, and again from a restart found, until its warmer has warmed (or
        # tried to warm) every template: it takes templated requests only when no backend
        # that has joined is up (pool.py).
        self.joining = True
        self.warm_backends = settings.warm_backends
        self.health_interval = settings.health_check_interval
        self.health_timeout = settings.health_timeout
        self.told_missing = None  # the router's models when the log last said ours is not
        self.checker = None  # the greenlet of check_health_forever()
        self.answers = set()  # its answers on their way to clients (AnswerBody)
        self.heads = {}  # greenlet -> since when it waits for an answer's start (awaiting)

    def reload_templates(self):
        """Read the templates again: one whose text is new is stale on every backend."""
        for prefix in self.catalog.reload():
            for backend in self.siblings:
                backend.warmth[prefix].mark_stale()
                backend.variants.prune()  # its variants of the text before
                # Its slots of the version before now hold nothing (SlotTable.holding): a
                # request may wait for them no more.
                backend.scheduler.dispatch()
                if backend is not self:
                    backend.warmer.wake.set()  # its own pass warms it

    def up(self):
        """Whether routing sends requests here: the last look reached llama-server, and no
        request has failed to reach it since (never a router: its units take them)."""
        return self.slots.table.reachable and self.failures == 0 and not self.router

    def discover(self):
        """This llama-server is a router and no models were named for it: a unit of each
        model it lists (GET /models), named NAME/MODEL, joins the pool, as if named in
        the backends entry's models. Looked at again at each of its warmer's passes: a
        model added to the router becomes a unit then, and the unit of one it no longer
        lists leaves the pool (Pool.remove); listed again, it comes back with its saved
        caches (the same folder)."""
        if not self.router:
            self.router = True  # out of routing from now (up())
            log.info("backend %s is a router: each model it lists becomes a backend", self.name)
            self.pool.follow(self)  # its model events wake this pass too (a model added)
        try:
            models = self.upstream.call("GET", "/models", timeout=self.health_timeout)["data"]
            aliases = {m["id"]: tuple(m.get("aliases") or ()) for m in models}
        except (BackendError, KeyError, TypeError) as e:
            log.warning("backend %s: cannot read the router's models: %s", self.name, e)
            return
        listed = sorted(aliases)
        if listed != self.listed:
            self.listed = listed
            log.info("backend %s lists the models: %s", self.name, ", ".join(listed) or "none")
        for model in listed:
            unit = self.pool.by_name.get(f"{self.name}/{model}")
            if unit is None:
                unit = self.unit(model)
                self.pool.add(unit)
                self.found.add(unit)
            unit.aliases = aliases[model]
        for unit in [unit for unit in self.found if unit.model not in aliases]:
            log.warning(
                "backend %s no longer lists the model %s: its backend %s leaves the pool",
                self.name,
                unit.model,
                unit.name,
            )
            self.found.discard(unit)
            self.pool.remove(unit)

    def named(self, model):
        """Whether a request naming this model is for this backend: its model's id or one
        of its aliases (a llama-server not in router mode serves whatever is named)."""
        return self.model is None or model == self.model or model in self.aliases

    def unit(self, model):
        """A Backend for one of this router's models, as a backends entry naming it makes."""
        name = f"{self.name}/{model}"
        folder = backend_state_dir(self.settings.paths.state_dir, name)
        spec = dataclasses.replace(self.spec, name=name, model=model, state_dir=folder)
        unit = Backend(self.settings, spec, self.catalog, self.metrics)
        unit.open()
        for entry in self.catalog:  # read already: its warmer warms (or restores) them
            if entry.template is not None:
                unit.warmth[entry.prefix].mark_stale()
        return unit

    def unreachable(self):
        """A request could not reach llama-server: out of routing until a look does."""
        was_up = self.up()
        self.failures += 1
        self.slots.table.unreachable()
        self.warmer.wake.set()
        if was_up:
            self.left_routing()

    def load_if_room(self):
        """A router's model it does not run now: have it loaded if the router has room for
        it without unloading another (its /props' max_instances), and if a template is to
        be warm here. Its warmer warms them once it runs; the router may unload it again."""
        if self.model is None or not any(
            self.serves(entry.prefix) for entry in self.catalog if entry.template is not None
        ):
            return
        api, timeout = self.upstream, self.health_timeout
        try:
            limit = api.call("GET", "/props", timeout=timeout, routed=False).get("max_instances")
            models = api.call("GET", "/models", timeout=timeout, routed=False)["data"]
        except (BackendError, AttributeError, KeyError, TypeError) as e:
            log.warning("backend %s: cannot read the router's models: %s", self.name, e)
            return
        states = {m.get("id"): m.get("status", {}).get("value") for m in models}
        running = sum(1 for state in states.values() if state in RUNNING)
        for m in models:  # a model's aliases name it too
            states.update(dict.fromkeys(m.get("aliases") or [], states[m.get("id")]))
            if m.get("id") == self.model:
                self.aliases = tuple(m.get("aliases") or ())
        if self.model not in states:
            if self.told_missing != sorted(states):
                self.told_missing = sorted(states)
                log.error(
                    "backend %s: the router serves no model %s (it serves: %s)",
                    self.name,
                    self.model,
                    ", ".join(sorted(states)) or "none",
                )
            return
        if states[self.model] in RUNNING or (limit and running >= limit):
            return  # loading already, or no room: loaded by a user's request, if ever
        log.info("backend %s: asking the router to load the model, to warm it", self.name)
        try:
            api.call("POST", "/models/load", {"model": self.model}, timeout, routed=False)
        except BackendError as e:
            log.warning("backend %s: the router did not load it: %s", self.name, e)

    def rejoin(self):
        """llama-server restarted (or was gone): held out of templated routing again."""
        self.ram.reset()
        if not self.joining:
            log.warning("backend %s: warming its templates before templated requests", self.name)
        self.joining = True

    def check_joined(self):
        """Joined once no template with text waits for its warmup here."""
        if not self.joining:
            return
        waiting = (State.PENDING, State.STALE, State.WARMING)
        for prefix, warmth in self.warmth.items():
            if self.catalog[prefix].template is None or not self.serves(prefix):
                continue
            if warmth.state in waiting:
                return
        self.joining = False
        if len(self.siblings) > 1:
            log.info("backend %s is warm: it takes templated requests", self.name)

    def left_routing(self):
        """Just out of routing. The users waiting for a slot here go to another backend
        that is up (their requests were not sent; with none up they stay, as with one
        backend), and the others' warmers look now: one may serve its templates instead."""
        others = [backend for backend in self.siblings if backend is not self]
        for backend in others:
            backend.warmer.wake.set()
        if not any(backend.up() and backend.model == self.model for backend in others):
            return  # none serves its model
        moved = self.scheduler.evacuate()
        if moved:
            log.warning("backend %s: %d waiting requests sent to another", self.name, moved)

    def serves(self, prefix):
        """Whether this backend keeps the template warm: unless it is a router's unit of
        another model than the template names, always, or when warm_backends names fewer
        backends than serve the model, if pool.serving picks it."""
        model = self.catalog[prefix].model
        if self.router or (model is not None and self.model is not None and model != self.model):
            return False
        count = self.warm_backends
        if not count:
            return True
        siblings = [
            b for b in self.siblings if not b.router and (model is None or b.model in (None, model))
        ]
        return count >= len(siblings) or self in serving(siblings, prefix, count)

    def open(self):
        """Read what was saved; forget the files of templates no longer configured."""
        registry = self.caches.registry
        registry.load()
        for key, saved in list(registry.entries.items()):
            # A variant's entry names its template (see variants.py).
            if saved.get("template", key) not in self.catalog:
                registry.forget(key)
        self.variants.prune()  # of edited templates, or beyond a budget lowered since

    def pins(self):
        """Whether requests are pinned to the slot bioproxy chose for them (id_slot).

        Not when llama-server clears idle slots (a unified KV cache with --cache-idle-slots,
        its defaults when -np is not given): any task that starts empties every idle slot,
        so a slot bioproxy found holding the template, or restored it into, may be empty
        by the time the request starts there, and llama-server evaluates a request pinned
        to an empty slot from nothing. An unpinned one it places where the template is: in
        a slot that holds it, or from its RAM cache (--cache-ram), to which it copies each
        slot it clears.
        """
        return not self.slots.table.cleared

    def mode(self):
        """What bioproxy found out about this llama-server, and what that takes away."""
        pins, table = self.pins(), self.slots.table
        notes = []
        if self.caches.unsupported:
            notes.append(
                "llama-server cannot save slots (started without --slot-save-path): no "
                "template stays warm across a llama-server restart; start it with "
                "--slot-save-path DIR and set slot_save_path to DIR"
            )
        if table.cleared:
            notes.append(
                "llama-server clears idle slots (a unified KV cache, its default without "
                "-np): requests go unpinned, for it to place where its RAM cache "
                "(--cache-ram) or a slot holds the template"
                + ("" if self.caches.unsupported else "; " + RAM_NOTES[self.ram.keeps])
            )
        if self.evaluator is not None and self.evaluator.problem:
            notes.append(f"the warmup llama-server is not used: {self.evaluator.problem}")
        if self.slots_hidden:
            notes.append(
                "llama-server hides its slots (started with --no-slots): bioproxy cannot see "
                "what they hold, so it warms no template and sends requests on unscheduled; "
                "start llama-server without --no-slots"
            )
        elif self.evaluator is None or self.evaluator.problem:
            # Measured (docs/BENCHMARKS.md, users during a warmup): 5-12x idle at p50.
            notes.append(
                "templates are evaluated in this llama-server's own slots: a user who "
                "arrives meanwhile waits for the batch under way, several times the idle "
                "time to first token; a warmup llama-server (warmup_backend_url) keeps users "
                "near it (docs/SCHEDULING.md, Users first)"
            )
        return {
            "pinned": pins,
            "clears_idle_slots": table.cleared,
            "ram_cache_keeps_templates": self.ram.keeps if table.cleared else None,
            "saves": not self.caches.unsupported,
            "warmup_backend": self.evaluator and self.evaluator.describe(),
            "notes": notes,
        }

    def user_waiting(self):
        """While a user's request waits for its answer's first byte: the warmup llama-server
        is stopped meanwhile, if bioproxy knows its process (hold.py)."""
        return self.evaluator.held_for_user() if self.evaluator else nullcontext()

    def start(self):
        """In the worker: the warmer, and with several backends the health checks."""
        self.warmer.start()
        if len(self.siblings) > 1:
            self.checker = gevent.spawn(self.check_health_forever)

    def stop(self):
        self.warmer.stop()
        if self.checker is not None:
            self.checker.kill()

    def check_health_forever(self):
        """Look at llama-server's /health every health_check_interval: one that stops
        answering is out of routing within that time; one that answers again is looked
        at by its warmer at once (a restart found, its templates warmed again)."""
        while True:
            gevent.sleep(self.health_interval)
            status, detail = self.upstream.health()
            if status != "ok" and self.up():
                log.warning("backend %s is out of routing: %s", self.name, detail)
                self.unreachable()
            elif status == "ok" and not self.up():
                self.warmer.wake.set()
            if status == "down":
                self.cut_stalled()

    @contextmanager
    def awaiting(self):
        """While a request waits for llama-server's response and its first chunk: one that
        waits longer than health_timeout once its /health stops answering gets a
        BackendHung here (cut_stalled), raised as BackendStalled: sent to another backend,
        or a clean error for its client."""
        me = gevent.getcurrent()
        self.heads[me] = time.monotonic()
        try:
            yield
        except BackendHung as e:
            self.metrics.upstream_errors.labels(UpstreamTimeout.code).inc()
            raise BackendStalled(str(e)) from None
        finally:
            self.heads.pop(me, None)

    def answering(self, body):
        """An answer of llama-server's on its way to a client (proxy.send), until closed."""
        self.answers.add(body)
        body.on_close = self.answers.discard

    def cut_stalled(self):
        """llama-server does not answer its /health: the answers from it that have sent
        nothing for health_timeout are cut (their clients see a cut stream, never a hang
        until upstream_timeout). One still streaming goes on: llama-server is alive."""
        now = time.monotonic()
        stalled = [b for b in self.answers if now - b.read_at >= self.health_timeout]
        for body in stalled:
            body.cut()
        waiting = [g for g, since in self.heads.items() if now - since >= self.health_timeout]
        for greenlet in waiting:
            self.heads.pop(greenlet, None)  # thrown into once
            hung = BackendHung(
                f"llama-server {self.name} stopped answering (its /health, within "
                "health_timeout) before its response to this request"
            )
            gevent.kill(greenlet, hung)  # at the hub's next turn, where it waits
        if stalled or waiting:
            log.warning(
                "backend %s: %d answers and %d requests waiting for it cut, stalled",
                self.name,
                len(stalled),
                len(waiting),
            )

    def retire(self):
        """Out of the pool (Pool.remove): its warmer stopped, its users waiting for a slot
        sent to another backend (nothing of theirs was sent), its gauges gone. Requests
        under way here finish; each closes its own connection."""
        self.stop()
        moved = self.scheduler.evacuate()
        if moved:
            log.warning("backend %s: %d waiting requests sent to another", self.name, moved)
        self.scheduler.forget_gauges()

    def close(self):
        self.stop()
        self.upstream.close()
        if self.evaluator is not None:
            self.evaluator.close()

    def discarded(self, prefix):
        """A saved file turned out unusable: warm the template again now."""
        self.warmth[prefix].mark_stale()
        self.warmer.wake.set()

    def describe(self, prefix):
        """One template on this llama-server, for /templates."""
        entry, warmth = self.catalog[prefix], self.warmth[prefix]
        saved = self.caches.find(prefix, entry.template) if entry.template else None
        return {
            "prefix": prefix,
            "file": entry.path,
            "served": self.serves(prefix),
            "state": "broken" if entry.template is None and entry.read else self.state_of(prefix),
            "error": entry.error,
            "tokens": warmth.tokens,
            "digest": entry.digest,
            "saved_file": saved["file"] if saved else None,
            "last_warmup": warmth.last_warmup,
            "requests": dict(warmth.requests),
            "variants": self.variants.describe(prefix),
        }

    def state_of(self, prefix):
        """A template's state here; "unserved" if this backend does not keep it warm (and
        does not hold it warm anyway)."""
        state = self.warmth[prefix].state
        if state != State.WARM and not self.serves(prefix):
            return "unserved"
        return state.value

    def warm_count(self):
        """How many templates are warm here, as bioproxy last saw."""
        return sum(1 for warmth in self.warmth.values() if warmth.state == State.WARM)

    def summary(self):
        """This backend at a glance, for /status: up, slots, templates warm, queue."""
        scheduler = self.scheduler
        return {
            "name": self.name,
            "url": self.upstream.base_url,
            "model": self.model,
            "router": self.router,
            **({"models": self.listed} if self.router else {}),
            "up": self.up(),
            "joining": self.joining,
            **self.seen(),
            "slot_count": scheduler.slots.count,
            "slots_busy": scheduler.slots.count - len(scheduler.free_slots()),
            "queue": scheduler.users_waiting(),
            "users_in_flight": self.gate.users,
            "templates_warm": self.warm_count(),
            "templates": {prefix: self.state_of(prefix) for prefix in self.warmth},
            "templates_served": [prefix for prefix in self.warmth if self.serves(prefix)],
        }

    def seen(self):
        """Whether bioproxy's last look at llama-server reached it, and when one last did.

        While it is unreachable, templates' and slots' states are as of that time.
        """
        return {"reachable": self.slots.table.reachable, "last_seen": self.slots.table.seen_at}
