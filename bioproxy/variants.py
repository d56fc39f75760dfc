"""A template with what a client renders before it: a system message, tools, earlier turns.

A conversation that opens with a templated message after a system message of the
client's (or with tools, or anything else llama-server renders before the user's words)
begins with another prompt than the template's own, which no warmed cache of the
template begins. Each such shape is a variant of the template, known by the text
llama-server renders before the user's words (its head, asked of `/apply-template`) and
the model: another system message, an edited template or another model is another
variant, so a stale one is never restored.

The first request of a variant is evaluated in full in its slot and reported cold;
once answered, that slot is saved to a file of the variant's own, and later requests
find it in its slot or have it restored, as a template's. The files are bounded by
variant_budget_bytes, the least recently used deleted first.
"""

import hashlib
import json
import logging
import time
from collections import OrderedDict

import gevent
from gevent.pool import Pool

from .prompts import SENTINEL, template_body
from .scheduler import WARMUP, Ticket
from .slot_table import template_of
from .upstream import BackendError

log = logging.getLogger(__name__)

# Keys of a chat request that only steer sampling or the answer's form: left out of the
# shape, so that requests differing only in them share one /apply-template answer. Any
# other key is kept: what llama-server renders from it (tools, chat_template_kwargs...)
# shows in the head it answers with.
NOT_RENDERED = frozenset(
    {
        "messages",
        "model",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "typical_p",
        "max_tokens",
        "max_completion_tokens",
        "n_predict",
        "n",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
        "repeat_last_n",
        "logprobs",
        "top_logprobs",
        "n_probs",
        "logit_bias",
        "user",
        "id_slot",
        "cache_prompt",
        "samplers",
        "timings_per_token",
        "return_progress",
    }
)
MAX_HEADS = 256  # request shapes whose rendered head is remembered
MAX_KNOWN = 1024  # variants remembered in memory (their saved files are on disk)
SAVE_WAIT = 60.0  # seconds a save waits for its slot before giving up


def shape_of(match, template):
    """What llama-server renders before the user's words, as a body for /apply-template,
    or None when that is the template's own head alone.

    The conversation's messages before its templated opening message, that message with
    the template around SENTINEL (and none of its parts after the text), and every key of
    the body that may render.
    """
    body = match.body
    messages = body["messages"]
    index = match.opening
    holder, key = match.places[0][:2]
    opening = messages[index]
    text = template.render(SENTINEL)
    if holder is opening:
        message = {**opening, key: text}
    else:
        parts = opening["content"]
        cut = next(n for n, part in enumerate(parts) if part is holder)
        message = {**opening, "content": [*parts[:cut], {**holder, key: text}]}
    rest = {k: v for k, v in body.items() if k not in NOT_RENDERED}
    if index == 0 and not rest and message == {"role": "user", "content": text}:
        return None
    return {**rest, "messages": [*messages[:index], message]}


