"""Prompt templates: text files with <{message}> placeholders and <{file}> includes."""

import dataclasses
import errno
import hashlib
import json
import os
import re
import stat

MESSAGE = "<{message}>"
PLACEHOLDER = re.compile(r"<\{([^{}\n]+)\}>")


class TemplateError(Exception):
    """Why a template cannot be used, in one line that names the file."""


@dataclasses.dataclass(frozen=True)
class Template:
    """A template read and expanded, split around each <{message}> placeholder.

    Every other placeholder, <{some/path.txt}>, was replaced by that file's text, taken
    literally: included text is never scanned for placeholders, so includes are one level
    deep. A template without <{message}> gets the message appended at its end, as if it
    ended with <{message}>, so pieces always holds at least two strings.
    """

    prefix: str
    path: str  # as configured, for messages
    pieces: tuple  # the literal text around each <{message}>
    files: tuple  # real paths of the template and its includes, to watch for changes
    digest: str  # changes whenever the expanded text changes

    def render(self, message: str) -> str:
        """The prompt: the template with every <{message}> replaced by message."""
        return message.join(self.pieces)

    @property
    def head(self) -> str:
        """The fixed text before the first <{message}>, the part worth keeping warm."""
        return self.pieces[0]


def resolve(path: str, base_dir: str, root: str) -> str:
    """The real path of a template or include, which must lie inside root."""
    real_root = os.path.realpath(root)
    try:
        # join keeps an absolute path as it is; realpath follows symlinks, so a link
        # that leaves the root is caught like a path with "..".
        real = os.path.realpath(os.path.join(base_dir, path))
    except ValueError as e:  # an embedded NUL byte
        raise TemplateError(f"{path} is not a valid path: {e}") from None
    if os.path.commonpath([real, real_root]) != real_root:
        raise TemplateError(f"{path} resolves outside the template root {real_root}")
    return real


def load(prefix: str, path: str, base_dir: str, root: str, max_bytes: int) -> Template:
    """Read, check and expand one template; raises TemplateError."""
    try:
        return _load(prefix, path, base_dir, root, max_bytes)
    except OSError as e:  # anything the checks below did not name: still this template's
        raise TemplateError(f"template {path} cannot be read: {e}") from None


def _load(prefix, path, base_dir, root, max_bytes):
    try:
        real = resolve(path, base_dir, root)
        texts = {real: _read(path, real, max_bytes)}
    except TemplateError as e:
        raise TemplateError(f"template {e}") from None
    pieces, current, size = [], [], 0
    # With one group, split alternates literal text (even) and placeholder names (odd).
    for i, chunk in enumerate(PLACEHOLDER.split(texts[real])):
        if i % 2 and chunk == "message":
            pieces.append("".join(current))
            current = []
            continue
        if i % 2:
            chunk = _include(chunk, path, base_dir, root, max_bytes, texts)
        current.append(chunk)
        # Counted as it grows, so repeated includes cannot build a huge string first.
        size += len(chunk.encode("utf-8"))
        if size > max_bytes:
            raise TemplateError(
                f"template {path} is larger than {max_bytes} bytes with its includes expanded"
            )
    pieces.append("".join(current))
    if len(pieces) == 1:
        pieces.append("")
    # JSON keeps the boundaries between pieces, which MESSAGE.join would blur when an
    # include holds the text <{message}> literally.
    digest = hashlib.sha256(json.dumps(pieces).encode("utf-8")).hexdigest()
    return Template(prefix, path, tuple(pieces), tuple(texts), digest)


def match_prefix(text: str, prefixes) -> str | None:
    """The longest configured prefix that text starts with, followed by a space, or equals."""
    found = [prefix for prefix in prefixes if text == prefix or text.startswith(prefix + " ")]
    return max(found, key=len, default=None)


def strip_prefix(text: str, prefix: str) -> str:
    """The user's message: text after the prefix and the one space that follows it."""
    if match_prefix(text, [prefix]) is None:
        raise ValueError(f"{text[:40]!r} does not start with the prefix {prefix!r}")
    return text[len(prefix) + 1 :]


def _include(name, path, base_dir, root, max_bytes, texts):
    """The text of one include, read once however often it appears; remembered in texts."""
    try:
        real = resolve(name, base_dir, root)
        if real not in texts:
            texts[real] = _read(name, real, max_bytes)
    except TemplateError as e:
        raise TemplateError(f"template {path}: include {e}") from None
    return texts[real]


def _read(name, real, max_bytes):
    """A file's text, checked; errors start with name, the path as written.

    The file is opened first and checked after, through the open descriptor: a path
    checked and then opened by name could be swapped for a symlink in between, and the
    file opened be another than the one checked.
    """
    try:
        # O_NOFOLLOW: the last component may not be a link now (resolve() followed the
        # ones it found); O_NONBLOCK: opening a FIFO does not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TemplateError(f"{name} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TemplateError(f"{name} was replaced by a symlink while being read") from None
        raise TemplateError(f"{name} cannot be read: {e}") from None
    try:
        _check_opened(name, fd, real, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # the file may have grown since the check
    except OSError as e:
        raise TemplateError(f"{name} cannot be read: {e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise TemplateError(f"{name} is larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TemplateError(f"{name} is not valid UTF-8 text") from None


def _check_opened(name, fd, real, max_bytes):
    """The open file is a regular file, small enough, and the one resolve() checked."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise TemplateError(f"{name} is a directory")
    # A FIFO or device could block the read or never end.
    if not stat.S_ISREG(info.st_mode):
        raise TemplateError(f"{name} is not a regular file")
    if info.st_size > max_bytes:
        raise TemplateError(f"{name} is larger than {max_bytes} bytes")
    # Where the descriptor really points, whatever happened to the path's folders. real
    # lies inside the root (resolve() checked it), so the same path is inside it too.
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the file must still be the one at the checked path
        here = os.stat(real)
        if (here.st_dev, here.st_ino) != (info.st_dev, info.st_ino):
            raise TemplateError(f"{name} was replaced while being read") from None
        return
    if opened != real:
        raise TemplateError(f"{name} was replaced while being read (it led to {opened})")
