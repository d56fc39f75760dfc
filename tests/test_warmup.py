"""Warming, saving and restoring templates, against a fake llama-server."""

import json
import time
from pathlib import Path

import gevent
import pytest
import requests
import responses

from bioproxy.errors import ClientGone
from bioproxy.scheduler import USER, Ticket
from bioproxy.slot_table import partial_digest
from tests.conftest import ADMIN_BASE, BACKEND
from tests.fake_llama import END, SYSTEM
from tests.test_metrics import samples

CODE = "You answer coding questions well and briefly.\n<{message}>\nBe exact."
REVIEW = "You review code.\n<{message}>"


def templates_folder(config_path):
    """The config file's folder, with two templates and a slot folder in it."""
    folder = config_path.parent
    (folder / "code.txt").write_text(CODE)
    (folder / "review.txt").write_text(REVIEW)
    (folder / "slots").mkdir()
    return folder


@pytest.fixture
def folder(isolated_config):
    return templates_folder(isolated_config)


@pytest.fixture
def llama(fake_llama):
    return fake_llama


@pytest.fixture
def app(make_app, folder, llama):
    return make_app(
        prefixes={"@code": "code.txt", "@review": "review.txt"},
        slot_save_path=str(folder / "slots"),
    )


def backend(app):
    return app.extensions["bioproxy"].backend


def warmer(app):
    return backend(app).warmer


def catalog(app):
    return app.extensions["bioproxy"].catalog


def ask(client, text, **extra):
    body = {"messages": [{"role": "user", "content": text}], **extra}
    return client.post("/v1/chat/completions", data=json.dumps(body), buffered=True)


def sample(admin, name, **labels):
    return samples(admin).get((name, tuple(sorted(labels.items()))), 0)


def test_start_up_warms_and_saves_each_template(app, llama, admin):
    warmer(app).check()

    heads = [prompt for _, prompt in llama.evaluated]
    assert heads == [
        SYSTEM + "You answer coding questions well and briefly.\n",
        SYSTEM + "You review code.\n",
    ]
    assert [a for a, _, _ in llama.actions] == ["save", "save"]
    states = {e["prefix"]: e["state"] for e in admin.get("/templates").get_json()["templates"]}
    assert states == {"@code": "warm", "@review": "warm"}
    assert sample(admin, "bioproxy_warmups_total", template="@code", outcome="ok") == 1
    assert sample(admin, "bioproxy_slot_saves_total", template="@code", outcome="ok") == 1


def test_a_warm_template_is_served_from_its_slot_without_restoring(app, llama, client):
    warmer(app).check()
    llama.actions.clear()

    answer = ask(client, "@code How do I reverse a list?")

    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Template"] == "@code"
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    sent = llama.chats[-1]
    assert sent["messages"][-1]["content"] == (
        "You answer coding questions well and briefly.\nHow do I reverse a list?\nBe exact."
    )
    assert sent["id_slot"] == llama.evaluated[0][0]
    assert llama.actions == []
    assert answer.get_json()["timings"]["cache_n"] == len((SYSTEM + CODE.split("<")[0]).split())


