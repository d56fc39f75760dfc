"""A template edited while bioproxy warms it, with a real llama-server.

The template is long and warmed in short pieces, so its warmup lasts seconds; the file is
edited while it runs, atomically or not. Once things settle, what bioproxy lists as warm
and saved must be the file's final text, and an answer that bioproxy labels as served
from its cache must have reused the cache of the text it was expanded with: llama-server
tells how many prompt tokens it reused (timings.cache_n). The two versions differ from
their first line on, so a cache of the other version would give only the chat
template's own few tokens.
"""

import json
import os
import time

import pytest
import requests

from bioproxy import templates
from bioproxy.prompts import SENTINEL
from tests.faultproxy import FaultProxy
from tests.servers import Bioproxy, wait_until

# One question per request, so that what llama-server got for each can be told apart.
QUESTIONS = [f"Which rule is about topic {i}?" for i in range(3)]
TAIL = "Question: <{message}>\n"
SLACK = 2  # tokens: where the template meets the message, tokenization may differ


def rules(version, lines):
    """A version's text: its name first, then one short line per rule."""
    body = "".join(
        f"Rule {i}: about topic {i} in version {version}, answer in one sentence.\n"
        for i in range(lines)
    )
    return f"Version {version} of the rules.\n{body}"


# A lasts long enough to be edited mid-warmup; B, shorter, is warmed sooner, and its
# token count differs from A's too.
OLD, NEW = rules("A", 40), rules("B", 12)


def wait_for(check, timeout, what, describe=lambda: ""):
    return wait_until(check, timeout, what, describe, every=0.05)


