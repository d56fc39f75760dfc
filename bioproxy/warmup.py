"""Keeping templates warm: watching their files, warming, saving and restoring their caches."""

import logging
import time

import gevent
from gevent.event import Event

from . import config, templates
from .registry import Registry, filename
from .slots import Slots
from .upstream import BackendError

log = logging.getLogger(__name__)

# Stands in for the user's message when asking llama-server how it renders a template.
SENTINEL = "\u2063bioproxy-message\u2063"


class Entry:
    """One configured prefix: its template as last read, and the state of its cache."""

    def __init__(self, prefix, path):
        self.prefix = prefix
        self.path = path
        self.template = None  # the current Template, None while broken
        self.error = None  # why it is broken
        self.state = "pending"  # pending, warming, warm, stale, failed or broken
        self.tokens = None  # tokens of the warmed prefix
        self.last_warmup = None
        self.forced = False  # evaluate again even though a saved file exists

    def describe(self, registry, model):
        digest = self.template.digest if self.template else None
        saved = registry.find(self.prefix, digest, model)
        return {
            "prefix": self.prefix,
            "file": self.path,
            "state": self.state,
            "error": self.error,
            "tokens": self.tokens,
            "digest": self.template.digest if self.template else None,
            "saved_file": saved["file"] if saved else None,
            "last_warmup": self.last_warmup,
        }