def test_a_template_pushed_out_of_its_slot_is_restored(app, llama, client, admin):
    warmer(app).check()
    slot = llama.evaluated[0][0]
    llama.run_other_task(slot)

    answer = ask(client, "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert llama.actions[-1][:2] == ("restore", slot)
    assert answer.get_json()["timings"]["cache_n"] > 0
    assert sample(admin, "bioproxy_slot_restores_total", template="@code", outcome="ok") == 1
    assert (
        sample(admin, "bioproxy_template_requests_total", template="@code", cache="restored") == 1
    )


def test_a_failed_restore_still_answers_cold_and_is_counted(app, llama, client, admin):
    warmer(app).check()
    llama.run_other_task(llama.evaluated[0][0])
    llama.files.clear()  # the slot folder lost its files: restore answers 400

    answer = ask(client, "@code Why?")

    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Cache"] == "cold"
    assert answer.get_json()["timings"]["cache_n"] == 0
    assert sample(admin, "bioproxy_slot_restores_total", template="@code", outcome="failed") == 1
    # The file is forgotten and the template warmed again at the next pass.
    assert backend(app).warmth["@code"].state == "stale"
    assert backend(app).caches.find("@code", catalog(app)["@code"].template) is None


def test_a_restore_that_times_out_on_a_busy_slot_answers_cold(app, llama, client, admin):
    warmer(app).check()
    llama.run_other_task(llama.evaluated[0][0])
    llama.error["restore"] = requests.ReadTimeout("slot busy")

    answer = ask(client, "@code Why?")

    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Cache"] == "cold"
    assert sample(admin, "bioproxy_slot_restores_total", template="@code", outcome="failed") == 1


def test_without_slot_save_path_templates_warm_but_are_not_saved(app, llama, client, admin):
    llama.status["save"] = 501

    warmer(app).check()
    answer = ask(client, "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert sample(admin, "bioproxy_slot_saves_total", template="@code", outcome="failed") == 1
    assert backend(app).caches.registry.entries == {}
    # Pushed out, there is nothing to restore from: no restore attempted, and the request
    # goes unpinned, left to llama-server's own cache (a RAM copy, when it kept one): a
    # request pinned to an empty slot never loads from it.
    llama.run_other_task(llama.chats[-1]["id_slot"])
    llama.actions.clear()
    answer = ask(client, "@code Again?")
    assert answer.headers["X-Bioproxy-Cache"] == "server"
    assert llama.actions == []
    assert "id_slot" not in llama.chats[-1]
    # Counted as what it was: this llama-server kept no copy, and evaluated the template.
    assert answer.get_json()["timings"]["cache_n"] == 0
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="cold") == 1
    assert sample(admin, "bioproxy_template_cache_misses_total", template="@code") == 0


def test_an_edited_template_is_warmed_again_and_its_old_file_deleted(app, llama, folder):
    warmer(app).check()
    old_file = backend(app).caches.registry.entries["@code"]["file"]
    (folder / "slots" / old_file).write_bytes(b"kv")
    (folder / "code.txt").write_text("New instructions.\n<{message}>")

    warmer(app).check()

    assert llama.evaluated[-1][1] == SYSTEM + "New instructions.\n"
    new_file = backend(app).caches.registry.entries["@code"]["file"]
    assert new_file != old_file
    assert not (folder / "slots" / old_file).exists()


def test_an_unchanged_template_is_not_warmed_again(app, llama):
    warmer(app).check()
    warmer(app).check()

    assert len(llama.evaluated) == 2


def test_a_restarted_llama_server_gets_its_templates_restored_without_a_request(app, llama):
    warmer(app).check()
    llama.restart()
    llama.actions.clear()

    warmer(app).check()

    assert sorted(a for a, _, _ in llama.actions) == ["restore", "restore"]
    assert len(llama.evaluated) == 2  # nothing evaluated again
    assert all(llama.contents[s] for s in llama.contents)


def test_another_model_gets_its_templates_evaluated_again(app, llama):
    warmer(app).check()
    llama.restart(model="/models/other.gguf")

    warmer(app).check()

    assert len(llama.evaluated) == 4
    assert not any(a == "restore" for a, _, _ in llama.actions)


def restored_only(app, make_app, llama, folder):
    """A bioproxy that has only restored its templates, into a llama-server new to them."""
    warmer(app).check()
    llama.restart()
    again = make_app(
        prefixes={"@code": "code.txt", "@review": "review.txt"},
        slot_save_path=str(folder / "slots"),
    )
    warmer(again).check()
    return again


def test_a_restarted_bioproxy_restores_instead_of_warming(app, make_app, llama, folder):
    restored_only(app, make_app, llama, folder)

    assert len(llama.evaluated) == 2
    assert [a for a, _, _ in llama.actions].count("restore") == 2


def test_each_restore_of_the_warmer_is_proven_by_one_completion_of_the_head(
    app, make_app, llama, folder
):
    again = restored_only(app, make_app, llama, folder)

    # The head completed once where it was restored, reusing it: not evaluated again.
    heads = sorted(prompt for _, prompt in llama.evaluated)
    assert sorted(prompt for _, prompt in llama.checks) == heads
    restores = {slot for action, slot, _ in llama.actions if action == "restore"}
    assert {slot for slot, _ in llama.checks} == restores
    # The slots now show a task of bioproxy's own.
    assert all(llama.tasks[slot] >= 0 for slot in restores)
    assert {w.state for w in backend(again).warmth.values()} == {"warm"}


def test_a_restart_after_bioproxy_only_restored_into_the_slots_is_noticed(
    app, make_app, llama, folder, caplog
):
    # Issue 16.5: a slot only restored looked exactly like a new server's, so the first
    # request per template after a restart was sent to an empty slot as warm.
    again = restored_only(app, make_app, llama, folder)
    llama.restart()

    answer = ask(again.test_client(), "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] > 0
    warmer(again).check()
    assert "llama-server restarted" in caplog.text
    assert all(llama.contents[slot] for slot in llama.contents)  # both restored again


def test_a_restore_that_did_not_hold_is_evaluated_and_saved_again(
    app, make_app, llama, folder, caplog
):
    warmer(app).check()
    llama.restart()

    def lose_the_restore(action, slot, name):
        if action == "restore":
            # As many tokens as were saved, but not the template's.
            llama.files[name] = " ".join("x" * len(llama.files[name].split()))

    llama.on_action = lose_the_restore
    again = make_app(prefixes={"@code": "code.txt"}, slot_save_path=str(folder / "slots"))
    warmer(again).check()

    assert "yet llama-server evaluated" in caplog.text
    assert [a for a, _, _ in llama.actions][-2:] == ["restore", "save"]
    assert llama.checks == []
    entry = backend(again).warmth["@code"]
    assert entry.state == "warm" and entry.last_warmup["outcome"] == "ok"


def test_a_user_s_restore_that_the_answer_shows_did_not_hold_is_not_used_again(
    app, llama, client, caplog
):
    warmer(app).check()
    slot = llama.evaluated[0][0]
    llama.run_other_task(slot)
    name = backend(app).caches.registry.entries["@code"]["file"]
    # As many tokens as were saved, but not the template's: restored without a word.
    llama.files[name] = " ".join("x" * len(llama.files[name].split()))

    answer = ask(client, "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] == 0
    assert "reused only 0 of its" in caplog.text
    assert "@code" not in backend(app).caches.registry.entries
    warmer(app).check()  # saved again, from the slot the request left it in
    assert backend(app).caches.registry.entries["@code"]["file"] == name
    assert llama.files[name] == llama.contents[slot]
    assert backend(app).warmth["@code"].state == "warm"


def test_a_slot_llama_server_cleared_while_idle_is_not_taken_for_warm(app, llama, client, admin):
    # Issue 11: with a unified KV cache (llama.cpp's default when -np is not given),
    # llama-server clears every idle slot when a task starts, keeping its task id; only
    # GET /slots's token count shows it. Such a slot was sent requests as "slot", cold.
    llama.clears_idle_slots = True
    warmer(app).check()  # @review's evaluation cleared @code's slot
    code_slot = llama.evaluated[0][0]
    assert llama.contents[code_slot] == ""
    assert backend(app).slots.table.cleared  # seen at once

    answer = ask(client, "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] > 0
    assert (
        sample(admin, "bioproxy_template_requests_total", template="@code", cache="restored") == 1
    )
    assert backend(app).slots.table.cleared


def test_a_request_expected_warm_that_came_back_cold_is_counted_as_a_miss(
    app, llama, client, admin, caplog
):
    llama.shows_tokens = False  # as a llama-server that does not say what a slot holds
    warmer(app).check()
    slot = next(slot for slot, held in backend(app).slots.table.held.items() if held[0] == "@code")
    caplog.set_level("INFO", logger="bioproxy")
    answers = []
    for _ in range(2):
        llama.contents[slot] = ""  # emptied without a task
        answers.append(ask(client, "@code Why?"))

    # The header was an honest expectation; what the answer showed is what is counted.
    assert [a.headers["X-Bioproxy-Cache"] for a in answers] == ["slot", "slot"]
    assert all(a.get_json()["timings"]["cache_n"] == 0 for a in answers)
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="cold") == 2
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="slot") == 0
    assert (
        sample(admin, "bioproxy_template_cache_misses_total", template="@code", expected="slot")
        == 2
    )
    assert caplog.text.count("expected warm (slot)") == 1  # logged once
    access = [r.getMessage() for r in caplog.records if r.name == "bioproxy.access"]
    assert all("template=@code cache=cold" in line for line in access), access
    assert backend(app).warmth["@code"].requests == {
        "slot": 0,
        "restored": 0,
        "server": 0,
        "cold": 2,
    }


def test_with_llama_cpp_s_defaults_requests_go_unpinned_to_its_own_cache(app, llama, client, admin):
    # Issue 11: llama-server started with only -m and --port clears idle slots into its
    # RAM cache and has no slot folder. Pinned to the emptied slot, every templated
    # request was evaluated in full, reported "slot"; unpinned, llama-server reloads it.
    llama.clears_idle_slots = True
    llama.status = {"save": 501, "restore": 501}
    warmer(app).check()  # both evaluated, neither saved; @code's slot cleared into RAM

    texts = ["@code Why?", "A plain question.", "@code And?", "@review Look at this."]
    answers = [ask(client, text) for text in texts]

    assert all(a.status_code == 200 for a in answers)
    assert all("id_slot" not in body for body in llama.chats)
    templated = [answers[0], answers[2], answers[3]]
    assert [a.headers["X-Bioproxy-Cache"] for a in templated] == ["server"] * 3
    assert all(a.get_json()["timings"]["cache_n"] > 0 for a in templated)
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="server") == 2
    assert backend(app).scheduler.busy == {}
    mode = admin.get("/status").json["backend_mode"]
    assert (mode["pinned"], mode["clears_idle_slots"], mode["saves"]) == (False, True, False)
    assert any("--slot-save-path" in note for note in mode["notes"])
    # No warmup llama-server: users who arrive during a warmup are told what it costs.
    assert any("own slots" in note and "warmup_backend_url" in note for note in mode["notes"])


def test_a_llama_server_that_hides_its_slots_is_said_so_not_waited_for(
    app, llama, client, admin, caplog
):
    # llama-server --no-slots answers GET /slots 501. bioproxy logged "llama-server is
    # not ready, warmups wait" as if that would pass, and /status said nothing.
    llama.hides_slots = True
    warmer(app).check()
    warmer(app).check()

    assert llama.evaluated == []  # nothing warmed: its slots cannot be seen
    assert ask(client, "@code Why?").status_code == 200  # requests still go on
    notes = admin.get("/status").json["backend_mode"]["notes"]
    assert any("--no-slots" in note for note in notes)
    assert not any("own slots" in note for note in notes)  # it warms nowhere
    assert sum("--no-slots" in r.message for r in caplog.records) == 1  # said once
    assert not any("not ready" in r.message for r in caplog.records)

    llama.hides_slots = False  # started again without it
    warmer(app).check()
    assert not any("--no-slots" in n for n in admin.get("/status").json["backend_mode"]["notes"])
    assert backend(app).warmth["@code"].state.value == "warm"


def test_a_follow_up_turn_keeps_the_template_and_reuses_the_cache(app, llama, client):
    # Issue 11.4: the follow-up was sent with the opening message raw, evaluated in full.
    warmer(app).check()
    first = ask(client, "@code How do I reverse a list?")
    history = [
        {"role": "user", "content": "@code How do I reverse a list?"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "And in place?"},
    ]

    answer = client.post(
        "/v1/chat/completions", data=json.dumps({"messages": history}), buffered=True
    )

    head = len((SYSTEM + CODE.split("<")[0]).split())
    assert first.headers["X-Bioproxy-Cache"] == answer.headers["X-Bioproxy-Cache"] == "slot"
    sent = llama.chats[-1]["messages"]
    assert sent[0]["content"] == llama.chats[0]["messages"][0]["content"]  # as on turn one
    assert sent[2]["content"] == "And in place?"
    timings = answer.get_json()["timings"]
    assert timings["cache_n"] >= head and timings["prompt_n"] <= 4


def test_admin_can_ask_for_a_warmup(app, llama, admin):
    warmer(app).check()

    answer = admin.post("/templates/@code/warmup")
    warmer(app).check()

    assert answer.status_code == 202
    assert answer.get_json()["prefix"] == "@code"
    assert len(llama.evaluated) == 3  # evaluated again, not restored
    assert admin.post("/templates/@nope/warmup").status_code == 404


def test_the_watcher_never_waits_for_a_warmup_that_waits_for_the_watcher(app, llama):
    # Issue 16.3: after a reload, every slot busy with the old worker's streams and two
    # templates due: the pass blocked starting the second warmup, while the first waited
    # for a slot that only the next pass could free. Invariant: a pass waits for nothing
    # but llama-server's answers; whatever a warmup waits for, a later pass can provide.
    llama.busy = {0, 1}
    for _ in range(3):
        gevent.with_timeout(5, warmer(app).check, wait=False)
        gevent.sleep(0.01)
    assert backend(app).scheduler.foreign == {0, 1}
    assert {w.state for w in backend(app).warmth.values()} == {"stale"}  # due, none warm

    llama.busy = set()  # the old worker's streams ended
    for _ in range(10):
        gevent.with_timeout(5, warmer(app).check, wait=False)
        gevent.sleep(0.05)
    assert {w.state for w in backend(app).warmth.values()} == {"warm"}


def test_templates_left_for_want_of_room_are_warmed_when_a_warmup_ends(make_app, folder, llama):
    # One warmup at a time (warmup_concurrency 1): a pass starts the first template and
    # leaves the second to the next pass, which came only an interval (30 s) later.
    app = make_app(
        prefixes={"@code": "code.txt", "@review": "review.txt"},
        slot_save_path=str(folder / "slots"),
        warmup_check_interval=600,
    )
    watcher = warmer(app)
    watcher.start()
    try:
        states = lambda: {w.state for w in backend(app).warmth.values()}  # noqa: E731
        deadline = time.monotonic() + 5
        while states() != {"warm"} and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert states() == {"warm"}
    finally:
        watcher.stop()


def test_only_requests_that_need_a_slot_hold_warmups_off(app, llama, client):
    # Issue 16.9: any POST did; one every 2 s (a 404 path) kept every warmup cancelled.
    calls = []
    started = backend(app).gate.user_started
    backend(app).gate.user_started = lambda: (calls.append(1), started())
    responses.post(f"{BACKEND}/nope", status=404, json={"error": {"message": "not found"}})
    responses.post(f"{BACKEND}/tokenize", json={"tokens": [1]})

    assert client.post("/nope", data=b"{}").status_code == 404
    assert client.post("/tokenize", data=b'{"content": "x"}').status_code == 200
    assert client.post("/v1/chat/completions", data=b"{not json").status_code == 400
    assert calls == []
    assert ask(client, "hi").status_code == 200
    assert calls == [1]


def test_a_prefix_with_a_slash_can_be_warmed_from_the_admin_port(make_app, folder, llama):
    # Issue 16.9: the route took one path segment, so "@a/b" was a 404.
    app = make_app(prefixes={"@a/b": "code.txt", "@ab": "review.txt"})
    warmer(app).check()
    admin = app.test_client(base_url=ADMIN_BASE)

    answer = admin.post("/templates/@a/b/warmup")
    warmer(app).check()

    assert answer.status_code == 202
    assert answer.get_json()["prefix"] == "@a/b"
    assert len(llama.evaluated) == 3
    # Two saved files, one for each: "@ab" is not "@a/b" with its "/" dropped.
    assert len({e["file"] for e in backend(app).caches.registry.entries.values()}) == 2


def test_one_slot_serves_every_template(make_app, folder, llama, client):
    llama.tasks, llama.contents = {0: -1}, {0: ""}
    app = make_app(prefixes={"@code": "code.txt", "@review": "review.txt"})
    client = app.test_client()

    warmer(app).check()
    first = ask(client, "@code A?")
    second = ask(client, "@review B")
    third = ask(client, "@code C?")

    assert {slot for slot, _ in llama.evaluated} == {0}
    assert [c["id_slot"] for c in llama.chats] == [0, 0, 0]
    # Each request finds the other template in the slot, and restores its own.
    assert [a.headers["X-Bioproxy-Cache"] for a in (first, second, third)] == ["restored"] * 3


def test_a_broken_template_answers_a_clear_error_and_nothing_else_changes(
    make_app, folder, llama, admin
):
    (folder / "bad.txt").write_text("Secrets: <{../../etc/passwd}>\n<{message}>")
    app = make_app(prefixes={"@code": "code.txt", "@bad": "bad.txt"})
    client, admin = app.test_client(), app.test_client(base_url="http://localhost:8089")
    warmer(app).check()

    answer = ask(client, "@bad hello")
    fine = ask(client, "@code hello")

    assert answer.status_code == 500
    error = answer.get_json()["error"]
    assert error["code"] == "template_broken"
    assert "@bad" in error["message"] and "outside the template root" in error["message"]
    assert fine.status_code == 200
    assert all("passwd" not in json.dumps(c) for c in llama.chats)
    assert all("etc/passwd" not in p for _, p in llama.evaluated)
    listed = {e["prefix"]: e for e in admin.get("/templates").get_json()["templates"]}
    assert listed["@bad"]["state"] == "broken"
    assert "outside the template root" in listed["@bad"]["error"]
    assert sample(admin, "bioproxy_template_broken", template="@bad") == 1
    assert sample(admin, "bioproxy_template_broken", template="@code") == 0


def test_timings_of_templated_requests_are_counted(app, llama, client, admin):
    warmer(app).check()

    timings = ask(client, "@code How?").get_json()["timings"]

    assert timings["cache_n"] > 0
    reused = sample(admin, "bioproxy_prompt_tokens_reused_total", template="@code")
    evaluated = sample(admin, "bioproxy_prompt_tokens_evaluated_total", template="@code")
    assert (reused, evaluated) == (timings["cache_n"], timings["prompt_n"])


def test_the_chat_template_renders_the_warmed_head(app, llama):
    warmer(app).check()

    assert llama.evaluated[0][1].startswith(SYSTEM)
    assert not llama.evaluated[0][1].endswith(END)


# Every spelling that llama-server's router sends to its slot actions ("/slots/:id_slot"
# in cpp-httplib: any one segment, one trailing "/", %XX and %uXXXX decoded first).
SLOT_ACTION_SPELLINGS = [
    "/slots/0?action=erase",
    "/slots/0/?action=erase",
    "/slots/?action=erase",
    "/slots/x?action=erase",
    "/slots%2F0?action=erase",
    "/slots%2f0%2F?action=erase",
    "/%73lots/0?action=erase",
    "/slot%u0073/0?action=erase",
    "/slots/0#x?action=erase",
    "/prefix/slots/0?action=erase",
]


@pytest.mark.parametrize("target", SLOT_ACTION_SPELLINGS)
def test_clients_may_not_use_the_slot_api_while_templates_are_served(app, llama, client, target):
    answer = client.post(target, data=b"{}", environ_overrides={"RAW_URI": target})

    assert answer.status_code == 403
    assert answer.get_json()["error"]["code"] == "slot_api_reserved"
    assert llama.actions == []
    assert client.get("/slots").status_code == 200  # reading them is fine


def test_a_prefix_beyond_ascii_is_percent_encoded_in_the_header(make_app, folder, llama):
    app = make_app(prefixes={"@代码": "code.txt"})
    warmer(app).check()

    answer = ask(app.test_client(), "@代码 hi")

    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Template"] == "@%E4%BB%A3%E7%A0%81"


def test_a_slot_another_request_runs_in_is_not_counted_as_holding(app, llama, client):
    warmer(app).check()
    slot = llama.evaluated[0][0]
    llama.busy.add(slot)  # llama.cpp put another request there meanwhile

    assert ask(client, "@code Why?").headers["X-Bioproxy-Cache"] == "restored"
    assert backend(app).slots.table.held.get(llama.chats[-1]["id_slot"]) is None


def test_a_save_of_something_else_than_the_template_is_not_recorded(app, llama, admin):
    llama.extra_saved = 40  # another request ran in the slot before the save

    warmer(app).check()

    assert backend(app).caches.registry.entries == {}
    assert sample(admin, "bioproxy_slot_saves_total", template="@code", outcome="failed") == 1


def test_a_request_that_finds_no_free_slot_in_time_gets_a_503(make_app, folder, llama):
    app = make_app(prefixes={"@code": "code.txt"}, queue_timeout=0.2)
    warmer(app).check()
    scheduler = backend(app).scheduler
    held = [Ticket() for _ in range(2)]
    for ticket in held:  # as streams whose clients stopped reading
        scheduler.acquire(ticket)

    answer = ask(app.test_client(), "@code Why?")

    assert answer.status_code == 503
    assert answer.json["error"]["code"] == "queue_timeout"
    assert 1 <= int(answer.headers["Retry-After"]) <= 60
    assert len(llama.chats) == 0
    scheduler.release(held[0])
    assert ask(app.test_client(), "@code Why?").status_code == 200


def test_a_request_queued_while_its_template_breaks_is_answered_with_the_text_it_came_with(
    app, folder, llama
):
    # Issue 16.7: it used to get a 500 internal_error ('NoneType' has no attribute 'render').
    warmer(app).check()
    scheduler = backend(app).scheduler
    held = [Ticket() for _ in range(2)]
    for ticket in held:
        scheduler.acquire(ticket)
    waiting = gevent.spawn(ask, app.test_client(), "@code Why?")
    gevent.sleep(0.05)  # queued behind the two held slots
    assert len(scheduler.queue) == 1

    (folder / "code.txt").unlink()
    warmer(app).reload()
    assert backend(app).describe("@code")["state"] == "broken"
    scheduler.release(held[0])
    answer = waiting.get(timeout=10)

    assert answer.status_code == 200, answer.get_data()
    assert CODE.split("<{message}>")[0].strip() in llama.chats[-1]["messages"][-1]["content"]
    assert "Why?" in llama.chats[-1]["messages"][-1]["content"]
    # Arrived after the break: the template's own error.
    broken = ask(app.test_client(), "@code Again?")
    assert (broken.status_code, broken.json["error"]["code"]) == (500, "template_broken")


def test_a_request_queued_while_its_template_breaks_is_restored_as_the_version_it_came_with(
    app, folder, llama
):
    warmer(app).check()
    code_slot = llama.evaluated[0][0]
    scheduler = backend(app).scheduler
    held = [Ticket(slot=slot) for slot in (0, 1)]
    for ticket in held:
        scheduler.acquire(ticket)
    waiting = gevent.spawn(ask, app.test_client(), "@code Why?")
    gevent.sleep(0.05)  # queued behind the two held slots

    (folder / "code.txt").unlink()
    warmer(app).reload()
    llama.run_other_task(code_slot)  # so the template must be restored
    scheduler.release(held[code_slot])
    answer = waiting.get(timeout=10)

    assert answer.status_code == 200, answer.get_data()
    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] > 0


