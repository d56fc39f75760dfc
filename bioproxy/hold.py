"""Users first on one machine: the warmup llama-server stopped while a user's prompt runs.

At nice 19 (its session's too) the warmup llama-server still costs the users of the
serving one: both compute on the same cores, caches and memory, and a user's prompt took
up to 3.9x its idle time at p95 beside a warmup (docs/BENCHMARKS.md). When bioproxy knows
its process (warmup_backend_pid, which the bioproxy command sets for the one it starts),
it stops it (SIGSTOP) while it evaluates a template and a user waits for the first byte
of an answer from the serving llama-server, and continues it (SIGCONT) as soon as none
does. Stopped, its threads keep what they hold and its connections stay open: the
evaluation goes on where it was, with its read timeout (upstream_timeout) counted as usual.
A user's whole wait, not the generation after it: a non-streamed answer's first byte is
its end. Never longer than HOLD_MAX at a stretch, so a queue of long prompts cannot
starve a warmup for good, and never more than budget seconds in all for one evaluation
(half its read timeout), so that steady traffic with short gaps cannot keep it stopped
until its read times out.
"""

import logging
import os
import signal
import time
from contextlib import contextmanager
from itertools import pairwise

import gevent

log = logging.getLogger(__name__)

HOLD_MAX = 60.0  # seconds stopped at a stretch; then it runs until no user waits


class Hold:
    """The warmup llama-server's process, stopped while it evaluates and a user waits."""

    def __init__(self, pid, port, budget=None):
        self.pid = pid
        self.budget = budget  # seconds stopped in all for one evaluation (None: no limit)
        self.spent = 0.0  # of it, for the evaluation under way
        self.fd = None  # a pidfd: a signal never reaches another process that got its pid
        self.problem = None  # why it is never stopped, or None
        self.waiting = 0  # users waiting for their answer's first byte
        self.evaluating = False
        self.expired = False  # stopped HOLD_MAX: left running until no user waits
        self.stopped_at = None  # when it was stopped, while it is
        self.timer = None
        self.holds = 0  # times stopped
        self.held_seconds = 0.0
        self._open(pid, port)
        self._signal(signal.SIGCONT)  # a worker before this one may have died holding it

    def _open(self, pid, port):
        """Take hold of the process, once it is known to be the warmup llama-server."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError as e:
            self.problem = f"process {pid} cannot be read ({e.strerror})"
            return
        port = str(port).encode()
        if not any(a == b"--port" and b == port for a, b in pairwise(args)):
            self.problem = f"process {pid} is not a llama-server on port {port.decode()}"
            return
        try:
            self.fd = os.pidfd_open(pid)
        except OSError as e:
            self.problem = f"process {pid} cannot be signalled ({e.strerror})"

    @contextmanager
    def user(self):
        """While a user's request waits for the first byte of its answer."""
        self.waiting += 1
        self._apply()
        try:
            yield
        finally:
            self.waiting -= 1
            if self.waiting == 0:
                self.expired = False
            self._apply()

    @contextmanager
    def evaluation(self):
        """While the warmup llama-server evaluates a template."""
        self.evaluating, self.spent = True, 0.0
        self._apply()
        try:
            yield
        finally:
            self.evaluating = False
            self._apply()

    def close(self):
        """Leave it running (the worker stops)."""
        self.waiting, self.evaluating = 0, False
        self._apply()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def stopped(self):
        return self.stopped_at is not None

    def describe(self):
        return {
            "pid": self.pid,
            "problem": self.problem,
            "stopped": self.stopped,
            "holds": self.holds,
            "held_seconds": round(self.held_seconds, 3),
        }

    def _apply(self):
        left = HOLD_MAX if self.budget is None else min(HOLD_MAX, self.budget - self.spent)
        want = self.evaluating and self.waiting > 0 and not self.expired and left > 0
        want = want and self.fd is not None
        if want == self.stopped:
            return
        if want and self._signal(signal.SIGSTOP):
            self.stopped_at = time.monotonic()
            self.holds += 1
            self.timer = gevent.spawn_later(left, self._expire)
        elif not want:
            self._continue()

    def _continue(self):
        """Let it run again: the seconds it was stopped for (0 if it was not)."""
        self._signal(signal.SIGCONT)
        if self.timer is not None:
            self.timer.kill(block=False)
            self.timer = None
        if self.stopped_at is not None:
            seconds = time.monotonic() - self.stopped_at
            self.held_seconds += seconds
            self.spent += seconds
            self.stopped_at = None
            return seconds
        return 0.0

    def _expire(self):
        self.timer = None  # this greenlet: not killed by _continue
        self.expired = True
        seconds = self._continue()
        spent = self.budget is not None and self.spent >= self.budget
        log.warning(
            "the warmup llama-server runs again after %.3g s stopped for users%s",
            seconds,
            " (all this evaluation may be stopped)" if spent else "",
        )

    def _signal(self, number):
        """Send the signal; whether it went (a process that ended is never held again)."""
        if self.fd is None:
            return False
        try:
            signal.pidfd_send_signal(self.fd, number)
            return True
        except OSError as e:
            self.problem = f"process {self.pid} cannot be signalled ({e.strerror})"
            log.warning("the warmup llama-server is no longer stopped for users: %s", self.problem)
            os.close(self.fd)
            self.fd = None
            self.stopped_at = None
            return False
