"""A template with what a client renders before it: a system message, tools, earlier turns.

A conversation that opens with a templated message after a system message of the
client's (or with tools, or anything else llama-server renders before the user's words)
begins with another prompt than the template's own, which no warmed cache of the
template begins. Each such shape is a variant of the template, known by the text
llama-server renders before the user's words (its head, asked of `/apply-template`) and
the model: another system message, an edited template or another model is another
variant, so a stale one is never restored.

The first request of a variant is reported cold: in its slot, the head is evaluated
first, on its own, and saved to the variant's file; then the request goes on, reusing it.
Later requests find the variant in its slot or have it restored, as a template's. The
files hold the head alone (no user's words) and are bounded by variant_budget_bytes, the
least recently used deleted first.
"""

import hashlib
import json
import logging
import time
from collections import OrderedDict

from .prompts import SENTINEL, template_body
from .slot_table import template_of, variant_key
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
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
        "xtc_probability",
        "xtc_threshold",
        "top_n_sigma",
        "dynatemp_range",
        "dynatemp_exponent",
        "ignore_eos",
        "n_keep",
        "t_max_predict_ms",
        "grammar",
        "post_sampling_probs",
        "response_fields",
        "return_tokens",
    }
)
SAVE_RETRY = 60.0  # seconds before a variant whose save failed is tried again
MAX_HEAD_CHARS = 16_000_000  # characters of rendered heads remembered, all shapes together
MAX_KNOWN = 1024  # variants remembered in memory (their saved files are on disk)
TOUCH_EVERY = 60.0  # seconds: how stale a saved variant's last use may be in saved.json
# Turns appended after the templated message to check that later turns leave the head as
# it is (a chat template may render a system message or tools before the last user turn).
LATER_TURNS = [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "More."}]


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
    rest = {k: v for k, v in body.items() if k not in NOT_RENDERED}
    if index == 0 and not rest and holder is opening and opening.keys() == {"role", "content"}:
        return None  # told before rendering: most templated requests are this one
    text = template.render(SENTINEL)
    if holder is opening:
        message = {**opening, key: text}
    else:
        parts = opening["content"]
        cut = next(n for n, part in enumerate(parts) if part is holder)
        message = {**opening, "content": [*parts[:cut], {**holder, key: text}]}
    return {**rest, "messages": [*messages[:index], message]}


class Variant:
    """One variant of a template, as far as this bioproxy has seen it."""

    def __init__(self, key, prefix, digest, tokens):
        self.key = key
        self.prefix = prefix
        self.digest = digest  # of the template version its head holds
        self.tokens = tokens  # of its head, as llama-server tokenizes it
        self.requests = {"slot": 0, "restored": 0, "server": 0, "cold": 0}
        self.missed = set()  # the expectations found wrong, logged once each
        self.unsaved = False  # its file would not fit the budget: not saved again
        self.retry_at = 0.0  # after a failed save, not saved again before this monotonic time
        self.preparing = False  # a request is evaluating and saving its head

    def count_request(self, cache):
        self.requests[cache] += 1


class Found:
    """What Variants.find() tells of a templated request: the key of the cache it reuses
    (None: none, served as plain), its variant if any, and the variant's head."""

    def __init__(self, key, variant=None, head=None):
        self.key, self.variant, self.head = key, variant, head


