"""Several llama-servers: which one a request goes to, and what they are doing.

Each backend is a whole unit (backend.py): its slots, queue, saved caches and warmer, so
every template is warmed on every backend (or on warm_backends of them: serving()).
Routing picks, for each request, the backend where its prompt would start soonest, from
what bioproxy knows of each now:

- the wait for a slot there: none when one is free, else the average time a user holds a
  slot there times the users ahead of it, over its slots;
- then, for a templated request, what it takes to have the template in that slot: nothing
  where a free slot holds it (or the RAM cache of a llama-server that clears idle slots
  holds a copy, as counted: ram_cache.py), a restore where its cache is saved
  (milliseconds), else an evaluation of the template (as long as its last warmup took).

So a templated request goes where its template is warm, and spills over to another
backend, which restores or evaluates it there, once waiting at the warm ones would cost
more; but not to a backend still joining (warming its templates after it started or
restarted) while another has joined. Plain requests go where the wait is shortest. Ties
go to the backend with the fewest users in flight, then in turn. A backend that is down
(its last look, or a request since, did not reach it) takes nothing while another is up.
"""

import hashlib
import itertools

from prometheus_client.core import GaugeMetricFamily

from .router_events import RouterEvents
from .warmth import SECONDS_PER_TOKEN, UNKNOWN_EVALUATION

# What a restore of a saved cache costs, in seconds, when routing weighs it (tens of
# milliseconds for a few thousand tokens: docs/BENCHMARKS.md); an evaluation whose time
# is not known yet is weighed as warmth.py says.
RESTORE_SECONDS = 0.1
# How long a user holds a slot, in seconds, where no request has been seen yet.
DEFAULT_HOLD = 1.0


class Pool:
    """The backends, in configured order (at least one)."""

    def __init__(self, backends):
        self.backends = list(backends)
        self.by_name = {backend.name: backend for backend in self.backends}
        self.turn = itertools.count()
        # Whether some backend has an API key of its own (a client's is not passed on).
        self.keyed = any(backend.upstream.auth for backend in self.backends)
        self.started = False
        self.followed = {}  # a router's URL -> the RouterEvents following it
        for backend in self.backends:
            backend.siblings = self.backends
            backend.pool = self

    def add(self, backend):
        """A backend found once bioproxy runs: a router's unit (Backend.discover)."""
        self.backends.append(backend)
        self.by_name[backend.name] = backend
        backend.siblings = self.backends
        backend.pool = self
        if self.started:
            backend.start()

    def remove(self, backend):
        """A router's unit whose model the router no longer lists (Backend.discover)."""
        self.backends.remove(backend)  # in place: it is every backend's siblings too
        del self.by_name[backend.name]
        backend.retire()

    def follow(self, backend):
        """Follow the model events of the router that backend is at (once per router): its
        backends look at once when the router loads, unloads or removes a model."""
        url = backend.upstream.base_url
        if url in self.followed:
            return
        events = RouterEvents(
            backend.upstream, lambda: [b for b in self.backends if b.upstream.base_url == url]
        )
        self.followed[url] = events
        if self.started:
            events.start()

    def start(self):
        """In the worker: every backend's warmer and health checks (backend.start), and
        the model events of the routers whose models are named (Backend.discover follows
        the others once it finds them)."""
        for backend in list(self.backends):
            if backend.model is not None:
                self.follow(backend)
        self.started = True
        for events in self.followed.values():
            events.start()
        for backend in list(self.backends):
            backend.start()

    def stop(self):
        for events in self.followed.values():
            events.stop()
        for backend in self.backends:
            backend.stop()

    def __iter__(self):
        return iter(self.backends)

    def __len__(self):
        return len(self.backends)

    @property
    def first(self):
        """The first backend requests can go to (the configured first, unless it is a
        router bioproxy made units of)."""
        return self.units()[0]

    def units(self):
        """The backends requests go to: all but the routers bioproxy made units of (all,
        while it has made none: requests then go to the router, unscheduled)."""
        return [backend for backend in self.backends if not backend.router] or self.backends

    def of_model(self, model):
        """The backends that serve a model: a router's units of that model, and every
        llama-server not in router mode (it serves the one it was started with, whatever
        a request names). All of them when none does (llama.cpp then says what is wrong)."""
        units = self.units()
        if model is None or all(backend.model is None for backend in units):
            return units
        matching = [b for b in units if b.named(model)]
        return matching or units

    def candidates(self, model=None):
        """The backends routing may use for a model: those up, or all of them when none is
        (the request then fails there with llama.cpp's own error, as with one backend)."""
        backends = self.of_model(model)
        if len(backends) == 1:
            return backends
        up = [backend for backend in backends if backend.up()]
        return up or backends

    def route(self, entry=None, template=None, avoid=(), model=None):
        """The backend for a request: templated (entry and its template version) or plain.

        avoid: backends it already failed to reach, tried last. model: the model the
        request names, if any (a router's units serve one each).
        """
        candidates = self.candidates(model)
        choices = [b for b in candidates if b not in avoid] or candidates
        if entry is not None:
            # Not to one still warming its templates after its start or a restart, while
            # another can take it.
            choices = [b for b in choices if not b.joining] or choices
        if len(choices) == 1:
            return choices[0]
        evaluation = self.evaluation_seconds(entry) if entry is not None else 0.0
        turn = next(self.turn)

        def cost(pair):
            index, backend = pair
            start = wait_seconds(backend)
            if entry is not None:
                start += prepare_seconds(backend, entry, template, evaluation)
            rotation = (index - turn) % len(choices)
            return (start, backend.gate.users, rotation)

        return min(enumerate(choices), key=cost)[1]

    def evaluation_seconds(self, entry):
        """What evaluating a template costs, as its warmups on any backend took."""
        seconds = [b.warmth[entry.prefix].evaluation_seconds for b in self.backends]
        known = [s for s in seconds if s is not None]
        if known:
            return max(known)
        tokens = [b.warmth[entry.prefix].tokens for b in self.backends]
        tokens = [t for t in tokens if t]
        return max(tokens) * SECONDS_PER_TOKEN if tokens else UNKNOWN_EVALUATION

    def describe(self):
        """Each backend, for /status."""
        return [backend.summary() for backend in self.backends]


