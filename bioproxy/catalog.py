"""The configured templates: each prefix's file, its text as last read, why it is broken.

One catalog for the whole app: what a template says does not depend on the llama-server
it is warmed in. How warm it is there is that llama-server's own (warmth.py).
"""

import logging

from . import templates

log = logging.getLogger(__name__)


class Entry:
    """One configured prefix and its template as last read (None while broken)."""

    def __init__(self, prefix, path, model=None):
        self.prefix = prefix
        self.path = path  # as configured
        self.model = model  # the model it is for, or None for any
        self.template = None
        self.error = None  # why it is broken
        self.read = False  # whether it was ever read, well or not

    @property
    def digest(self):
        return self.template.digest if self.template else None

    def is_current(self, template):
        """Whether template is still this entry's text (a reload may have read an edit)."""
        return self.template is not None and self.template.digest == template.digest


class Catalog:
    """Every configured template, read again by reload()."""

    def __init__(self, prefixes, base_dir, root, max_bytes, metrics):
        """prefixes: {prefix: (file, model)}, as Settings.templates() gives them."""
        self.entries = {
            prefix: Entry(prefix, path, model) for prefix, (path, model) in prefixes.items()
        }
        self.base_dir = base_dir
        self.root = root
        self.max_bytes = max_bytes
        self.metrics = metrics

    def __contains__(self, prefix):
        return prefix in self.entries

    def __getitem__(self, prefix):
        return self.entries[prefix]

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self):
        return len(self.entries)

    def digest(self, prefix):
        """The digest of a prefix's template as last read: None while broken or unknown."""
        entry = self.entries.get(prefix)
        return entry.digest if entry else None

    def reload(self):
        """Read every template again: the prefixes whose text is new (added, changed, mended)."""
        changed = []
        for entry in self:
            try:
                template = templates.load(
                    entry.prefix, entry.path, self.base_dir, self.root, self.max_bytes
                )
            except templates.TemplateError as e:
                if entry.error != str(e):
                    log.error("template %s is broken: %s", entry.prefix, e)
                entry.template, entry.error, entry.read = None, str(e), True
                self.metrics.template_broken.labels(entry.prefix).set(1)
                continue
            if entry.template is None or entry.template.digest != template.digest:
                change = "changed" if entry.read else "added"
                log.info("template %s %s: %s", entry.prefix, change, entry.path)
                entry.template, entry.error, entry.read = template, None, True
                self.metrics.template_broken.labels(entry.prefix).set(0)
                changed.append(entry.prefix)
        return changed