class Variants:
    """The variants of one llama-server's templates: found, saved, restored, evicted."""

    def __init__(self, backend, budget):
        self.backend = backend
        self.budget = budget  # bytes of slot files variants may take; 0: never saved
        self.heads = OrderedDict()  # digest of a shape and model -> head, or None: unstable
        self.head_chars = 0
        self.known = OrderedDict()  # key -> Variant, the most recently used last
        self.told = set()  # what was logged once
        self.unreadable = False  # bioproxy could not read a file it saved: none saved

    def find(self, entry, template, match):
        """The cache a templated request that opened its conversation can reuse.

        The template's own when only the template renders before the user's words, else
        its variant's. None for the key when llama-server cannot say how it renders the
        request, or renders its head otherwise once the conversation goes on: served as
        a plain request.
        """
        shape = shape_of(match, template)
        if shape is None:
            return Found(entry.prefix)
        model = self.backend.slots.table.model
        if model is None:
            return Found(None)  # llama-server not seen yet: the request is not placed anyway
        try:
            head = self._head(shape, model)
            own = self._head(template_body(template), model, later=False)
            if head is not None and head == own:
                return Found(entry.prefix)
        except BackendError as e:
            self._tell("head", "cannot render a request's head: %s", e)
            # With no message before it, the template's own cache may still apply: its
            # answer's timings will tell.
            return Found(entry.prefix if match.opening == 0 else None)
        if head is None:
            self._tell(
                "unstable",
                "the chat template renders what comes before a templated message otherwise "
                "once the conversation goes on (a system message or tools before the last "
                "turn): such requests are served as plain",
            )
            return Found(None)
        key = variant_key(entry.prefix, head, model)
        variant = self._known(key, template)
        if variant is None:
            saved = self.backend.caches.find(key, template)
            try:
                tokens = (saved or {}).get("head_tokens") or self.backend.prompts.count(head)
            except BackendError as e:
                self._tell("tokens", "cannot count a variant's tokens, served as plain: %s", e)
                return Found(None)
            # Another request may have made it while this one counted.
            variant = self._known(key, template)
            if variant is None:
                variant = Variant(key, entry.prefix, template.digest, tokens)
                self.known[key] = variant
            while len(self.known) > MAX_KNOWN:
                self.known.popitem(last=False)
        self.known.move_to_end(key)
        return Found(key, variant, head)

    def _known(self, key, template):
        """The Variant remembered for this key and template version, or None."""
        variant = self.known.get(key)
        return variant if variant is not None and variant.digest == template.digest else None

    def _head(self, shape, model, later=True):
        """The head llama-server renders for a shape, remembered. later: None if it
        renders otherwise once more turns follow."""
        text = json.dumps([shape, later], sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(f"{model}\n{text}".encode("utf-8", "surrogatepass")).digest()
        if digest in self.heads:
            self.heads.move_to_end(digest)
            return self.heads[digest]
        prompts = self.backend.prompts
        head = prompts.render_head(shape)
        if later:
            longer = {**shape, "messages": [*shape["messages"], *LATER_TURNS]}
            if prompts.render_head(longer) != head:
                head = None
        self.heads[digest] = head
        self.head_chars += len(head or "")
        while self.head_chars > MAX_HEAD_CHARS and len(self.heads) > 1:
            _, dropped = self.heads.popitem(last=False)
            self.head_chars -= len(dropped or "")
        return head

    def prepare(self, found, entry, template, slot):
        """The first request of a variant with nothing saved, in its slot: evaluate the
        head there alone, and save it, before the request goes on. "cold" either way
        (the head was evaluated for it); a failure leaves the request to evaluate it."""
        variant = found.variant
        variant.preparing = True
        try:
            if self._evaluate_and_save(found, entry, template, slot):
                self._keep_budget(variant, template)
        finally:
            variant.preparing = False
        return "cold"

    def _evaluate_and_save(self, found, entry, template, slot):
        """prepare()'s work: whether the head was evaluated in the slot and saved."""
        variant, backend = found.variant, self.backend
        try:
            answer = backend.prompts.complete(slot, found.head)
            timings = (answer if isinstance(answer, dict) else {}).get("timings") or {}
            evaluated, reused = timings.get("prompt_n"), timings.get("cache_n")
            if not all(isinstance(n, int) and n >= 0 for n in (evaluated, reused)):
                raise BackendError("POST /completion", "the answer holds no timings")
        except BackendError as e:
            backend.slots.forget(slot)  # what it holds is not known
            log.warning("variant %s not evaluated before its request: %s", variant.key, e)
            return False
        # Evaluated for this request: counted with the tokens its answer evaluates.
        backend.metrics.tokens_evaluated.labels(entry.prefix).inc(evaluated)
        try:
            backend.slots.mark(slot, variant.key, template.digest, ran=True)
            backend.caches.save(variant.prefix, template, slot, reused + evaluated, variant)
        except BackendError as e:
            # Still in its slot; saved again after a pause (a full disk, a busy slot).
            log.warning("variant %s not saved: %s", variant.key, e)
            variant.retry_at = time.monotonic() + SAVE_RETRY
            return False
        return True

    def saves(self, variant):
        """Whether a variant's head is saved: bioproxy must be able to delete its files
        to keep them within the budget."""
        caches = self.backend.caches
        if self.budget <= 0 or variant.unsaved or caches.unsupported or self.unreadable:
            return False
        if variant.preparing or time.monotonic() < variant.retry_at:
            return False
        if not caches.registry.slot_save_path:
            self._tell(
                "folder",
                "variants (templates after a system message, with tools...) are not saved: "
                "set slot_save_path to llama-server's --slot-save-path folder, which bioproxy "
                "must reach to keep them within variant_budget_bytes",
            )
            return False
        return True

    def _keep_budget(self, variant, template):
        """After a save: the least recently used files deleted until the rest fit."""
        registry = self.backend.caches.registry
        saved = self.backend.caches.find(variant.key, template)
        if saved is not None and not saved.get("size"):
            # bioproxy cannot read its own file: it could not keep the budget.
            registry.forget(variant.key)
            self._tell(
                "unreadable",
                "variants are not saved until bioproxy restarts: it cannot read their files "
                "in slot_save_path, and could not keep them within variant_budget_bytes",
            )
            self.unreadable = True
            return
        if variant.key in self._evict(keep=variant.key):
            variant.unsaved = True
            log.warning(
                "variant %s is larger than variant_budget_bytes (%d): not saved",
                variant.key,
                self.budget,
            )

    def _evict(self, keep=None):
        """Delete the least recently used variants' files beyond the budget, counted and
        logged: the keys evicted (see Registry.evict_variants)."""
        evicted = self.backend.caches.registry.evict_variants(self.budget, keep)
        for key in evicted:
            self.backend.metrics.variant_evictions.labels(template_of(key)).inc()
            if key != keep:
                log.info("variant %s evicted: beyond variant_budget_bytes", key)
        return evicted

    def make_ready(self, found, entry, template, slot):
        """For a request of a variant its slot does not hold: restore the variant's file
        ("restored"); with none, evaluate and save its head first ("cold"); when bioproxy
        cannot save it, "cold" for its first request, then "server" (unpinned, to
        llama-server's own cache)."""
        caches, variant = self.backend.caches, found.variant
        if not caches.unsupported and caches.find(found.key, template) is not None:
            return caches.restore_for_request(entry, None, template, slot, variant)
        if self.saves(variant):
            return self.prepare(found, entry, template, slot)
        # Not saved here: its first request fills its slot (pinned), the later ones go
        # unpinned, for llama-server to place where a slot or its RAM cache holds it.
        return "server" if any(variant.requests.values()) else "cold"

    def used(self, variant):
        """A request used the variant: its file is the most recently used now (written to
        saved.json at most every TOUCH_EVERY seconds)."""
        self.backend.caches.registry.touch(variant.key, TOUCH_EVERY)

    def prune(self):
        """Forget the saved variants of templates no longer configured or since edited,
        and those beyond the budget (lowered since, or 0)."""
        registry, catalog = self.backend.caches.registry, self.backend.catalog
        for key, saved in list(registry.entries.items()):
            prefix = saved.get("template")
            if prefix is None:
                continue
            entry = catalog.entries.get(prefix)
            if entry is None or (entry.template and entry.digest != saved["digest"]):
                registry.forget(key)
        self._evict()

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
                    "last_used": saved.get("last_used") or saved.get("saved_at"),
                    "requests": None,
                }
        for key, variant in self.known.items():
            if variant.prefix == prefix:
                shown = found.setdefault(
                    key,
                    {
                        "key": key,
                        "tokens": variant.tokens,
                        "saved_file": None,
                        "bytes": None,
                        "last_used": None,
                    },
                )
                shown["requests"] = dict(variant.requests)
        return sorted(found.values(), key=lambda v: v["key"])

    def _tell(self, what, message, *args):
        if what not in self.told:
            self.told.add(what)
            log.warning(message + " (logged once)", *args)
