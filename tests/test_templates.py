"""Templates: expansion, rendering, the template root, refused files and prefixes."""

import contextlib
import os
import re
import threading

import pytest

from bioproxy import templates
from bioproxy.templates import (
    MESSAGE,
    TemplateError,
    load,
    match_prefix,
    resolve,
    strip_prefix,
)

MAX = 100


@pytest.fixture
def root(tmp_path):
    """The template root, also the base folder of relative paths; tmp_path is outside it."""
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_from(root, path="t.txt", max_bytes=MAX):
    return load("@t", str(path), str(root), str(root), max_bytes)


def template(root, text, files=None):
    """Load t.txt holding text, after writing the other files, a {name: text} dict."""
    for name, content in (files or {}).items():
        write(root / name, content)
    write(root / "t.txt", text)
    return load_from(root)


def refused(message):
    """A pytest.raises match for exactly this message."""
    return pytest.raises(TemplateError, match=f"^{re.escape(message)}$")


# Rendering


def test_the_message_goes_where_the_placeholder_is(root):
    loaded = template(root, "Before <{message}> after\n")

    assert loaded.prefix == "@t"
    assert loaded.path == "t.txt"
    assert loaded.pieces == ("Before ", " after\n")
    assert loaded.head == "Before "
    assert loaded.render("How do I x?") == "Before How do I x? after\n"


def test_every_message_placeholder_is_replaced(root):
    loaded = template(root, "A<{message}>B<{message}><{message}>C")

    assert loaded.pieces == ("A", "B", "", "C")
    assert loaded.head == "A"
    assert loaded.render("x") == "AxBxxC"


def test_without_a_placeholder_the_message_is_appended(root):
    loaded = template(root, "Answer briefly.\n")

    assert loaded.pieces == ("Answer briefly.\n", "")
    assert loaded.head == "Answer briefly.\n"
    assert loaded.render("hi") == "Answer briefly.\nhi"


def test_render_leaves_placeholder_like_text_in_the_message_alone(root):
    loaded = template(root, "Q: <{message}>!")

    assert loaded.render("<{message}> <{t.txt}>") == "Q: <{message}> <{t.txt}>!"


@pytest.mark.parametrize("text", ["<{a\nb}>", "<{}>", "<{{message}}>", "<message>", "{message}"])
def test_text_that_is_not_a_placeholder_stays_literal(root, text):
    assert template(root, text).pieces == (text, "")


# Includes


def test_includes_are_expanded(root):
    loaded = template(
        root,
        "<{style.md}>\nDocs: <{docs/api.txt}>\nQ: <{message}>\nA:",
        {"style.md": "Be terse.", "docs/api.txt": "GET /x"},
    )

    assert loaded.pieces == ("Be terse.\nDocs: GET /x\nQ: ", "\nA:")
    assert loaded.render("hi") == "Be terse.\nDocs: GET /x\nQ: hi\nA:"


def test_included_text_is_inserted_literally_and_never_scanned(root):
    # other.txt does not exist: reading it would fail the load.
    loaded = template(
        root,
        "Doc: <{doc.txt}>\nQ: <{message}>",
        {"doc.txt": "use <{message}> and <{other.txt}>"},
    )

    assert loaded.pieces == ("Doc: use <{message}> and <{other.txt}>\nQ: ", "")
    assert loaded.render("hi") == "Doc: use <{message}> and <{other.txt}>\nQ: hi"
    assert loaded.files == (str(root / "t.txt"), str(root / "doc.txt"))


def test_an_include_path_is_taken_literally(root):
    write(root / "message", "not used")

    with refused("template t.txt: include  message  does not exist"):
        template(root, "<{ message }>")


def test_paths_are_relative_to_base_dir_not_to_the_including_file(tmp_path, root):
    write(root / "templates/code.txt", "<{style.md}> <{message}>")
    write(root / "templates/style.md", "wrong folder")
    write(root / "style.md", "base folder")

    loaded = load("@code", "templates/code.txt", str(root), str(tmp_path), MAX)

    assert loaded.render("hi") == "base folder hi"
    assert loaded.path == "templates/code.txt"