def cut_after_the_first_byte(client, text, **extra):
    """A templated chat request whose client leaves once its answer's first bytes came."""
    body = {"messages": [{"role": "user", "content": text}], **extra}
    answer = client.post("/v1/chat/completions", data=json.dumps(body), buffered=False)
    assert answer.status_code == 200
    next(answer.response)
    slot = json.loads(responses.calls[-1].request.body)["id_slot"]
    answer.close()  # before the answer's end
    return slot


def test_a_slot_whose_answer_was_cut_after_its_first_byte_holds_the_template_once_idle(
    app, llama, client
):
    warmer(app).check()
    llama.run_other_task(llama.evaluated[0][0])  # so that @code is restored, then answered
    table = backend(app).slots.table

    slot = cut_after_the_first_byte(client, "@code Why?")

    assert slot in backend(app).scheduler.foreign  # llama-server may still be at work
    warmer(app).check()  # a pass sees it idle, its last task the request's
    assert table.holding(slot) == "@code"
    assert slot not in backend(app).scheduler.foreign
    answer = ask(client, "@code Again?")
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert llama.chats[-1]["id_slot"] == slot


def test_a_cut_answer_s_slot_where_other_work_ran_since_holds_nothing(app, llama, client):
    warmer(app).check()
    table = backend(app).slots.table
    slot = cut_after_the_first_byte(client, "@code Why?")
    llama.run_other_task(slot)  # a client of llama-server's own, before bioproxy looked

    warmer(app).check()

    # Its last task is not the request's: what it holds is not known.
    digest = catalog(app)["@code"].template.digest
    assert not backend(app).slots.holds(slot, "@code", digest)
    assert table.settling == {}