class Changes:
    """bioproxy with one template, behind a recorder of what llama-server gets."""

    def __init__(self, llama, folder, prefix, include=False):
        self.llama = llama
        self.folder = folder
        self.prefix = prefix
        (folder / "templates").mkdir()
        self.path = folder / "templates" / "t.txt"
        # With include, the rules are in their own file, and that file is the one edited.
        self.edited = folder / "templates" / "rules.txt" if include else self.path
        if include:
            self.path.write_text("<{templates/rules.txt}>" + TAIL)
            self.edited.write_text(OLD)
        else:
            self.path.write_text(OLD + TAIL)
        self.recorder = FaultProxy(llama.port)
        config = {
            "prefixes": {prefix: "templates/t.txt"},
            # Passes often, so that an edit is seen while the warmup still runs; pieces
            # of one line each, so that the warmup lasts seconds even on a fast machine.
            "warmup_check_interval": 0.2,
            "warmup_piece_chars": 40,
            "template_root": "templates",
            "slot_save_path": llama.slot_save_path,
        }
        self.server = Bioproxy(self.recorder.url, folder, config)

    def load(self):
        root = str(self.folder / "templates")
        return templates.load(self.prefix, "templates/t.txt", str(self.folder), root, 1 << 20)

    def listed(self):
        return self.server.templates()[self.prefix]

    def warmups(self):
        """/status's warmups of the template: (running, ended), ended oldest first."""
        warmups = requests.get(self.server.admin_url + "/status", timeout=10).json()["warmups"]
        return tuple(
            [w for w in warmups[kind] if w["template"] == self.prefix]
            for kind in ("running", "recent")
        )

    def warming_for(self):
        """Seconds the template's evaluation has been running, or None."""
        running, _ = self.warmups()
        return running[0]["seconds"] if running else None

    def head_tokens(self, template):
        """Tokens of the template's text before the message, as llama-server renders it."""
        messages = [{"role": "user", "content": template.render(SENTINEL)}]
        prompt = self.call("/apply-template", {"messages": messages})["prompt"]
        head = prompt[: prompt.index(SENTINEL)]
        return len(self.call("/tokenize", {"content": head})["tokens"])

    def call(self, path, body):
        answer = requests.post(self.llama.url + path, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def ask(self, question):
        answer = requests.post(
            self.server.proxy_url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": f"{self.prefix} {question}"}],
                "max_tokens": 4,
                "temperature": 0,
            },
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
        return answer

    def expanded_with(self, question):
        """The text of the request llama-server got with the question in it."""
        return json.loads(self.recorder.body_with(question.encode()))["messages"][-1]["content"]


@pytest.fixture
def changes(llama, tmp_path, request):
    # One prefix per test, so that the slot files the shared llama-server keeps apart.
    case = request.node.callspec.id if hasattr(request.node, "callspec") else "during"
    prefix, include = "@" + case, case == "include"
    made = Changes(llama, tmp_path, prefix, include)
    try:
        made.server.start().wait_ready()
        yield made
    finally:
        made.server.stop()
        made.recorder.close()


def replace(changes):
    """An editor's safe save: a new file renamed over the old one."""
    temporary = changes.edited.with_suffix(".new")
    temporary.write_text(_final_text(changes))
    os.replace(temporary, changes.edited)


def rewrite(changes):
    """A save in place: the file is truncated, then written."""
    with open(changes.edited, "w") as f:
        f.write(_final_text(changes))


def truncate_pause_write(changes):
    """A save in place that bioproxy sees half done: the empty file, then the new text."""
    with open(changes.edited, "w"):
        pass
    empty = changes.load().digest
    wait_for(lambda: changes.listed()["digest"] == empty, 30, "the empty file seen")
    rewrite(changes)


def _final_text(changes):
    return NEW if changes.edited != changes.path else NEW + TAIL


def start_editing(changes, edit):
    """Edit the template while its first warmup runs: the final Template."""
    old = changes.load()
    # Some pieces in, so that the edit lands inside the evaluation, not before it.
    wait_for(lambda: (changes.warming_for() or 0) >= 0.3, 120, "the first warmup to be under way")
    assert changes.listed()["digest"] == old.digest
    edited_at = time.time()
    edit(changes)
    final = changes.load()
    assert final.digest != old.digest
    return final, edited_at


def assert_edited_mid_warmup(changes, edited_at):
    """The case under test: the first warmup (of the old text) ended after the edit began."""
    ended = wait_for(lambda: changes.warmups()[1], 240, "the first warmup to end")
    assert ended[0]["at"] > edited_at, "the first warmup ended before the edit"


def assert_settled_on(changes, final):
    """Warm and saved: the final text, and nothing else; a request reuses its cache."""

    def settled():
        listed = changes.listed()
        return (
            listed["state"] == "warm"
            and listed["digest"] == final.digest
            and listed["saved_file"] is not None
        )

    wait_for(settled, 180, "the final text warm and saved", lambda: changes.listed())
    tokens = changes.head_tokens(final)
    listed = changes.listed()
    assert listed["tokens"] in (tokens, tokens + 1), (listed, tokens)
    assert final.digest[:16] in listed["saved_file"]
    # saved.json holds the final version only, and its file is the only one left.
    with open(changes.folder / "state" / "saved.json") as f:
        saved = json.load(f)
    assert saved[changes.prefix]["digest"] == final.digest
    name = listed["saved_file"].rsplit("-", 2)[0] + "-"
    files = [f for f in os.listdir(changes.llama.slot_save_path) if f.startswith(name)]
    assert files == [listed["saved_file"]]

    # Served from the slot that holds it.
    answer = changes.ask(QUESTIONS[1])
    assert changes.expanded_with(QUESTIONS[1]) == final.render(QUESTIONS[1])
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert answer.json()["timings"]["cache_n"] >= tokens - SLACK, answer.json()["timings"]

    # Served from its file, once another task has run in that slot.
    status = requests.get(changes.server.admin_url + "/status", timeout=10).json()
    slot = next(s["id"] for s in status["slots"] if s["template"] == changes.prefix)
    changes.call("/completion", {"prompt": "Hello", "n_predict": 1, "id_slot": slot})
    answer = changes.ask(QUESTIONS[2])
    assert changes.expanded_with(QUESTIONS[2]) == final.render(QUESTIONS[2])
    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.json()["timings"]["cache_n"] >= tokens - SLACK, answer.json()["timings"]


@pytest.mark.parametrize(
    "edit",
    [replace, rewrite, truncate_pause_write, rewrite],
    ids=["replaced", "rewritten", "emptiedfirst", "include"],
)
def test_an_edit_during_the_warmup_ends_with_the_final_text_warm(changes, edit):
    final, edited_at = start_editing(changes, edit)

    assert_edited_mid_warmup(changes, edited_at)
    assert_settled_on(changes, final)


def test_a_request_during_the_edit_is_labelled_by_the_cache_it_reused(changes):
    old = changes.load()
    final, edited_at = start_editing(changes, replace)

    # A user arrives: the warmup gives way, and the request is expanded with whichever
    # version bioproxy has read by then.
    answer = changes.ask(QUESTIONS[0])
    expanded = changes.expanded_with(QUESTIONS[0])
    used = [t for t in (old, final) if t.render(QUESTIONS[0]) == expanded]
    assert len(used) == 1, "expanded with neither version, or a mix of the two"
    timings = answer.json()["timings"]
    if answer.headers["X-Bioproxy-Cache"] in ("slot", "restored"):
        assert timings["cache_n"] >= changes.head_tokens(used[0]) - SLACK, timings

    assert_edited_mid_warmup(changes, edited_at)
    assert_settled_on(changes, final)