def test_files_lists_real_paths_once_in_order_of_first_use(root):
    write(root / "real/b.txt", "B")
    os.symlink(root / "real/b.txt", root / "link.txt")

    text = "<{b.txt}><{a.txt}><{b.txt}><{link.txt}><{message}>"
    loaded = template(root, text, {"a.txt": "A", "b.txt": "b"})

    assert loaded.render("!") == "bAbB!"
    assert loaded.files == (
        str(root / "t.txt"),
        str(root / "b.txt"),
        str(root / "a.txt"),
        str(root / "real/b.txt"),
    )


# The template root


def test_resolve_gives_real_paths_inside_the_root(tmp_path, root):
    write(root / "sub/a.txt", "")
    os.symlink(root / "sub", root / "alias")

    assert resolve("sub/../sub/a.txt", str(root), str(root)) == str(root / "sub/a.txt")
    assert resolve("alias/a.txt", str(root), str(root)) == str(root / "sub/a.txt")
    assert resolve(str(root / "sub/a.txt"), "/elsewhere", str(root)) == str(root / "sub/a.txt")
    assert resolve("root", str(tmp_path), str(root)) == str(root)


def test_resolve_refuses_a_sibling_folder_whose_name_starts_like_the_root(tmp_path, root):
    write(tmp_path / "root2/a.txt", "")

    with refused(f"../root2/a.txt resolves outside the template root {root}"):
        resolve("../root2/a.txt", str(root), str(root))


def test_resolve_refuses_a_nul_byte():
    with refused("a\0b is not a valid path: embedded null byte"):
        resolve("a\0b", "/", "/")


def test_an_include_with_dotdot_is_refused(tmp_path, root):
    write(tmp_path / "secret.txt", "secret")

    outside = f"resolves outside the template root {root}"
    with refused(f"template t.txt: include ../secret.txt {outside}"):
        template(root, "<{../secret.txt}>")


def test_an_absolute_path_outside_the_root_is_refused(tmp_path, root):
    secret = write(tmp_path / "secret.txt", "secret")

    with refused(f"template {secret} resolves outside the template root {root}"):
        load_from(root, secret)
    with refused(f"template t.txt: include {secret} resolves outside the template root {root}"):
        template(root, f"<{{{secret}}}>")


def test_an_absolute_path_inside_the_root_is_allowed(root):
    inside = write(root / "a.txt", "A")

    assert load_from(root, inside).pieces == ("A", "")
    assert template(root, f"<{{{inside}}}>").pieces == ("A", "")


def test_symlinks_that_leave_the_root_are_refused(tmp_path, root):
    write(tmp_path / "secret.txt", "secret")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")

    with refused(f"template link.txt resolves outside the template root {root}"):
        load_from(root, "link.txt")
    with refused(f"template t.txt: include link.txt resolves outside the template root {root}"):
        template(root, "<{link.txt}>")


ENVIRON = "/proc/self/environ"


def environ_paths(root):
    """{case: path as written} for ways a template could name the process's environment."""
    os.symlink(ENVIRON, root / "env.txt")
    return {
        "absolute": ENVIRON,
        # One ".." per part of root reaches "/"; more would stay there.
        "relative": "../" * len(root.parts) + ENVIRON.lstrip("/"),
        "symlink": "env.txt",
    }


@pytest.fixture
def opened(monkeypatch):
    """Every path the templates module stats or opens, in order."""
    import bioproxy.templates as module

    paths = []
    real_open, real_os_open, real_stat = open, os.open, os.stat

    def spy(real):
        def spying(path, *args, **kwargs):
            paths.append(str(path))
            return real(path, *args, **kwargs)

        return spying

    monkeypatch.setattr(module, "open", spy(real_open), raising=False)
    monkeypatch.setattr(os, "open", spy(real_os_open))
    monkeypatch.setattr(os, "stat", spy(real_stat))
    return paths


