"""Who runs where: llama-server's slots handed to requests and warmups, and the queue.

Every request that makes llama-server evaluate a prompt takes a slot here first and is
pinned to it (`id_slot`), so bioproxy always knows what each slot holds and a restore
never lands in a slot another request is using. When no slot is free the request waits
in a bounded queue: users first in order of arrival, warmups after them.

The bookkeeping (Scheduler.submit, release, expire, leave) is plain code driven by an
injectable clock; Scheduler.acquire adds the waiting, with gevent.

Invariants, true after every call (tests/test_scheduler.py checks them under random
traffic, through invariants()):
1. A slot is granted to at most one ticket at a time: `busy` maps it to that ticket,
   whose outcome is GRANTED; a ticket is GRANTED only while `busy` holds it.
2. A slot that is foreign (busy in llama-server for work bioproxy did not give out) is
   granted to no one until a read of the slots shows it idle.
3. A ticket is in the queue exactly while its outcome is QUEUED, and the queue is in
   (priority, arrival) order: every user before every warmup.
4. No ticket waits while a free slot would take it: dispatch() runs after every change
   (a submit, a release, a leave, a new picture of the foreign slots), and grants free
   slots to the queue in order. A ticket that names a busy slot holds no one else up.
   Except for patience: a templated ticket whose template a busy slot holds may wait up
   to PATIENCE s for it instead of evicting another template, keeping the free slot it
   would take from the tickets behind it; and one that would evaluate its template may
   wait up to its share seconds for a busy slot where a request or a warmup of that
   version runs, keeping no slot from anyone. Its own acquire() dispatches when either
   ends.
5. At most max_queue users wait, however many warmups do: in the queue, and aside
   (wait_aside: before they join it, for their template's evaluation elsewhere).
6. release() gives a slot back once: a second call for the same ticket does nothing.
"""

import itertools
import math
import time

from .errors import BackendOut, QueueFull, QueueTimeout
from .slot_table import template_of
from .ticket import FULL, GONE, GRANTED, MOVED, QUEUED, TIMEOUT, USER, WARMUP, Outcome, Ticket

__all__ = [
    "FULL",
    "GONE",
    "GRANTED",
    "MOVED",
    "QUEUED",
    "TIMEOUT",
    "USER",
    "WARMUP",
    "Outcome",
    "Ticket",
]

# How long a templated request waits for the busy slot that holds its template rather
# than evict another template from a free one: the moment between an answer's last byte
# and its slot's release, when a client sends its next request at once (issue 11.5: it
# was restored into the other slot, evicting that one's template).
PATIENCE = 0.1


