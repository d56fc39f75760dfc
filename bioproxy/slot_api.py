"""llama-server's slot API, over HTTP: reading the slots, saving and restoring them.

Its answers are mapped here, once, to a few named errors: the rest of bioproxy never
looks at a status code of the slot API.
"""

import logging

import requests

from .slot_table import slot_states
from .upstream import BackendError

log = logging.getLogger(__name__)


class SlotsUnsupported(BackendError):
    """501: this llama-server cannot save or restore (started without --slot-save-path)."""


class SlotFileRejected(BackendError):
    """400: llama-server cannot use the file (missing, corrupt, from another build)."""


class IsRouter(BackendError):
    """GET /props says role "router": llama-server in router mode, its models behind it."""


class SlotsHidden(BackendError):
    """GET /slots answers 501: llama-server was started with --no-slots."""


class SlotBusy(BackendError):
    """The action did not end in time: llama-server runs it only once the slot is idle."""


class SlotApi:
    """The slot calls bioproxy makes itself, each bounded by timeout seconds."""

    def __init__(self, upstream, timeout):
        self.upstream = upstream
        self.timeout = timeout

    def fetch_slots(self):
        """(GET /props, GET /slots), or BackendError."""
        props = self.upstream.call("GET", "/props", timeout=self.timeout)
        if isinstance(props, dict) and props.get("role") == "router":
            # Its own /props: it would answer /slots 400, "model name is missing".
            raise IsRouter("GET /props", "this llama-server is a router (several models)")
        try:
            slots = self.upstream.call("GET", "/slots", timeout=self.timeout)
        except BackendError as e:
            if e.status == 501:
                raise SlotsHidden(e.call, e.reason, e.status) from e
            raise
        return props, slots

    def fetch_states(self):
        """Every slot's state (see slot_table.slot_states), or {} if llama-server cannot say."""
        try:
            slots = self.upstream.call("GET", "/slots", timeout=self.timeout)
        except BackendError as e:
            log.warning("cannot read slots: %s", e)
            return {}
        return slot_states(slots)

    def save(self, slot, filename):
        """Save the slot's cache to llama-server's slot folder; the tokens saved."""
        return self._action(slot, "save", filename)["n_saved"]

    def restore(self, slot, filename):
        """Load a saved cache into the slot; the tokens restored."""
        return self._action(slot, "restore", filename)["n_restored"]

    def _action(self, slot, action, filename):
        # llama-server queues slot actions until the slot is idle: bounded by our timeout.
        try:
            return self.upstream.call(
                "POST", f"/slots/{slot}?action={action}", {"filename": filename}, self.timeout
            )
        except BackendError as e:
            named = _named(e)
            if named is None:
                raise
            raise named(e.call, e.reason, e.status) from e


def _named(error):
    """The named error class for a slot API failure, or None for any other."""
    if error.status == 501:
        return SlotsUnsupported
    if error.status == 400:
        return SlotFileRejected
    if error.status is None and isinstance(error.__cause__, requests.Timeout):
        return SlotBusy
    return None