def serving(backends, prefix, count):
    """The count backends that keep a template warm (warm_backends): those up that rank
    first for it. The rank, from a hash of the prefix and each backend's name, is the same
    in every bioproxy process and after restarts, and spreads templates evenly; when one
    goes out, the next in rank takes its place, and gives it back when it returns."""

    def rank(backend):
        return hashlib.sha256(f"{prefix}\n{backend.name}".encode()).digest()

    return sorted((b for b in backends if b.up()), key=rank)[:count]


def wait_seconds(backend):
    """How long a user request would wait for a slot there, as far as bioproxy can tell."""
    scheduler = backend.scheduler
    if scheduler.free_slots():
        return 0.0
    ahead = scheduler.users_waiting() + 1
    hold = scheduler.hold_seconds or DEFAULT_HOLD
    return hold * ahead / max(scheduler.slots.count, 1)


def prepare_seconds(backend, entry, template, evaluation):
    """What having the template in a slot there would take: held in a free slot or in
    its RAM cache, saved, or evaluated. A slot that holds it but is busy is no better
    than a restore into another: concurrent requests of one template spread over the
    backends that have it."""
    table = backend.slots.table
    if any(table.whole(slot) == entry.prefix for slot in backend.scheduler.free_slots()):
        return 0.0
    if template is None:
        return evaluation
    tokens = backend.warmth[entry.prefix].tokens
    if not backend.pins() and backend.ram.holds(entry.prefix, template.digest, tokens):
        return 0.0  # in its RAM cache, as counted (ram_cache.py)
    if backend.caches.find(entry.prefix, template) is not None:
        return RESTORE_SECONDS
    return evaluation


class BackendCollector:
    """bioproxy_backend_up and bioproxy_backend_templates_warm, read when scraped."""

    def __init__(self, pool):
        self.pool = pool

    def describe(self):
        return []  # read when scraped only: nothing to check when registered

    def collect(self):
        up = GaugeMetricFamily(
            "bioproxy_backend_up",
            "1 while bioproxy routes requests to a backend (its last look and requests "
            "since reached it), 0 while it does not.",
            labels=["backend"],
        )
        warm = GaugeMetricFamily(
            "bioproxy_backend_templates_warm",
            "Templates warm on a backend: evaluated or restored there, as bioproxy last saw.",
            labels=["backend"],
        )
        for backend in self.pool:
            up.add_metric([backend.name], 1 if backend.up() else 0)
            warm.add_metric([backend.name], backend.warm_count())
        yield up
        yield warm
