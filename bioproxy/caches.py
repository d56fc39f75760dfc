"""The templates' saved KV caches: a slot saved to its file, a file restored into a slot.

Against the registry (what was saved, for which template version and model) and
llama-server's slot API. Used by the warmer after an evaluation and at start-up, and by
the request path when a template's slot was taken by other work.
"""

import logging
import time

from .slot_api import SlotFileRejected, SlotsUnsupported
from .slot_table import named, template_of
from .upstream import BackendError

log = logging.getLogger(__name__)

# A restore proven: of the head completed again in its slot, llama-server evaluated at most
# this many tokens (it always evaluates the last one again).
RESTORE_SLACK = 4


class SavedCaches:
    """Saving, restoring and forgetting the slot files of one llama-server's templates.

    on_discard(prefix) is called when a file turns out unusable: its template is then
    stale, to be warmed again.
    """

    def __init__(self, registry, slots, prompts, metrics, on_discard):
        self.registry = registry
        self.slots = slots
        self.prompts = prompts
        self.metrics = metrics
        self.on_discard = on_discard
        # Whether llama-server's slot API last answered that it cannot save or restore
        # (501: started without --slot-save-path).
        self.unsupported = False
        self.unsaved = set()  # templates a save was refused for with 501, said once each

    def find(self, key, template):
        """The saved entry of a template (key: its prefix) or of one of its variants (the
        variant's key) for this template version on the loaded model, or None."""
        return self.registry.find(key, template.digest, self.slots.table.model)

    def save(self, prefix, template, slot, tokens, variant=None, api=None):
        """Save the evaluated slot to its file and record it: the template's head, or its
        variant's (variant given).

        A llama-server that cannot save (SlotsUnsupported: no --slot-save-path) leaves the
        template warm in its slot only. Any other failure raises BackendError. api: the
        warmup llama-server's slot API (evaluator.py), whose SlotsUnsupported is raised.
        """
        key = variant.key if variant else prefix
        name = self.registry.filename(key, template.digest, self.slots.table.model)
        try:
            saved = (api or self.slots.api).save(slot, name)
            # The prefix plus the one token llama-server generates; anything else means
            # another request ran in the slot first, or llama-server restarted (a new
            # server saves its empty slot: 0 tokens, and no error).
            if not tokens <= saved <= tokens + 1:
                raise BackendError(
                    f"POST /slots/{slot}?action=save", f"saved {saved} tokens, evaluated {tokens}"
                )
        except SlotsUnsupported as e:
            self.metrics.saves.labels(prefix, "failed").inc()
            if api is not None:
                raise
            if prefix not in self.unsaved:  # said once per template
                self.unsaved.add(prefix)
                log.warning("template %s not saved (no --slot-save-path?): %s", prefix, e)
            self.unsupported = True
            return
        except BackendError:
            self.metrics.saves.labels(prefix, "failed").inc()
            # The file may be half written (a full disk), or written later by a save
            # llama-server had queued behind another request: it no longer holds this
            # template for sure, and a partial file would keep the disk full.
            self.registry.forget(key, name)
            self.registry.delete_file(name)
            raise
        except BaseException:
            # Killed meanwhile (a client that left, a warmup stopped): a file nothing
            # records would stay on disk, outside any budget.
            self.registry.delete_file(name)
            raise
        if api is None:
            self.unsupported = False
        # A variant's entry names its template, for /templates and the pruning.
        more = {"template": prefix, "head_tokens": variant.tokens} if variant else {}
        self.registry.record(key, template.digest, self.slots.table.model, saved, **more)
        self.metrics.saves.labels(prefix, "ok").inc()
        log.info("%s saved: %d tokens in %s", named(key), saved, name)

    def restore_for_request(self, entry, warmth, template, slot, variant=None):
        """For a user request: load the saved cache of the template version it was
        expanded with (or of its variant) into its slot.

        "restored", or "cold" when it cannot: the request then goes on without it, and
        leaves the slot holding the template once answered.
        """
        try:
            return "restored" if self.restore(entry, warmth, template, slot, variant) else "cold"
        except BackendError:
            return "cold"

    def restore(self, entry, warmth, template, slot, variant=None, mark=True):
        """Restore the template's saved cache into the slot: whether there was one to use.

        variant: restore that variant's file instead (warmth is then not touched); mark
        False: neither is it (the RAM cache probe's restore is no warmup). A file
        that llama-server cannot read or that holds something else is forgotten, and the
        template warmed again (a variant's is saved again after its next request); other
        failures raise BackendError.
        """
        key = variant.key if variant else entry.prefix
        saved = self.registry.find(key, template.digest, self.slots.table.model)
        if saved is None:
            return False

        def discard():
            if variant is None:
                self.discard(entry.prefix, saved)
            else:
                self.registry.forget(key, saved["file"])

        spoiled = self.registry.check(saved)
        if spoiled:
            # llama-server restores a file with corrupted KV data without a word, and its
            # answers are then garbage: never restore what is not what bioproxy saved.
            self._failed(key, slot, f"{saved['file']}: {spoiled}")
            discard()
            return False
        # Whatever the slot held is replaced, without a task to show it: not to be taken
        # for llama-server clearing it.
        self.slots.forget(slot)
        try:
            tokens = self.slots.api.restore(slot, saved["file"])
        except SlotFileRejected as e:
            self._failed(key, slot, e)
            discard()  # missing, corrupt or from another build
            return False
        except SlotsUnsupported:
            self.unsupported = True
            self._failed(key, slot, "llama-server cannot restore (no --slot-save-path)")
            raise
        except BackendError as e:
            self._failed(key, slot, e)
            raise
        if tokens != saved.get("tokens", tokens):
            # Not what bioproxy saved there, e.g. a save llama-server ran after bioproxy
            # had given up waiting for it.
            self._failed(key, slot, f"restored {tokens} tokens, saved {saved['tokens']}")
            discard()
            return False
        self.slots.mark(slot, key, template.digest)
        if mark and variant is None and entry.is_current(template):
            last = {
                "at": time.time(),
                "outcome": "restored",
                "saved_at": saved.get("saved_at"),
                "tokens": tokens,
            }
            warmth.mark_restored(tokens, last)
        self.metrics.restores.labels(entry.prefix, "ok").inc()
        log.info("%s restored into slot %d: %d tokens", named(key), slot, tokens)
        return True

    def prove(self, prefix, template, slot):
        """Complete the head once in the slot just restored: whether that reused it.

        A restore is not a task: a slot only restored shows in GET /slots just as a new
        server's empty slot does, so a restart would go unnoticed and the next request be
        sent to an empty slot as warm. The completion leaves a task id there, which a
        restart takes away, and its timings show whether the restore held (the head
        reused, its last token evaluated again). When it did not, the file is forgotten:
        the head, evaluated in the slot now, is to be saved again.
        """
        head = self.prompts.fetch_head(template)
        try:
            answer = self.prompts.complete(slot, head)
        except BackendError:
            self.slots.forget(slot)  # what it holds is not known
            raise
        self.slots.mark(slot, prefix, template.digest, ran=True)
        evaluated = (answer.get("timings") or {}).get("prompt_n")
        if isinstance(evaluated, int) and evaluated <= RESTORE_SLACK:
            return True
        log.warning(
            "template %s was restored into slot %d, yet llama-server evaluated %s of its "
            "tokens again: saving it again",
            prefix,
            slot,
            evaluated,
        )
        saved = self.find(prefix, template)
        if saved is not None:
            self.registry.forget(prefix, saved["file"])
        return False

    def restore_did_not_hold(self, entry, template, reused, tokens, variant=None):
        """A user's answer after a restore reused less than the template (or its variant):
        the file is bad, and not used again."""
        key = variant.key if variant else entry.prefix
        log.warning(
            "%s was restored for a request, yet llama-server reused only %d of its %s "
            "tokens: its saved file is not used again",
            named(key),
            reused,
            tokens,
        )
        saved = self.find(key, template)
        if saved is None:
            return
        if variant is None:
            self.discard(entry.prefix, saved)  # warmed again
        else:
            self.registry.forget(key, saved["file"])  # saved again at its next request

    def discard(self, prefix, saved):
        """Forget a saved file that cannot be used, and have the template warmed again."""
        self.registry.forget(prefix, saved["file"])
        self.on_discard(prefix)

    def _failed(self, key, slot, error):
        # What the slot holds now is unknown (a rejected file empties it).
        self.slots.forget(slot)
        self.metrics.restores.labels(template_of(key), "failed").inc()
        log.warning("restoring %s failed: %s", named(key), error)