@pytest.mark.parametrize("case", ["absolute", "relative", "symlink"])
def test_the_process_environment_is_never_read_as_a_template_or_include(root, opened, case):
    # /proc/self/environ holds the process's secrets (API keys among them): bioproxy's
    # config folder is usually next to them, and the rule is what keeps it out of prompts.
    path = environ_paths(root)[case]
    outside = f"resolves outside the template root {root}"

    with refused(f"template {path} {outside}"):
        load_from(root, path)
    assert opened == []
    (root / "t.txt").write_text(f"Env: <{{{path}}}>\n<{{message}}>")
    with refused(f"template t.txt: include {path} {outside}"):
        load_from(root)
    # The template itself was opened (and checked through its descriptor), never the
    # file it names.
    assert opened == [str(root / "t.txt")]


def test_a_symlinked_root_is_compared_by_its_real_path(tmp_path, root):
    write(root / "t.txt", "T")
    os.symlink(root, tmp_path / "alias")

    loaded = load("@t", "t.txt", str(tmp_path / "alias"), str(tmp_path / "alias"), MAX)

    assert loaded.files == (str(root / "t.txt"),)


# Files that cannot be used

BROKEN = {
    "missing": ("bad.txt", None, "does not exist"),
    "directory": ("bad", "dir", "is a directory"),
    "fifo": ("bad", "fifo", "is not a regular file"),
    "not UTF-8": ("bad.txt", b"caf\xe9", "is not valid UTF-8 text"),
    "too large": ("bad.txt", "x" * (MAX + 1), f"is larger than {MAX} bytes"),
    # chmod 000 does not stop root, but a path through a regular file fails for anyone.
    "unreadable": ("plain.txt/bad", None, "cannot be read: [Errno 20] Not a directory: "),
}


def make_broken(root, case):
    """Create the broken file of a BROKEN case; the expected reason, complete."""
    name, content, reason = BROKEN[case]
    if case == "unreadable":
        write(root / "plain.txt", "")
        reason += repr(str(root / name))
    elif content == "dir":
        (root / name).mkdir()
    elif content == "fifo":
        os.mkfifo(root / name)
    elif content is not None:
        write(root / name, content)
    return name, reason


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_template_is_refused(root, case):
    name, reason = make_broken(root, case)

    with refused(f"template {name} {reason}"):
        load_from(root, name)


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_include_is_refused_naming_both_files(root, case):
    name, reason = make_broken(root, case)

    with refused(f"template t.txt: include {name} {reason}"):
        template(root, f"Intro <{{{name}}}> <{{message}}>")


