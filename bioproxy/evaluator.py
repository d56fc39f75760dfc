"""A second llama-server that evaluates the warmups, so that no user shares a batch with one.

In the serving llama-server's own slots, a user who arrives during a warmup waits for
what is left of the warmup's batch, and at the end of a long template a single token
costs more than a short request's whole time to first token on an idle server (measured:
docs/SCHEDULING.md). No piece size keeps users within 1.5x there. A second llama-server,
started like the first (same binary, model, flags and slot folder) at the lowest CPU
priority, evaluates each template and saves its slot to the shared folder; the serving
llama-server restores the file, in milliseconds. bioproxy uses it only while its model
identity (slot_table.model_identity) is the serving one's: a file from another build,
model or slot layout would not restore.
"""

import logging
import time
from contextlib import contextmanager, nullcontext

from gevent.event import Event
from gevent.lock import Semaphore

from .prompts import Prompts
from .slot_api import SlotApi
from .slot_table import model_identity
from .upstream import BackendError

log = logging.getLogger(__name__)

PAUSE = 60.0  # seconds without it after an evaluation or a save there failed


class Evaluator:
    """The warmup llama-server at upstream's URL; one evaluation at a time, in slot 0."""

    SLOT = 0

    def __init__(self, upstream, slot_timeout, timeout, hold=None):
        self.upstream = upstream
        self.hold = hold  # a Hold (hold.py) when bioproxy knows its process, or None
        self.api = SlotApi(upstream, slot_timeout)
        self.prompts = Prompts(upstream, timeout, slot_timeout)
        self.lock = Semaphore()
        self.problem = "not asked yet"  # why it was not used last time, or None
        self.disabled = None  # set for good when its files did not restore (see refuse)
        self.paused = None  # (until when, why) after a failure there
        # The evaluation under way there: (prefix, digest, set when it ends), or None.
        self.current = None
        self.waited = 0  # requests that waited for an evaluation there rather than evaluate it

    def usable(self, model):
        """Whether it can evaluate for a serving llama-server whose identity is model."""
        if self.disabled:
            return self._tell(self.disabled)
        if self.paused and time.monotonic() < self.paused[0]:
            return self._tell(self.paused[1])
        try:
            props, slots = self.api.fetch_slots()
            identity = model_identity(props, slots)
        except BackendError as e:
            return self._tell(f"it does not answer ({e})")
        except Exception as e:  # an answer of another shape than llama-server's
            return self._tell(f"its /props or /slots cannot be read ({e!r})")
        if model is None or identity != model:
            return self._tell("its model, build or slots are not the serving llama-server's")
        return self._tell(None)

    @contextmanager
    def evaluating(self, prefix, template):
        """While it evaluates (and saves) this template version; see wait_for()."""
        self.current = (prefix, template.digest, Event())
        try:
            yield
        finally:
            self.current[2].set()
            self.current = None

    def held(self):
        """While it computes: its process may be stopped for users (see hold.py). Not while
        it saves, which has slot_timeout to answer in."""
        return self.hold.evaluation() if self.hold else nullcontext()

    def evaluates(self, prefix, template):
        """Whether it evaluates this template version now."""
        current = self.current
        return current is not None and current[:2] == (prefix, template.digest)

    def wait_for(self, prefix, template, timeout):
        """If it is evaluating this template version now, wait until it is done (at most
        timeout s): whether the request waited.

        A templated request that arrives meanwhile would otherwise have the serving
        llama-server evaluate the same text in full, beside every other user, while the
        warmup llama-server, at the lowest priority, barely moves: after the wait its
        saved file is restored in milliseconds. If it failed, the request goes on cold.
        """
        current = self.current
        if not self.evaluates(prefix, template):
            return False
        self.waited += 1
        current[2].wait(timeout)
        return True

    def refuse(self, why):
        """Stop using it while bioproxy runs (its saved slot did not restore)."""
        self.disabled = why
        self._tell(why)

    def pause(self, why):
        """Leave the warmups to the serving llama-server for a while (a failure there)."""
        self.paused = (time.monotonic() + PAUSE, f"{why}; tried again in {PAUSE:g} s")
        self._tell(self.paused[1])

    def close(self):
        self.upstream.close()
        if self.hold is not None:
            self.hold.close()

    def held_for_user(self):
        """While a user's request waits for its answer's first byte from the serving one."""
        return self.hold.user() if self.hold else nullcontext()

    def describe(self):
        usable = self.problem is None
        return {
            "url": self.upstream.base_url,
            "usable": usable,
            "problem": self.problem,
            "evaluating": self.current and self.current[0],
            "requests_waited": self.waited,
            "hold": self.hold and self.hold.describe(),
        }

    def _tell(self, problem):
        """Log a change of whether it is used; whether it can be."""
        if problem != self.problem:
            if problem is None:
                log.info("warmups are evaluated by the llama-server at %s", self.upstream.base_url)
            else:
                log.warning(
                    "warmup llama-server %s not used: %s; warmups go to llama-server's own slots",
                    self.upstream.base_url,
                    problem,
                )
        self.problem = problem
        return problem is None
