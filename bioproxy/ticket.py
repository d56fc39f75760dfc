"""A request's or a warmup's claim on a slot, and the outcomes it moves through.

QUEUED --grant--> GRANTED --release--> RELEASED
QUEUED --finish--> FULL | TIMEOUT | GONE     (refused, waited too long, left)
QUEUED --finish--> MOVED                     (its llama-server went out of routing)
"""

import enum

from gevent.event import Event

USER, WARMUP = 0, 1  # priorities: a lower one is served first


class Outcome(str, enum.Enum):
    QUEUED = "queued"
    GRANTED = "granted"
    FULL = "full"
    TIMEOUT = "timeout"
    GONE = "gone"
    MOVED = "moved"
    RELEASED = "released"


QUEUED, GRANTED, FULL, TIMEOUT, GONE, MOVED, RELEASED = Outcome
# The outcomes each outcome may move to.
MOVES = {QUEUED: {GRANTED, FULL, TIMEOUT, GONE, MOVED}, GRANTED: {RELEASED}}


class Ticket:
    """One request's claim on a slot, from its arrival to the slot's release."""

    def __init__(self, priority=USER, template=None, slot=None, label=None, digest=None, share=0.0):
        self.priority = priority
        # The key of the cache it needs (a template prefix or a variant key), None for none.
        self.template = template
        self.digest = digest  # the template version it needs (a warmup's: once granted)
        # Seconds it may wait for a busy slot that will be left holding its template
        # version (a request or a warmup of that version runs there) rather than evaluate
        # the template a second time beside it (Scheduler._shares); until share_until.
        self.share = share
        self.share_until = None
        self.wanted = slot  # the one slot it must have (the client named it), or None
        self.label = label or ("warmup" if priority == WARMUP else "request")
        self.outcome = QUEUED
        self.slot = None  # the slot granted
        self.arrived = None  # clock time of submit()
        self.granted_at = None
        self.order = None  # place in arrival order
        # Until when it waits for a busy slot holding its template (Scheduler.PATIENCE).
        self.patient_until = None
        # Sent with id_slot to its slot; unpinned, llama-server may run it in another.
        self.pinned = True
        self.event = Event()  # set when the ticket leaves the queue, whatever the outcome

    def grant(self, slot, now):
        self.slot, self.granted_at = slot, now
        self._move(GRANTED)
        self.event.set()

    def finish(self, outcome):
        """Out of the queue without a slot: FULL, TIMEOUT, GONE or MOVED."""
        self._move(outcome)
        self.event.set()

    def release(self):
        self._move(RELEASED)

    def _move(self, outcome):
        if outcome not in MOVES.get(self.outcome, ()):
            raise RuntimeError(f"a {self.outcome.value} ticket cannot become {outcome.value}")
        self.outcome = outcome

    def describe(self, now):
        since = self.granted_at if self.outcome == GRANTED else self.arrived
        return {
            "kind": self.label,
            "template": self.template,
            "slot": self.slot if self.slot is not None else self.wanted,
            "seconds": round(now - since, 3) if since is not None else None,
        }