def test_a_file_of_exactly_max_bytes_is_allowed(root):
    loaded = template(root, "<{a.txt}><{message}>", {"a.txt": "é" * (MAX // 2)})

    assert loaded.head == "é" * (MAX // 2)


def test_the_expanded_size_is_limited_in_utf8_bytes(root):
    with refused(f"template t.txt is larger than {MAX} bytes with its includes expanded"):
        template(root, "x<{a.txt}><{message}>", {"a.txt": "é" * (MAX // 2)})


def test_repeated_includes_count_towards_the_expanded_size(root):
    with refused(f"template t.txt is larger than {MAX} bytes with its includes expanded"):
        template(root, "<{a.txt}>" * 3, {"a.txt": "a" * 40})


def test_a_file_larger_than_its_stat_size_is_cut_at_max_bytes():
    # /proc files report size 0 but have content: only the read itself can stop them.
    with refused("template /proc/self/status is larger than 10 bytes"):
        load("@t", "/proc/self/status", "/", "/proc", 10)


# Digest


def test_the_digest_stays_while_nothing_changes(root):
    first = template(root, "<{a.txt}> <{message}>", {"a.txt": "A"})

    assert re.fullmatch("[0-9a-f]{64}", first.digest)
    assert load_from(root).digest == first.digest


def test_the_digest_changes_when_an_include_changes(root):
    first = template(root, "<{a.txt}> <{message}>", {"a.txt": "A"})
    write(root / "a.txt", "B")

    assert load_from(root).digest != first.digest


def test_the_digest_tells_a_literal_placeholder_from_a_real_one(root):
    # Both expand to the same text if the pieces were simply joined with MESSAGE.
    literal = template(root, "x<{a.txt}>", {"a.txt": f"{MESSAGE}y"})
    real = template(root, f"x{MESSAGE}y{MESSAGE}")

    assert literal.render("!") == "x<{message}>y!"
    assert real.render("!") == "x!y!"
    assert literal.digest != real.digest


# Prefixes

PREFIXES = ["@code", "@codex", "@doc"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("@codex hi", "@codex"),
        ("@code hi", "@code"),
        ("@code", "@code"),
        ("@codex", "@codex"),
        ("@codexhi", None),
        ("@codehi", None),
        ("@Code hi", None),
        (" @code hi", None),
        ("hi @code", None),
        ("@doc  two", "@doc"),
        ("", None),
    ],
)
def test_match_prefix_picks_the_longest_whole_prefix(text, expected):
    assert match_prefix(text, PREFIXES) == expected
    assert match_prefix(text, reversed(PREFIXES)) == expected


def test_match_prefix_prefers_a_longer_prefix_that_holds_a_space():
    # Only such prefixes can both match one text; config refuses them, this module does not.
    for prefixes in (["@code", "@code fast"], ["@code fast", "@code"]):
        assert match_prefix("@code fast hi", prefixes) == "@code fast"
        assert match_prefix("@code fastest", prefixes) == "@code"


def test_match_prefix_takes_any_iterable_of_strings():
    assert match_prefix("@b x", {"@a": "a.txt", "@b": "b.txt"}) == "@b"
    assert match_prefix("@b x", (p for p in ["@a", "@b"])) == "@b"
    assert match_prefix("@b x", []) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("@code How do I x", "How do I x"),
        ("@code", ""),
        ("@code ", ""),
        ("@code  two spaces", " two spaces"),
        ("@code line\nnext", "line\nnext"),
    ],
)
def test_strip_prefix_removes_the_prefix_and_one_space(text, expected):
    assert strip_prefix(text, "@code") == expected


def test_strip_prefix_refuses_text_without_that_prefix():
    with pytest.raises(ValueError, match=r"^'@codex hi' does not start with the prefix '@code'$"):
        strip_prefix("@codex hi", "@code")


# Issue 16.8: the path was resolved and checked, then opened by name. Swapped in between,
# it read a file outside the root (5 times in 50,000 loads).


@pytest.mark.parametrize("swapped", ["file", "folder"])
def test_a_path_swapped_for_a_symlink_after_its_check_is_refused(tmp_path, monkeypatch, swapped):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    write(root / "sub" / "t.txt", "Mine: <{message}>")
    write(outside / "t.txt", "SECRET <{message}>")
    real_resolve = templates.resolve

    def resolve_then_swap(path, base_dir, root_dir):
        real = real_resolve(path, base_dir, root_dir)
        if swapped == "file":
            os.remove(real)
            os.symlink(outside / "t.txt", real)
        else:
            os.rename(root / "sub", root / "old")
            os.symlink(outside, root / "sub")
        return real

    monkeypatch.setattr(templates, "resolve", resolve_then_swap)
    with pytest.raises(templates.TemplateError, match="replaced"):
        load("@t", "sub/t.txt", str(root), str(root), MAX)


def test_no_load_reads_outside_the_root_while_a_file_is_swapped_for_a_symlink(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    write(secret, "SECRET")
    target = root / "t.txt"
    write(target, "Mine.")
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            os.symlink(secret, root / "link.tmp")
            os.replace(root / "link.tmp", target)  # a symlink out of the root
            write(root / "plain.tmp", "Mine.")
            os.replace(root / "plain.tmp", target)  # a plain file again

    swapper = threading.Thread(target=swap)
    swapper.start()
    heads = set()
    try:
        for _ in range(5000):
            with contextlib.suppress(TemplateError):  # refused: fine
                heads.add(load("@t", "t.txt", str(root), str(root), MAX).head)
    finally:
        stop.set()
        swapper.join()
    assert heads <= {"Mine."}, heads