class Warmer:
    """The templates, their saved caches and the slots that hold them."""

    def __init__(self, settings, base_dir, upstream, metrics):
        self.upstream = upstream
        self.metrics = metrics
        self.base_dir = base_dir
        self.root = config.resolve_path(settings.template_root, base_dir)
        self.max_bytes = settings.max_template_bytes
        self.interval = settings.warmup_check_interval
        self.warmup_timeout = settings.upstream_timeout
        self.entries = {p: Entry(p, path) for p, path in settings.prefixes.items()}
        self.slots = Slots(upstream, settings.slot_timeout)
        slot_folder = settings.slot_save_path
        self.registry = Registry(
            config.resolve_path(settings.state_dir, base_dir),
            config.resolve_path(slot_folder, base_dir) if slot_folder else None,
        )
        self.backend_was_down = False
        self.wake = Event()
        self.greenlet = None
        for prefix in list(self.registry.entries):
            if prefix not in self.entries:
                self.registry.forget(prefix)  # a template no longer configured
        self.reload()

    # The watcher: a loop of passes, each catching its own errors.

    def start(self):
        self.greenlet = gevent.spawn(self.run)

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill()

    def run(self):
        while True:
            try:
                self.check()
            except Exception:
                log.exception("warmup pass failed")
            self.wake.wait(self.interval)
            self.wake.clear()

    def request_warmup(self, prefix):
        """Evaluate a template again at the next pass, which starts now."""
        entry = self.entries[prefix]
        entry.state, entry.forced = "stale", True
        self.wake.set()

    def check(self):
        """One pass: re-read the templates, look at llama-server, warm what needs it."""
        self.reload()
        try:
            restarted = self.slots.refresh()
        except BackendError as e:
            if not self.backend_was_down:
                log.warning("llama-server is not ready, warmups wait: %s", e)
            self.backend_was_down = True
            return
        if restarted or self.backend_was_down:
            log.warning("llama-server restarted or changed model: making templates warm again")
            for entry in self.entries.values():
                if entry.template is not None:
                    entry.state = "stale"
        self.backend_was_down = False
        for entry in self.entries.values():
            if entry.template is not None and entry.state in ("pending", "stale", "failed"):
                self.warm(entry)

    def reload(self):
        """Read every template again; one whose content changed becomes stale."""
        for entry in self.entries.values():
            try:
                template = templates.load(
                    entry.prefix, entry.path, self.base_dir, self.root, self.max_bytes
                )
            except templates.TemplateError as e:
                if entry.error != str(e):
                    log.error("template %s is broken: %s", entry.prefix, e)
                entry.template, entry.error, entry.state = None, str(e), "broken"
                self.metrics.template_broken.labels(entry.prefix).set(1)
                continue
            if entry.template is None or entry.template.digest != template.digest:
                change = "added" if entry.state == "pending" else "changed"
                log.info("template %s %s: %s", entry.prefix, change, entry.path)
                entry.template, entry.error, entry.state = template, None, "stale"
                self.metrics.template_broken.labels(entry.prefix).set(0)

    # Warming, saving and restoring.

    def warm(self, entry):
        """Make a template's cache warm in a slot and saved: restore it, else evaluate it."""
        template = entry.template
        slot = self.slots.pick(entry.prefix)
        if not self.slots.acquire(slot):
            return  # tried again at the next pass
        try:
            if entry.forced or self.restore(entry, template, slot) != "restored":
                entry.forced = False
                self.evaluate(entry, template, slot)
        finally:
            self.slots.release(slot)

    def evaluate(self, entry, template, slot):
        entry.state = "warming"
        log.info("warming template %s in slot %d", entry.prefix, slot)
        started = time.monotonic()
        try:
            head = self.rendered_head(template)
            answer = self.upstream.call(
                "POST",
                "/completion",
                {"prompt": head, "n_predict": 0, "id_slot": slot, "cache_prompt": True},
                self.warmup_timeout,
            )
            tokens = int(answer["tokens_evaluated"])
        except Exception as e:  # any failure must leave the template retryable
            entry.state = "failed"
            entry.last_warmup = {"at": time.time(), "outcome": "failed", "error": str(e)}
            self.metrics.warmups.labels(entry.prefix, "failed").inc()
            log.warning("warming template %s failed: %s", entry.prefix, e)
            return
        seconds = time.monotonic() - started
        entry.tokens = tokens
        entry.last_warmup = {
            "at": time.time(),
            "outcome": "ok",
            "seconds": round(seconds, 3),
            "tokens_evaluated": answer.get("timings", {}).get("prompt_n"),
        }
        self.metrics.warmups.labels(entry.prefix, "ok").inc()
        self.metrics.warmup_seconds.labels(entry.prefix).observe(seconds)
        log.info("template %s warmed: %d tokens in %.2f s", entry.prefix, tokens, seconds)
        self.save(entry, template, slot, tokens)
        # After the save: what the slot last ran is then what bioproxy saw last.
        self.slots.mark(slot, entry.prefix, template.digest)
        entry.state = "warm"

    def save(self, entry, template, slot, tokens):
        name = filename(entry.prefix, template.digest, self.slots.model)
        try:
            saved = self.slots.save(slot, name)
            # The prefix plus the one token llama-server generates; anything else means
            # another request ran in the slot first and its cache would be saved instead.
            if not tokens <= saved <= tokens + 1:
                raise BackendError("save", f"saved {saved} tokens, evaluated {tokens}")
        except BackendError as e:
            self.metrics.saves.labels(entry.prefix, "failed").inc()
            hint = " (is llama-server's --slot-save-path set?)" if e.status == 501 else ""
            log.warning("saving template %s failed%s: %s", entry.prefix, hint, e)
            return
        self.registry.record(entry.prefix, template.digest, self.slots.model, saved)
        self.metrics.saves.labels(entry.prefix, "ok").inc()
        log.info("template %s saved: %d tokens in %s", entry.prefix, saved, name)

    def restore(self, entry, template, slot):
        """Load the template's saved cache into the slot: "restored", or "cold" if it can't."""
        saved = self.registry.find(entry.prefix, template.digest, self.slots.model)
        if saved is None:
            return "cold"
        try:
            tokens = self.slots.restore(slot, saved["file"])
        except BackendError as e:
            # A missing or corrupt file answers 400 and leaves the slot empty.
            self.slots.forget(slot)
            self.metrics.restores.labels(entry.prefix, "failed").inc()
            log.warning("restoring template %s failed: %s", entry.prefix, e)
            current = self.registry.entries.get(entry.prefix)
            if e.status == 400 and current and current["file"] == saved["file"]:
                self.registry.forget(entry.prefix)
                entry.state = "stale"
                self.wake.set()
            return "cold"
        self.slots.mark(slot, entry.prefix, template.digest)
        entry.tokens, entry.state = tokens, "warm"
        self.metrics.restores.labels(entry.prefix, "ok").inc()
        log.info("template %s restored into slot %d: %d tokens", entry.prefix, slot, tokens)
        return "restored"

    def rendered_head(self, template):
        """The prompt text before the user's message, exactly as llama-server renders it."""
        messages = [{"role": "user", "content": template.render(SENTINEL)}]
        prompt = self.upstream.call("POST", "/apply-template", {"messages": messages})["prompt"]
        cut = prompt.find(SENTINEL)
        if cut < 0:
            raise BackendError("POST /apply-template", "the chat template dropped the message")
        return prompt[:cut]