def variant_key(prefix, head, model):
    """The variant's name: its template's prefix and a hash of its head and model.

    Prefixes hold no spaces, so no prefix is ever taken for a variant's key.
    """
    digest = hashlib.sha256(f"{model}\n{head}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix} {digest[:16]}"


class Variant:
    """One variant of a template, as far as this bioproxy has seen it."""

    def __init__(self, key, prefix, digest, tokens, saved):
        self.key = key
        self.prefix = prefix
        self.digest = digest  # of the template version its head holds
        self.tokens = tokens  # of its head
        self.uses = 0  # templated requests served with it since bioproxy started
        self.had_file = saved  # a saved file was there when bioproxy first saw it
        self.requests = {"slot": 0, "restored": 0, "server": 0, "cold": 0}

    @property
    def new(self):
        """Never served, nothing saved: its first request is evaluated in full."""
        return self.uses == 0 and not self.had_file

    def count_request(self, cache):
        self.uses += 1
        self.requests[cache] += 1


class Variants:
    """The variants of one llama-server's templates: found, restored, saved, evicted."""

    def __init__(self, backend, budget):
        self.backend = backend
        self.budget = budget  # bytes of slot files variants may take; 0: never saved
        self.heads = OrderedDict()  # digest of a shape and model -> the head rendered
        self.known = OrderedDict()  # key -> Variant, the most recently used last
        self.saving = set()  # keys with a save under way
        self.pool = Pool()
        self.told = set()  # what was logged once

    def find(self, entry, template, match):
        """(key, variant) for a templated request that opened its conversation.

        The key is the slot's: the template's prefix when only the template renders before
        the user's words (variant None), else the variant's. (None, None) when
        llama-server cannot say how it renders the request: served as a plain request.
        """
        shape = shape_of(match, template)
        if shape is None:
            return entry.prefix, None
        model = self.backend.slots.table.model
        if model is None:
            return None, None  # llama-server not seen yet: the request is not placed anyway
        try:
            head = self._head(shape, model)
            if head == self._head(template_body(template), model):
                return entry.prefix, None
        except BackendError as e:
            self._tell("head", "cannot render a request's head, served as plain: %s", e)
            return None, None
        key = variant_key(entry.prefix, head, model)
        variant = self.known.get(key)
        if variant is None or variant.digest != template.digest:
            saved = self.saved(key, template)
            try:
                tokens = saved.get("head_tokens") if saved else None
                tokens = tokens or self._tokens(head)
            except BackendError as e:
                self._tell("tokens", "cannot count a variant's tokens, served as plain: %s", e)
                return None, None
            variant = Variant(key, entry.prefix, template.digest, tokens, saved is not None)
            self.known[key] = variant
            while len(self.known) > MAX_KNOWN:
                self.known.popitem(last=False)
        self.known.move_to_end(key)
        return key, variant

    def _head(self, shape, model):
        text = json.dumps(shape, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(f"{model}\n{text}".encode("utf-8", "surrogatepass")).digest()
        head = self.heads.get(digest)
        if head is None:
            head = self.backend.prompts.render_head(shape)
            self.heads[digest] = head
            while len(self.heads) > MAX_HEADS:
                self.heads.popitem(last=False)
        self.heads.move_to_end(digest)
        return head

    def _tokens(self, head):
        answer = self.backend.upstream.call(
            "POST", "/tokenize", {"content": head, "add_special": True}
        )
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise BackendError("POST /tokenize", "the answer holds no tokens")
        return len(tokens)

    def saved(self, key, template):
        """The saved entry of a variant for this template version and model, or None."""
        return self.backend.caches.registry.find(
            key, template.digest, self.backend.slots.table.model
        )

    def restore_for_request(self, variant, entry, template, slot):
        """Load the variant's saved file into the slot: "restored", "cold" (pinned, it
        fills the slot), or "server" when nothing is saved and llama-server clears idle
        slots (unpinned, its RAM cache may hold it)."""
        caches = self.backend.caches
        saved = self.saved(variant.key, template)
        if saved is None:
            return "cold" if self.backend.pins() else "server"
        return caches.restore_for_request(entry, None, template, slot, variant)

    def used(self, variant, template):
        """A request used the variant: its saved file is the most recently used now."""
        saved = self.saved(variant.key, template)
        if saved is not None:
            saved["last_used"] = time.time()

    def after_answer(self, variant, template, slot):
        """A pinned request of the variant succeeded in the slot: save it, if not yet."""
        if self.budget <= 0 or variant.key in self.saving:
            return
        caches = self.backend.caches
        if caches.unsupported or self.saved(variant.key, template) is not None:
            return
        if not caches.registry.slot_save_path:
            # Without the folder bioproxy cannot delete files, so it cannot keep the budget.
            self._tell(
                "folder",
                "variants (templates with a system message, tools...) are not saved: set "
                "slot_save_path to llama-server's --slot-save-path folder, which bioproxy "
                "must reach to keep them within variant_budget_bytes",
            )
            return
        self.saving.add(variant.key)
        self.pool.spawn(self._save, variant, template, slot)

    def _save(self, variant, template, slot):
        """Save the slot to the variant's file once no user needs it, if it still holds it."""
        backend = self.backend
        ticket = Ticket(WARMUP, variant.key, slot, label="variant save")
        try:
            with gevent.Timeout(SAVE_WAIT, False):
                backend.scheduler.acquire(ticket)
            if ticket.slot is None:
                return
            try:
                if backend.slots.holds(slot, variant.key, template.digest):
                    backend.caches.save_variant(variant, template, slot)
                    evicted = backend.caches.registry.evict_variants(self.budget, variant.key)
                    for key in evicted:
                        backend.metrics.variant_evictions.labels(template_of(key)).inc()
                        log.info("variant %s evicted: beyond variant_budget_bytes", key)
            finally:
                backend.scheduler.release(ticket)
        except BackendError as e:
            log.warning("saving variant %s failed: %s", variant.key, e)
        except Exception:
            log.exception("saving variant %s failed", variant.key)
        finally:
            self.saving.discard(variant.key)

    def did_not_hold(self, variant, template, reused):
        """A request restored from the variant's file reused less than its head: forget it."""
        log.warning(
            "variant %s was restored for a request, yet llama-server reused only %d of its "
            "%s tokens: its saved file is not used again",
            variant.key,
            reused,
            variant.tokens,
        )
        saved = self.saved(variant.key, template)
        if saved is not None:
            self.backend.caches.registry.forget(variant.key, saved["file"])

    def prune(self, prefix, template):
        """The template changed: forget the saved variants of its other versions."""
        registry = self.backend.caches.registry
        for key, saved in list(registry.entries.items()):
            if saved.get("template") == prefix and saved["digest"] != template.digest:
                registry.forget(key)

    def describe(self, prefix):
        """The template's variants, saved or seen, for /templates."""
        registry, found = self.backend.caches.registry, {}
        for key, saved in registry.entries.items():
            if saved.get("template") == prefix:
                found[key] = {
                    "key": key,
                    "tokens": saved.get("head_tokens"),
                    "saved_file": saved["file"],
                    "bytes": saved.get("size"),
                    "last_used": saved.get("last_used"),
                    "requests": None,
                }
        for key, variant in self.known.items():
            if variant.prefix == prefix:
                shown = found.setdefault(
                    key,
                    {"key": key, "tokens": variant.tokens, "saved_file": None, "bytes": None},
                )
                shown["requests"] = dict(variant.requests)
        return sorted(found.values(), key=lambda v: v["key"])

    def close(self):
        self.pool.kill()

    def _tell(self, what, message, *args):
        if what not in self.told:
            self.told.add(what)
            log.warning(message + " (logged once)", *args)