def test_a_cut_answer_with_progress_events_holds_nothing(app, llama, client):
    # With return_progress, llama-server's first events come while it evaluates the
    # prompt: a client that leaves then leaves part of the template there.
    warmer(app).check()
    table = backend(app).slots.table

    slot = cut_after_the_first_byte(client, "@code Why?", return_progress=True)
    warmer(app).check()

    assert table.holding(slot) is None
    assert table.settling == {}


def test_a_templated_completion_leaves_its_slot_holding_no_template(app, llama, client):
    warmer(app).check()

    data = json.dumps({"prompt": "@code Why?"})
    answer = client.post("/completion", data=data, buffered=True)

    assert answer.status_code == 200
    slot = json.loads(responses.calls[-1].request.body)["id_slot"]
    # It holds that prompt, not the chat-rendered head a chat request would reuse.
    assert backend(app).slots.table.holding(slot) is None


def test_a_client_gone_during_a_restore_leaves_that_slot_holding_no_template(app, llama, client):
    warmer(app).check()
    code_slot = llama.evaluated[0][0]
    review_slot = 1 - code_slot
    busy = Ticket(slot=code_slot)
    backend(app).scheduler.acquire(busy)  # so @code is restored into @review's slot

    def restore_then_the_client_leaves(action, slot, name):
        if action == "restore":
            llama.contents[slot] = llama.files[name]  # llama-server restored it
            raise ClientGone("the client closed its connection")

    llama.on_action = restore_then_the_client_leaves
    assert ask(client, "@code Why?").status_code == 499
    llama.on_action = None
    backend(app).scheduler.release(busy)

    assert backend(app).slots.table.holding(review_slot) is None
    answer = ask(client, "@review Look at this.")
    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] > 0


