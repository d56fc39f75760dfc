"""A template's head evaluated into a slot in growing pieces, and given up for a user.

llama-server notices a closed connection only between batches, so one long prompt would
keep a user who arrives waiting for all of it. In pieces, cut at line ends about
warmup_piece_chars apart, each reusing the cache of the one before, a user waits for one
piece at most: the gate cancels the evaluation, whose connection is shut.
"""

import contextlib
import time

from .prompts import final_event
from .upstream import BackendError, UpstreamCut, iter_body


class GaveWay(Exception):
    """The evaluation was cancelled: a user request arrived."""


class Superseded(Exception):
    """The template's file changed while it was being evaluated."""


class Evaluation:
    """One template version being evaluated into one slot (while in the gate's runs, a
    user arriving cancels it; with gate None, in the warmup llama-server, nobody does)."""

    def __init__(self, entry, slot, template, prompts, gate):
        self.entry = entry  # the catalog's entry: is_current() tells an edit meanwhile
        self.slot = slot
        self.template = template  # the version evaluated: the file may change meanwhile
        self.prompts = prompts
        self.gate = gate
        self.response = None  # the upstream response of the piece under way
        self.cancelled = False
        self.started = time.monotonic()
        self.done = 0  # characters of the head in pieces llama-server finished
        self.resumed = None  # resumed after done: the tokens llama-server reused then

    @property
    def seconds(self):
        return time.monotonic() - self.started

    def cancel(self):
        self.cancelled = True
        if self.response is not None:
            # shutdown(), not close(): the warmer's greenlet is reading from it, and gets
            # the end of the stream; closing under a reader raises in the caller.
            # Closed already (ValueError: urllib3 has no socket to shut).
            with contextlib.suppress(OSError, ValueError):
                self.response.raw.shutdown()

    def run(self, head, piece_chars, in_one_piece=False, after=0):
        """Evaluate head: (its tokens, tokens evaluated); GaveWay, Superseded, BackendError.

        in_one_piece: the slot holds it already (a save failed after it), and a shorter
        piece would cut the slot's cache back to that piece, the rest evaluated again.
        after: the slot holds the pieces up to that many characters (a warmup that gave
        way): it goes on from the next one, which extends them.
        """
        cuts = cuts_of(head, piece_chars)
        if in_one_piece:
            cuts = cuts[-1:]
        elif after:
            cuts = [cut for cut in cuts if cut > after]
            self.done = after  # held already: kept if it gives way again in its first piece
        evaluated = 0
        for cut in cuts:
            answer = self._piece(head[:cut])
            timings = answer.get("timings", {})
            evaluated += timings.get("prompt_n", 0)
            if after and self.resumed is None:
                self.resumed = timings.get("cache_n", 0)
            self.done = cut
        return int(answer["tokens_evaluated"]), evaluated

    def _piece(self, text):
        """Evaluate one piece; llama-server's last event."""
        self._check()
        self.response = response = self.prompts.open_completion(self.slot, text)
        try:
            self._check()  # a user came while the call was being made
            return final_event(b"".join(iter_body(response)))
        except (BackendError, UpstreamCut, ValueError):
            self._check()  # the end of a stream shut for a user, or an edit
            raise
        finally:
            self.response = None
            response.close()  # if left unread: llama-server stops once it sees it closed

    def _check(self):
        if not self.cancelled and self.gate is not None and self.gate.holds_off():
            self.cancel()
        if not self.entry.is_current(self.template):
            raise Superseded()
        if self.cancelled:
            raise GaveWay()


def cuts_of(text, size):
    """Ends of growing prefixes of text, about size apart, at line ends when there are any."""
    cuts, start = [], 0
    while start + size < len(text):
        end = text.find("\n", start + size)
        if end < 0:
            break
        cuts.append(end + 1)
        start = end + 1
    return [*cuts, len(text)] if not cuts or cuts[-1] != len(text) else cuts
