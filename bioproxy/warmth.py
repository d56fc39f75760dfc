"""How warm one template is in one llama-server: its states and their transitions.

    PENDING --text read--> STALE --warmup--> WARMING --saved--> WARM
    WARM --edit, restart, unusable file, admin--> STALE
    WARMING --user arrives--> STALE          (it gave way, warmed again when idle)
    STALE, WARMING --failure--> FAILED       (tried again after a pause that doubles)
    FAILED --pause over--> due again         (a restart does not cut the pause short)

A restore goes straight from STALE to WARM. A broken template keeps its state here; the
catalog says it is broken, and nothing is due until its text can be read again.
"""

import enum

MAX_PAUSE = 600  # seconds: the longest pause before a failed template is tried again
# An evaluation whose time is not known yet is weighed at SECONDS_PER_TOKEN a token of the
# template, or at UNKNOWN_EVALUATION seconds when its length is not known either.
SECONDS_PER_TOKEN = 0.002
UNKNOWN_EVALUATION = 10.0


class State(str, enum.Enum):
    PENDING = "pending"
    STALE = "stale"
    WARMING = "warming"
    WARM = "warm"
    FAILED = "failed"


class Warmth:
    """One template's cache in one llama-server."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.state = State.PENDING
        self.tokens = None  # tokens of the warmed prefix
        self.last_warmup = None  # what /templates shows of the last warmup or restore
        self.evaluation_seconds = None  # what its last whole evaluation here took
        self.forced = False  # evaluate again even though a saved file exists
        # An evaluation that gave way: (slot, digest, characters done), to resume from.
        self.partial = None
        self.failures = 0  # failed warmups in a row
        self.retry_at = 0.0  # no new try before this time.monotonic()
        # Templated requests by cache, as measured (see lease.Lease).
        self.requests = {"slot": 0, "restored": 0, "server": 0, "cold": 0}
        self.missed = set()  # the expectations found wrong (slot, restored), logged once

    def evaluation_estimate(self):
        """Seconds an evaluation of the template takes here, as far as bioproxy knows."""
        if self.evaluation_seconds is not None:
            return self.evaluation_seconds
        return self.tokens * SECONDS_PER_TOKEN if self.tokens else UNKNOWN_EVALUATION

    def due(self, now):
        """Whether a warmup should start now."""
        if self.state == State.FAILED:
            return now >= self.retry_at
        return self.state == State.STALE

    def mark_stale(self, forced=False):
        """Warm it again: its text changed, its file is unusable, or it gave way to a user.

        forced: evaluate it, even if a file is saved for it (the admin port asked).
        """
        self.state = State.STALE
        self.forced = self.forced or forced

    def mark_restarted(self):
        """llama-server restarted: warm again, but a failed template keeps its pause
        (a warmup that crashed llama-server must not crash it again as soon as it is back)."""
        if self.state != State.FAILED:
            self.state = State.STALE

    def mark_warming(self):
        self.state = State.WARMING

    def mark_warm(self, tokens, last_warmup, current=True):
        """Evaluated (and saved). current: the text evaluated is still the template's; if
        not, the file saved is kept for its own text, and the new text is warmed next."""
        self.last_warmup = last_warmup
        self.forced, self.failures = False, 0
        if current:
            self.tokens, self.state = tokens, State.WARM

    def mark_restored(self, tokens, last_warmup):
        """Its saved cache was restored into a slot (an evaluation asked for stays asked)."""
        self.tokens, self.state, self.failures = tokens, State.WARM, 0
        self.last_warmup = last_warmup

    def mark_failed(self, now, error, interval, at):
        """Not warm: tried again after a pause that doubles with each failure in a row."""
        self.failures += 1
        self.retry_at = now + min(interval * 2**self.failures, MAX_PAUSE)
        self.state = State.FAILED
        self.last_warmup = {"at": at, "outcome": "failed", "error": str(error)}

    def count_request(self, cache):
        self.requests[cache] += 1