def test_plain_requests_are_pinned_to_a_slot_without_the_template(app, llama, client):
    warmer(app).check()  # @code and @review warm, one in each slot
    code_slot = llama.evaluated[0][0]
    ask(client, "@code Why?")  # @code is now the hot one
    raw = b'  {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}'

    answer = client.post("/v1/chat/completions", data=raw)

    assert answer.status_code == 200
    sent = [c.request for c in responses.calls if c.request.path_url == "/v1/chat/completions"]
    assert sent[-1].body == b'{"id_slot":%d,' % (1 - code_slot) + raw.lstrip()[1:]
    assert ask(client, "@code Again").headers["X-Bioproxy-Cache"] == "slot"


def test_a_user_request_cancels_an_evaluation_which_resumes_when_idle(app, folder, llama, admin):
    (folder / "code.txt").write_text("".join(f"rule {i}\n" for i in range(60)) + "<{message}>")
    warmer(app).warmups.piece_chars = 100
    pieces = []  # @code's

    def a_user_arrives_during_the_second_piece(body):
        if "rule" in body["prompt"]:
            pieces.append(body["prompt"])
        if len(pieces) == 2 and body["prompt"] == pieces[-1]:
            backend(app).gate.user_started()

    llama.on_completion = a_user_arrives_during_the_second_piece
    checking = gevent.spawn(warmer(app).check)
    gevent.sleep(0.05)  # @review's evaluation now waits for the user to finish

    assert len(pieces) == 2  # no piece after the one under way
    assert backend(app).warmth["@code"].state == "stale"
    assert backend(app).warmth["@review"].state == "stale"
    assert sample(admin, "bioproxy_warmup_cancellations_total", template="@code") == 1
    backend(app).gate.user_finished()
    checking.join(timeout=5)
    assert backend(app).warmth["@review"].state == "warm"
    warmer(app).check()
    assert backend(app).warmth["@code"].state == "warm"
    assert len(pieces) > 4 and pieces[-1].startswith(pieces[1])