class Scheduler:
    """The slots bioproxy hands out, and the requests waiting for one.

    slots is the SlotTable: its count, and which template each slot holds.
    """

    def __init__(self, slots, max_queue, max_wait, metrics=None, name="", clock=time.monotonic):
        self.slots = slots
        self.name = name  # the backend's, in its gauges' labels
        self.max_queue = max_queue  # user requests that may wait at once
        self.max_wait = max_wait  # seconds a user request may wait
        self.metrics = metrics
        self.clock = clock
        self.busy = {}  # slot -> the granted Ticket using it
        # Slots llama-server is busy with although bioproxy gave them to nobody: another
        # gunicorn worker draining during a reload, a request that ran on after its client
        # left, or a client of llama-server's own. Kept free of new work until idle.
        self.foreign = set()
        self.releases = 0  # slots released so far
        self.released = {}  # slot -> the value of releases when it was last released
        self.used = {}  # slot -> clock time it was last granted
        self.queue = []  # waiting Tickets, served by (priority, arrival)
        self.aside = []  # user Tickets waiting before they join the queue (wait_aside)
        self.arrivals = itertools.count()
        self.hold_seconds = None  # moving average of how long a slot is held
        self.on_drain = None  # called when a slot is given back with work still under way
        self.unpinned_released = 0  # the value of releases when an unpinned ticket last was
        self.gauged = set()  # the label values of bioproxy_slots this scheduler set
        if metrics is not None:
            metrics.queue_length.labels(name).set(0)

    # The bookkeeping.

    def submit(self, ticket):
        """Grant a slot now, queue the ticket, or refuse it (outcome FULL)."""
        if ticket.arrived is None:  # set earlier when it waited aside (wait_aside)
            ticket.arrived = self.clock()
        ticket.order = next(self.arrivals)
        waiting = self.users_waiting()
        free = self._free()
        runs_now = bool(free) and self._best(ticket, free) is not None
        full = ticket.priority == USER and waiting >= self.max_queue
        if full and not runs_now:
            self._finish(ticket, FULL)
            return ticket
        # No patience for a ticket that names its slot, nor past a full queue: it takes
        # the free slot at once rather than wait beyond max_queue.
        if ticket.template is not None and ticket.wanted is None and not full:
            ticket.patient_until = ticket.arrived + PATIENCE
            if ticket.share:
                ticket.share_until = ticket.arrived + ticket.share
        self.queue.append(ticket)
        self.queue.sort(key=lambda t: (t.priority, t.order))
        self.dispatch()
        return ticket

    def release(self, ticket, drain=False):
        """Give a granted ticket's slot back; the next waiting ticket may take it.

        drain: llama-server may still be busy there (the request ended before its answer
        did), so the slot counts as foreign until update_foreign() sees it idle.
        """
        if ticket.outcome != GRANTED:
            return
        if self.busy.get(ticket.slot) is ticket:
            del self.busy[ticket.slot]
            if drain:
                self.foreign.add(ticket.slot)
                if self.on_drain is not None:
                    self.on_drain()
        self.releases += 1
        self.released[ticket.slot] = self.releases
        if not ticket.pinned:
            self.unpinned_released = self.releases
        if ticket.priority == USER:  # Retry-After speaks of requests, not warmups
            held = self.clock() - ticket.granted_at
            average = self.hold_seconds
            self.hold_seconds = held if average is None else 0.8 * average + 0.2 * held
        ticket.release()
        self.dispatch()

    def leave(self, ticket, outcome=GONE):
        """Take a waiting ticket out of the queue (its client left, or it waited too long)."""
        if ticket.outcome != QUEUED:
            return
        self.queue.remove(ticket)
        self._finish(ticket, outcome)
        self._update_gauges()

    def evacuate(self):
        """Send every waiting user request away (its llama-server went out of routing, and
        another can serve it); warmups stay, for when it is back. How many left."""
        moved = [t for t in self.queue if t.priority == USER]
        for ticket in moved:
            self.leave(ticket, MOVED)
        return len(moved)

    def expire(self):
        """Refuse every user request that has waited longer than max_wait."""
        now = self.clock()
        for ticket in list(self.queue):
            if ticket.priority == USER and now - ticket.arrived >= self.max_wait:
                self.leave(ticket, TIMEOUT)

    def dispatch(self):
        """Grant free slots to waiting tickets, in order; called whenever either changes."""
        for ticket, slot in self._plan():
            self.queue.remove(ticket)
            self._grant(ticket, slot)
        self._update_gauges()

    def _plan(self):
        """The grants to make now, (ticket, slot) in queue order.

        A ticket that waits for its template's busy slot (defers) keeps the free slot it
        would otherwise take from the tickets behind it: its patience costs them nothing
        it would not have taken anyway, and it still has that slot when its patience ends.
        """
        free, plan = self._free(), []
        for ticket in self.queue:
            if not free:
                break
            slot = self._best(ticket, free)
            if slot is None or self._shares(ticket, slot):
                continue  # sharing, it keeps no slot from the tickets behind it
            free.remove(slot)
            if not self._defers(ticket, slot):
                plan.append((ticket, slot))
        return plan

    def _best(self, ticket, free):
        """The free slot a ticket would take, or None if none will do.

        A slot holding the ticket's template; else the coldest: an empty slot or one
        holding a version before an edit, then the least recently used template's, and a
        warmup's that gave way part-way last (it would start over). Of the first two, a
        plain request takes an empty one first (plain requests leave their slots "empty"
        for bioproxy, and llama-server reuses what the next shares with the last one), a
        templated one the old version's (of use to no one).
        """
        if ticket.wanted is not None:
            return ticket.wanted if ticket.wanted in free else None
        if ticket.template is not None:
            for slot in free:
                if self.holding(slot) == ticket.template:
                    return slot
        return min(
            free,
            key=lambda s: (
                self.holding(s) is not None,
                self.slots.partial(s),
                self.slots.stale(s) == (ticket.template is None),
                self.used.get(s, 0.0),
                s,
            ),
        )

    def _defers(self, ticket, slot):
        """Whether a templated ticket waits instead of evicting slot's template: a busy slot
        holds its own, and its patience (PATIENCE s from its arrival) has not run out."""
        held = self.holding(slot)
        if held is None or held == ticket.template or not self.patient(ticket):
            return False
        return any(self.holding(s) == ticket.template for s in set(self.busy) | self.foreign)

    def _shares(self, ticket, slot):
        """Whether a templated ticket waits for a busy slot that will be left holding its
        template version, instead of taking slot, which does not hold it: there a request
        or a warmup of that version runs (its evaluation under way, or its answer), and
        evaluating the template a second time beside it would slow both (the cores are
        shared) for less than waiting costs. Or a slot settling on it (SlotTable.settle).
        Only until its share_until."""
        if ticket.share_until is None or self.clock() >= ticket.share_until:
            return False
        if ticket.digest is None or not self.slots.current(ticket.template, ticket.digest):
            return False  # a version before an edit: no slot will be left holding it
        if self.holding(slot) == ticket.template:
            return False
        version = (ticket.template, ticket.digest)
        if any(held[:2] == version for held in self.slots.settling.values()):
            return True  # a cut answer's slot, free again once llama-server stops there
        if any(self.slots.held.get(s, ())[:2] == version for s in self.foreign):
            return True  # one that settled, not yet seen idle by the watcher's pass
        return any(
            other.pinned and (other.template, other.digest) == version
            for other in self.busy.values()
        )

    def patient(self, ticket):
        """Whether the ticket's patience for its template's slot has not yet run out."""
        return ticket.patient_until is not None and self.clock() < ticket.patient_until

    def _patience_left(self, ticket):
        """Seconds until the ticket's next patience ends (see _defers, _shares), or None."""
        now = self.clock()
        ends = [u - now for u in (ticket.patient_until, ticket.share_until) if u and u > now]
        return min(ends) if ends else None

    def holding(self, slot):
        """The template prefix a slot holds, as far as bioproxy knows, or None."""
        return self.slots.holding(slot)

    def _free(self):
        return [s for s in range(self.slots.count) if s not in self.busy and s not in self.foreign]

    def free_slots(self):
        """The slots no one uses now (for routing between backends)."""
        return self._free()

    def users_waiting(self):
        """User requests waiting: in the queue, and aside before they join it."""
        return sum(1 for t in self.queue if t.priority == USER) + len(self.aside)

    def update_foreign(self, released_before=None):
        """After a refresh of the slots: which are busy without bioproxy knowing why.

        released_before: the value of `releases` when the refresh began. A slot released
        since then may show in that snapshot as still processing its own request.
        """
        since = self.releases if released_before is None else released_before
        foreign = [
            s
            for s in sorted(self.slots.processing)
            if s not in self.busy and self.released.get(s, 0) <= since
        ]
        if self.unpinned_released > since:
            # An unpinned request ended during the read: the slot it ran in may show as
            # processing, and which one that was is not known. The next read will tell.
            foreign = []
        if self.slots.cleared or any(not t.pinned for t in self.busy.values()):
            # Requests go unpinned where llama-server clears idle slots (Backend.pins), and
            # where a template has nothing to restore: llama-server may run one of
            # bioproxy's in any slot, so only processing slots beyond bioproxy's own count
            # are someone else's.
            excess = len(self.slots.processing) - len(self.busy)
            foreign = foreign[: max(excess, 0)]
        self.foreign = set(foreign)
        self.dispatch()

    def forget_foreign(self):
        """No one will read the slots again (the warmer stopped): what llama-server was
        busy with is not known, and no slot is kept from the queue for it."""
        self.foreign.clear()
        self.dispatch()

    def _grant(self, ticket, slot):
        now = self.clock()
        self.busy[slot] = ticket
        self.used[slot] = now
        ticket.grant(slot, now)
        if self.metrics is not None and ticket.priority == USER:
            self.metrics.queue_wait.observe(now - ticket.arrived)

    def _finish(self, ticket, outcome):
        ticket.finish(outcome)
        if self.metrics is not None and outcome in (FULL, TIMEOUT):
            self.metrics.queue_rejections.labels(outcome.value).inc()
        elif self.metrics is not None and outcome == GONE and ticket.priority == USER:
            self.metrics.queue_abandoned.inc()

    def _update_gauges(self):
        if self.metrics is None:
            return
        self.metrics.queue_length.labels(self.name).set(self.users_waiting())
        counts = {}
        for slot in range(self.slots.count):
            state = "busy" if slot in self.busy or slot in self.foreign else "idle"
            key = (self.name, template_of(self.slots.whole(slot) or ""), state)
            counts[key] = counts.get(key, 0) + 1
        occupancy = self.metrics.slots
        for key in self.gauged - counts.keys():  # this backend's only: others share it
            occupancy.remove(*key)
        for key, count in counts.items():
            occupancy.labels(*key).set(count)
        self.gauged = set(counts)

    def forget_gauges(self):
        """Take this scheduler's samples out of the gauges (its backend left the pool)."""
        if self.metrics is None:
            return
        for key in self.gauged:
            self.metrics.slots.remove(*key)
        self.gauged = set()
        self.metrics.queue_length.remove(self.name)

    def invariants(self):
        """Which of the invariants above do not hold now, in words (none, ever)."""
        broken = []
        if any(t.outcome != GRANTED or t.slot != s for s, t in self.busy.items()):
            broken.append("1: a busy slot's ticket is not granted that slot")
        if self.foreign & set(self.busy):
            broken.append("2: a foreign slot is granted")
        order = [(t.priority, t.order) for t in self.queue]
        if any(t.outcome != QUEUED for t in self.queue) or order != sorted(order):
            broken.append("3: the queue holds a ticket not queued, or is out of order")
        if self._plan():
            broken.append("4: a ticket waits while a free slot would take it")
        if self.users_waiting() > self.max_queue:
            broken.append("5: more users wait than max_queue")
        return broken

    def retry_after(self):
        """Seconds a refused client should wait before trying again (1 to 60)."""
        average = self.hold_seconds or 1.0
        slots = max(self.slots.count, 1)
        return max(1, min(60, math.ceil(average * (self.users_waiting() + 1) / slots)))

    def wait_aside(self, ticket, wait):
        """Run wait() with a user's ticket counted among the users waiting (max_queue, the
        queue_length gauge, /status, routing) before it joins the queue: it waits for its
        template's evaluation elsewhere (templated.py). Not when max_queue users wait
        already: it then joins the queue at once. Whether it waited."""
        if self.users_waiting() >= self.max_queue:
            return False
        ticket.arrived = self.clock()
        self.aside.append(ticket)
        self._update_gauges()
        try:
            wait()
        finally:
            self.aside.remove(ticket)
            self._update_gauges()
        return True

    # Waiting, with gevent.

    def acquire(self, ticket):
        """Wait for the ticket's slot and return it.

        Raises QueueFull or QueueTimeout for a user request that cannot have one, and
        BackendOut for one sent away to another llama-server (evacuate()). Warmups
        wait as long as it takes. An exception raised into the wait (the request's
        ClientWatch raises ClientGone when its client leaves) takes the ticket out of the
        queue. The caller must release() the ticket once done with the slot.
        """
        self.submit(ticket)
        try:
            while ticket.outcome == QUEUED:
                timeout = None
                if ticket.priority == USER:
                    timeout = ticket.arrived + self.max_wait - self.clock()
                    if timeout <= 0:
                        self.expire()
                        continue
                patience = self._patience_left(ticket)
                if patience is not None:
                    # It may be deferred: once its patience ends, it takes another slot.
                    timeout = patience if timeout is None else min(timeout, patience)
                if not ticket.event.wait(timeout):
                    self.dispatch()
        except BaseException:
            # Its client left, or it was killed: never leave a ticket queued, nor a slot taken.
            self.leave(ticket, GONE)
            self.release(ticket)
            raise
        if ticket.outcome == GRANTED:
            return ticket.slot
        if ticket.outcome == MOVED:
            raise BackendOut(
                f"llama-server {self.name} went out of routing while the request waited"
            )
        if ticket.outcome == FULL:
            raise QueueFull(
                f"all {self.slots.count} llama-server slots are busy and "
                f"{self.max_queue} requests are already waiting",
                self.retry_after(),
            )
        raise QueueTimeout(
            f"no llama-server slot came free within queue_timeout ({self.max_wait:g} s)",
            self.retry_after(),
        )

    def describe(self):
        """The slots and the queue, for /status."""
        now = self.clock()
        slots = []
        for slot in range(self.slots.count):
            ticket = self.busy.get(slot)
            task = ticket.describe(now) if ticket else None
            if slot in self.foreign:
                task = {"kind": "other", "template": None, "slot": slot, "seconds": None}
            partial = self.slots.partial(slot)
            slots.append(
                {
                    "id": slot,
                    "template": self.slots.whole(slot),
                    # A warmup of that template that gave way: part of it, saved nowhere.
                    "partial": self.holding(slot) if partial else None,
                    "state": "busy" if task else "idle",
                    "task": task,
                }
            )
        queue = [{**t.describe(now), "waits_for": "slot"} for t in self.queue]
        queue += [{**t.describe(now), "waits_for": "evaluation"} for t in self.aside]
        return {"slots": slots, "queue": queue}
