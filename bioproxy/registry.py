"""What bioproxy has saved: one slot file per template version and model, kept on disk."""

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time

import gevent

log = logging.getLogger(__name__)


# bioproxy-<prefix's safe characters>-[<hash of the prefix>-]<template digest>-<model>
# [-<instance>].bin (names saved before the prefix's hash or the instance was added are
# still recognised, to be deleted).
NAME = re.compile(
    r"bioproxy-[A-Za-z0-9_-]{0,32}-(?:[0-9a-f]{16}-)?[0-9a-f]{1,16}-[0-9a-f]{1,12}"
    r"(?:-[0-9a-f]{8})?\.bin"
)
INSTANCE = re.compile(r"[0-9a-f]{8}")


def filename(prefix, digest, model, instance):
    """The slot file's name: only bioproxy's own hashes and the prefix's safe characters.

    The safe characters alone would give "@ab" and "@a/b" one file; the prefix's own hash
    keeps every prefix's file apart, and the instance (instance_id) every bioproxy's.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "", prefix)[:32] or "template"
    own = hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"bioproxy-{name}-{own}-{digest[:16]}-{model[:12]}-{instance}.bin"


def instance_id(state_dir):
    """This bioproxy's own tag in the names of its slot files, kept in <state_dir>/instance.

    Two bioproxies in front of one llama-server share its slot folder: with the same
    names, each overwrote the other's files, found them changed (their SHA-256) and
    deleted them, and both warmed their templates again and again. Made once, at random,
    so that a restart finds its files again; where the state folder cannot be written,
    a hash of its path stands in.
    """
    path = os.path.join(state_dir, "instance")
    try:
        with open(path, encoding="ascii") as f:
            tag = f.read().strip()
        if INSTANCE.fullmatch(tag):
            return tag
    except (OSError, ValueError):
        pass  # none yet, or unreadable: made anew
    tag = secrets.token_hex(4)
    try:
        os.makedirs(state_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=state_dir, delete=False, suffix=".tmp") as f:
            f.write(tag + "\n")
        os.replace(f.name, path)
    except OSError as e:
        tag = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:8]
        log.warning("cannot keep this bioproxy's tag in %s (%s): using %s", path, e, tag)
    return tag


def off_loop(function, *args):
    """function(*args) in a thread of gevent's pool: hashing a slot file (up to 100 MB and
    more) takes a tenth of a second or more, which would stall every request meanwhile."""
    return gevent.get_hub().threadpool.apply(function, args)


def _readable(entry):
    """Whether a saved.json entry has the fields bioproxy reads, of their types."""
    if not isinstance(entry, dict):
        return False
    texts = all(isinstance(entry.get(k), str) for k in ("file", "digest", "model"))
    numbers = all(
        _number(entry.get(k, 0)) for k in ("size", "saved_at", "last_used", "tokens")
    ) and _count(entry.get("head_tokens", 0))
    return texts and numbers and isinstance(entry.get("template", ""), str)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _stamp(info):
    """What changes when a file is written or replaced: its size, time and inode."""
    return (info.st_size, info.st_mtime_ns, info.st_ino)


class Registry:
    """The slot files saved for each template, recorded in <state_dir>/saved.json.

    A file is used only for the exact template digest and model identity it was saved
    for, so an edited template or another model never loads a stale cache.
    """

    def __init__(self, state_dir, slot_save_path=None):
        self.path = os.path.join(state_dir, "saved.json")
        self.instance = instance_id(state_dir)
        self.slot_save_path = slot_save_path
        # key (a template's prefix, or a variant's key) -> what was saved; load() reads them
        self.entries = {}
        self.intact = {}  # path -> (size, mtime, inode) when its content was last verified
        self.touched = {}  # key -> when its last use was last written (touch())

    def load(self):
        """Read saved.json (none, or unreadable: nothing saved)."""
        self.entries = self._read()

    def find(self, prefix, digest, model):
        """The saved entry for this version of a template on this model, or None."""
        entry = self.entries.get(prefix)
        if entry and entry["digest"] == digest and entry["model"] == model:
            return entry
        return None

    def record(self, prefix, digest, model, tokens, **more):
        """Remember a new save, forgetting (and deleting) the prefix's previous file.

        prefix is a template's, or a variant's key (see variants.py); more: what else to
        keep with it (a variant's template and head tokens).
        """
        entry = {
            "file": self.filename(prefix, digest, model),
            "digest": digest,
            "model": model,
            "tokens": tokens,
            "saved_at": time.time(),
            **more,
        }
        # What was written, to prove later that a restore loads that and nothing else.
        found = off_loop(self._fingerprint, entry["file"])
        if found is not None:
            entry["size"], entry["sha256"] = found["size"], found["sha256"]
            self.intact[found["path"]] = found["stamp"]  # no need to hash it again
        old = self.entries.get(prefix)
        self.entries[prefix] = entry
        self._write()
        if old and old["file"] != entry["file"]:
            self.delete_file(old["file"])
        return entry

    def filename(self, key, digest, model):
        """The name of this bioproxy's slot file for a key, template version and model."""
        return filename(key, digest, model, self.instance)

    def forget(self, prefix, file=None):
        """Drop a template's entry and its file (removed template, or a file that failed).

        file: only if the entry still names that file (another save may have replaced it).
        """
        old = self.entries.get(prefix)
        if not old or (file is not None and old["file"] != file):
            return
        del self.entries[prefix]
        self._write()
        self.delete_file(old["file"])

    def touch(self, key, every):
        """A saved entry was used now: kept as its last use, written at most every
        `every` seconds (least recently used variants are evicted first)."""
        entry = self.entries.get(key)
        if entry is None:
            return
        now = time.time()
        entry["last_used"] = now
        if now - self.touched.get(key, 0) >= every:
            self.touched[key] = now
            self._write()

    def evict_variants(self, budget, keep=None):
        """Forget (and delete) variants' files, the least recently used first, until they
        fit in budget bytes: the keys evicted. keep, the one just saved, is kept unless
        it alone is larger than the budget: then it alone goes."""
        variants = [(key, e) for key, e in self.entries.items() if "template" in e]
        total = sum(e.get("size") or 0 for _, e in variants)
        if keep in self.entries and (self.entries[keep].get("size") or 0) > budget:
            self.forget(keep)
            return [keep]
        variants.sort(key=lambda item: item[1].get("last_used") or item[1].get("saved_at") or 0)
        evicted = []
        for key, entry in variants:
            if total <= budget:
                break
            if key == keep:
                continue
            total -= entry.get("size") or 0
            self.forget(key)
            evicted.append(key)
        return evicted

    def check(self, entry):
        """None if the saved file is still what was saved (or cannot be read here), else why.

        Its size and SHA-256 were recorded at the save; the hash is computed again only
        when the file's size, time or inode changed since it was last found intact, so a
        restore for a user request usually costs one stat().
        """
        if "sha256" not in entry or not self.slot_save_path:
            return None  # saved by a llama-server elsewhere, or before hashes were kept
        path = os.path.join(self.slot_save_path, entry["file"])
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return "the file is gone"
        except OSError:
            return None  # not readable by bioproxy: llama-server will say
        if info.st_size != entry.get("size"):
            return f"the file has {info.st_size} bytes, {entry.get('size')} were saved"
        if self.intact.get(path) == _stamp(info):
            return None
        found = off_loop(self._fingerprint, entry["file"])
        if found is None:
            return None
        if found["sha256"] != entry["sha256"]:
            return "the file's content is not what was saved (its SHA-256 differs)"
        self.intact[path] = found["stamp"]
        return None

    def _fingerprint(self, name):
        """{"path", "size", "sha256", "stamp"} of a slot file bioproxy can read, else None."""
        if not self.slot_save_path:
            return None
        path = os.path.join(self.slot_save_path, name)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                stamp = _stamp(os.fstat(f.fileno()))
                size = 0
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError:
            return None
        return {"path": path, "size": size, "sha256": digest.hexdigest(), "stamp": stamp}

    def delete_file(self, name):
        """Delete a slot file of bioproxy's, if it exists and the slot folder is known."""
        # Only possible when llama-server's slot folder is on this machine and known; and
        # only a name of bioproxy's own shape, whatever saved.json was edited to say.
        if not self.slot_save_path or not NAME.fullmatch(name):
            return
        try:
            os.remove(os.path.join(self.slot_save_path, name))
            log.info("deleted slot file %s", name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot delete slot file %s: %s", name, e)

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                entries = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.path, e)
            return {}
        if not isinstance(entries, dict):
            return {}
        # An entry bioproxy cannot read is left out (its file is then never restored).
        return {key: e for key, e in entries.items() if _readable(e)}

    def _write(self):
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            # Write then rename, so a crash never leaves half a file.
            with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(f.name, self.path)
        except OSError as e:
            # Saves still work while bioproxy runs; a restart will warm again.
            log.error("cannot record saved slot files in %s: %s", self.path, e)