def give_way_in_third_piece(app, folder, llama):
    """@code's warmup, in pieces, given way to a user in its third: the pieces' (slot, prompt)."""
    (folder / "code.txt").write_text("".join(f"rule {i}\n" for i in range(60)) + "<{message}>")
    warmer(app).warmups.piece_chars = 100
    pieces = []

    def a_user_arrives_during_the_third_piece(body):
        if "rule" in body["prompt"]:
            pieces.append((body["id_slot"], body["prompt"]))
        if len(pieces) == 3 and body["prompt"] == pieces[-1][1]:
            backend(app).gate.user_started()

    llama.on_completion = a_user_arrives_during_the_third_piece
    checking = gevent.spawn(warmer(app).check)
    gevent.sleep(0.05)
    assert len(pieces) == 3 and backend(app).warmth["@code"].state == "stale"
    backend(app).gate.user_finished()
    checking.join(timeout=5)
    llama.on_completion = lambda body: (
        pieces.append((body["id_slot"], body["prompt"])) if "rule" in body["prompt"] else None
    )
    return pieces


def test_a_warmup_that_gave_way_goes_on_from_what_its_slot_holds(app, folder, llama, admin):
    pieces = give_way_in_third_piece(app, folder, llama)
    warmer(app).check()

    assert backend(app).warmth["@code"].state == "warm"
    assert len({slot for slot, _ in pieces}) == 1  # the slot that held its first pieces
    prompts = [prompt for _, prompt in pieces]
    assert prompts[3] == prompts[2]  # the piece it gave way in, not the first one again
    assert len(prompts) == len(set(prompts)) + 1  # every other piece once
    last = backend(app).warmth["@code"].last_warmup
    assert last["tokens_resumed"] > 0  # as llama-server reported the resumed piece


def test_a_warmup_that_gives_way_again_in_its_first_piece_keeps_what_it_went_on_from(
    app, folder, llama
):
    pieces = give_way_in_third_piece(app, folder, llama)
    resumed_at = pieces[2][1]

    def a_user_arrives_in_the_resumed_piece(body):
        if "rule" in body["prompt"]:
            pieces.append((body["id_slot"], body["prompt"]))
            if body["prompt"] == resumed_at:
                backend(app).gate.user_started()

    llama.on_completion = a_user_arrives_in_the_resumed_piece
    checking = gevent.spawn(warmer(app).check)
    gevent.sleep(0.05)
    backend(app).gate.user_finished()
    checking.join(timeout=5)
    assert backend(app).warmth["@code"].state == "stale"
    llama.on_completion = lambda body: (
        pieces.append((body["id_slot"], body["prompt"])) if "rule" in body["prompt"] else None
    )
    warmer(app).check()

    assert backend(app).warmth["@code"].state == "warm"
    prompts = [prompt for _, prompt in pieces]
    assert prompts[3] == prompts[4] == resumed_at  # twice from the same piece, not the first
    assert "tokens_resumed" in backend(app).warmth["@code"].last_warmup


def test_unpinned_a_warmup_that_gave_way_is_not_kept_for_later(app, folder, llama, monkeypatch):
    monkeypatch.setattr(backend(app), "pins", lambda: False)  # llama-server clears idle slots
    pieces = give_way_in_third_piece(app, folder, llama)
    assert backend(app).warmth["@code"].partial is None
    assert not backend(app).slots.table.partial(pieces[0][0])


def test_a_warmup_whose_slot_ran_something_else_meanwhile_starts_over(app, folder, llama):
    pieces = give_way_in_third_piece(app, folder, llama)
    llama.run_other_task(pieces[0][0])  # a request bioproxy did not send, in that slot
    warmer(app).check()

    assert backend(app).warmth["@code"].state == "warm"
    prompts = [prompt for _, prompt in pieces]
    assert prompts[3] == prompts[0]  # from the first piece: the slot holds none of it
    assert "tokens_resumed" not in backend(app).warmth["@code"].last_warmup


def test_a_user_request_keeps_off_the_slot_of_a_warmup_that_gave_way(app, folder, llama, client):
    pieces = give_way_in_third_piece(app, folder, llama)
    ask(client, "Hello")  # a plain request: into the other slot

    sent = [
        json.loads(c.request.body)
        for c in responses.calls
        if c.request.path_url == "/v1/chat/completions"
    ]
    assert sent[-1]["id_slot"] != pieces[0][0]
    warmer(app).check()
    assert [prompt for _, prompt in pieces][3] == pieces[2][1]  # still resumed


def test_the_slot_of_a_warmup_that_gave_way_is_not_shown_holding_its_template(
    app, folder, llama, admin
):
    pieces = give_way_in_third_piece(app, folder, llama)
    slot = pieces[0][0]
    backend(app).scheduler._update_gauges()

    shown = admin.get("/status").get_json()["slots"][slot]
    assert shown["template"] is None and shown["partial"] == "@code"
    assert (
        sample(admin, "bioproxy_slots", backend=backend(app).name, template="@code", state="idle")
        == 0
    )
    warmer(app).check()  # once warm, the slot holds it whole
    shown = admin.get("/status").get_json()["slots"][slot]
    assert shown["template"] == "@code" and shown["partial"] is None


def test_long_templates_are_evaluated_in_growing_pieces_cut_at_line_ends():
    from bioproxy.evaluation import cuts_of as _cuts

    text = "".join(f"line {i:03d} of the template\n" for i in range(100))  # 2,600 chars

    cuts = _cuts(text, 600)

    assert cuts[-1] == len(text)
    assert all(text[c - 1] == "\n" for c in cuts)
    pieces = [b - a for a, b in zip([0, *cuts[:-2]], cuts[:-1], strict=True)]
    assert len(pieces) == 3 and all(600 <= n <= 600 + 26 for n in pieces)
    assert _cuts("short", 600) == [5]
    assert _cuts("x" * 2000, 600) == [2000]  # no line end: one piece


def test_only_work_for_the_model_holds_warmups_off(app, llama, client):
    responses.get(f"{BACKEND}/health", json={"status": "ok"})
    idle = backend(app).gate.idle

    probe = client.get("/health")  # not closed yet: still in flight
    assert idle.is_set()
    probe.close()

    body = {"messages": [{"role": "user", "content": "hi"}]}
    answer = client.post("/v1/chat/completions", data=json.dumps(body))
    assert not idle.is_set()
    answer.close()
    assert idle.is_set()


def test_an_edit_leaves_the_slots_of_the_version_before_holding_nothing(app, llama, folder):
    warmer(app).check()
    table = backend(app).slots.table
    held = {table.holding(slot): slot for slot in range(table.count)}
    assert set(held) == {"@code", "@review"}
    old = catalog(app)["@review"].template.digest
    table.held[held["@review"]] = ("@review", partial_digest(old, 700), 5, 9)

    (Path(folder) / "code.txt").write_text("Changed.\n<{message}>")
    warmer(app).reload()
    assert table.holding(held["@code"]) is None
    assert table.holding(held["@review"]) == "@review"  # a part of its own version: kept
    (Path(folder) / "review.txt").write_text("Changed too.\n<{message}>")
    warmer(app).reload()

    # A slot holding them is taken for other work before any template's.
    assert [table.holding(slot) for slot in range(table.count)] == [None, None]


def test_an_edit_undone_finds_its_template_still_in_its_slot(app, llama, folder, client):
    warmer(app).check()
    slot = llama.evaluated[0][0]
    (folder / "code.txt").write_text("Changed.\n<{message}>")
    warmer(app).reload()
    assert backend(app).slots.table.holding(slot) is None
    llama.actions.clear()

    (folder / "code.txt").write_text(CODE)  # undone before a warmup ran
    warmer(app).reload()
    answer = ask(client, "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert llama.chats[-1]["id_slot"] == slot and llama.actions == []


def test_a_slot_keeps_a_template_whose_file_was_written_again_unchanged(app, llama, folder):
    warmer(app).check()
    table = backend(app).slots.table
    before = dict(table.held)

    text = (Path(folder) / "code.txt").read_text()
    (Path(folder) / "code.txt").write_text(text)
    warmer(app).reload()

    assert table.held == before


def test_a_warmup_waits_for_a_slot_of_its_version_only_when_it_would_evaluate(app, llama):
    tickets = []  # (ticket, its digest when it asked for a slot)
    scheduler = backend(app).scheduler
    submit = scheduler.submit
    scheduler.submit = lambda ticket: tickets.append((ticket, ticket.digest)) or submit(ticket)

    warmer(app).check()  # evaluated: nothing saved yet
    backend(app).warmth["@code"].mark_stale()
    warmer(app).check()  # restored from the file saved then

    (first, digest), (again, _) = (
        [t for t in tickets if t[0].template == "@code"][i] for i in (0, -1)
    )
    assert first.share == 10.0  # UNKNOWN_EVALUATION: neither its time nor tokens known
    assert digest == catalog(app)["@code"].template.digest  # known while it waits
    assert again.share == 0.0


def counted(app, cache, timings, variant=None, ticket_template="@code"):
    """The outcome of a templated request's answer as its lease counts it."""
    from bioproxy.lease import Lease
    from bioproxy.variants import Variant

    entry = catalog(app)["@code"]
    if variant is not None:
        variant = Variant(f"@code {variant}", "@code", entry.template.digest, 900)
    lease = Lease(backend(app), Ticket(USER, ticket_template), entry, entry.template, variant)
    lease.cache = lease.outcome = cache
    lease._account(timings)
    return lease.outcome


def test_a_cold_request_llama_server_answered_from_its_own_cache_is_counted_server(app, llama):
    backend(app).warmth["@code"].tokens = 900
    misses = backend(app).metrics.template_misses

    assert counted(app, "cold", {"cache_n": 895, "prompt_n": 6}) == "server"
    assert counted(app, "cold", {"cache_n": 24, "prompt_n": 877}) == "cold"
    # A variant's cold request reuses the head bioproxy evaluated for it: cold, and no
    # miss when it reused nothing (llama-server may place it elsewhere, unpinned).
    assert counted(app, "cold", {"cache_n": 895, "prompt_n": 6}, variant="1a2b") == "cold"
    assert counted(app, "cold", {"cache_n": 0, "prompt_n": 906}, variant="1a2b") == "cold"
    # A templated completion, or a chat with the template in a later turn: its own prompt.
    assert counted(app, "cold", {"cache_n": 950, "prompt_n": 6}, ticket_template=None) == "cold"
    assert sum(s.value for m in misses.collect() for s in m.samples) == 0
    backend(app).warmth["@code"].tokens = None  # the head's length not known: cold
    assert counted(app, "cold", {"cache_n": 895, "prompt_n": 6}) == "cold"


def test_status_shows_slots_with_their_templates_the_queue_and_pending_warmups(app, llama, admin):
    warmer(app).check()
    assert [
        (w["template"], w["outcome"]) for w in admin.get("/status").json["warmups"]["recent"]
    ] == [
        ("@code", "ok"),
        ("@review", "ok"),
    ]
    scheduler = backend(app).scheduler
    running = scheduler.submit(Ticket(USER, "@code"))
    scheduler.submit(Ticket(USER))  # a plain request, in @review's slot
    waiting = scheduler.submit(Ticket(USER))
    (Path(catalog(app).base_dir) / "review.txt").write_text("Changed.\n<{message}>")
    warmer(app).reload()

    status = admin.get("/status").json

    # Slot 1 holds @review as it was before the edit: nothing a request can start from.
    assert [(s["id"], s["template"], s["state"]) for s in status["slots"]] == [
        (0, "@code", "busy"),
        (1, None, "busy"),
    ]
    assert status["slots"][0]["task"]["template"] == "@code"
    assert [(t["kind"], t["template"]) for t in status["queue"]] == [("request", None)]
    (pending,) = status["warmups"]["pending"]
    assert (pending["template"], pending["state"]) == ("@review", "stale")
    assert sample(admin, "bioproxy_queue_length", backend=backend(app).name) == 1
    assert (
        sample(admin, "bioproxy_slots", backend=backend(app).name, template="@code", state="busy")
        == 1
    )
    scheduler.release(running)
    assert waiting.slot == 0


@pytest.mark.parametrize("concurrency", [1, 2])
def test_warmups_run_one_at_a_time_unless_configured(make_app, folder, llama, concurrency):
    app = make_app(
        prefixes={"@code": "code.txt", "@review": "review.txt"}, warmup_concurrency=concurrency
    )
    seen = []

    def yield_to_other_greenlets(body):
        seen.append(len(backend(app).gate.runs))
        gevent.sleep(0.01)

    llama.on_completion = yield_to_other_greenlets
    warmer(app).check()

    assert max(seen) == concurrency
    assert {w.state for w in backend(app).warmth.values()} == {"warm"}


def test_warmups_can_be_allowed_while_users_are_in_flight(make_app, folder, llama):
    app = make_app(prefixes={"@code": "code.txt"}, warmup_only_when_idle=False)
    backend(app).gate.user_started()
    llama.on_completion = lambda body: backend(app).gate.user_started()  # more users arrive

    warmer(app).check()

    assert backend(app).warmth["@code"].state == "warm"
    assert backend(app).gate.runs == set()


def test_templates_count_their_requests_by_cache_state(app, llama, client, admin):
    warmer(app).check()
    ask(client, "@code Why?")
    llama.run_other_task(llama.chats[-1]["id_slot"])
    ask(client, "@code Why not?")

    (code,) = [t for t in admin.get("/templates").json["templates"] if t["prefix"] == "@code"]
    assert code["requests"] == {"slot": 1, "restored": 1, "server": 0, "cold": 0}


def test_a_templated_message_with_a_lone_surrogate_is_a_400_and_never_sent(app, llama, client):
    warmer(app).check()
    raw = b'{"messages": [{"role": "user", "content": "@code why \\ud800"}]}'

    answer = client.post("/v1/chat/completions", data=raw)

    assert answer.status_code == 400
    assert answer.json["error"]["code"] == "bad_request"
    assert llama.chats == []
    assert backend(app).scheduler.busy == {}  # its slot was given back


def test_failed_evaluations_are_retried_after_a_growing_pause(make_app, folder, llama):
    app = make_app(prefixes={"@code": "code.txt"}, warmup_check_interval=10)
    entry = backend(app).warmth["@code"]
    calls = []

    def refuse(body):
        calls.append(body)
        raise requests.ConnectionError("llama-server refused")

    llama.on_completion = refuse
    pauses = []
    for _ in range(3):
        before = len(calls)
        warmer(app).check()
        assert len(calls) == before + 1 and entry.state == "failed"
        pauses.append(entry.retry_at - time.monotonic())
        warmer(app).check()  # not due yet: no new try
        assert len(calls) == before + 1
        entry.retry_at = 0  # as if the pause had passed

    assert [round(p) for p in pauses] == [20, 40, 80]
    llama.on_completion = None
    warmer(app).check()
    assert entry.state == "warm" and entry.failures == 0
