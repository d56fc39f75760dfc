"""llama-server's slot API failing around warmups: saves and restores that fail, block,
or meet a restarted server. A fake llama-server (tests/fake_llama.py) under `responses`.
"""

import itertools
import time

import gevent
import pytest
import requests
import responses

from tests.conftest import ADMIN_BASE
from tests.test_warmup import CODE, ask, backend, sample, warmer

INTERVAL = 10  # warmup_check_interval: failed warmups pause 20 s, 40 s, ...


@pytest.fixture
def folder(isolated_config):
    """The config file's folder, with a template and llama-server's slot folder."""
    folder = isolated_config.parent
    (folder / "code.txt").write_text(CODE)
    (folder / "slots").mkdir()
    return folder


@pytest.fixture
def llama(fake_llama):
    return fake_llama


@pytest.fixture
def app(make_app, folder, llama):
    return make_app(
        prefixes={"@code": "code.txt"},
        slot_save_path=str(folder / "slots"),
        warmup_check_interval=INTERVAL,
    )


def listed(admin, prefix="@code"):
    (entry,) = [t for t in admin.get("/templates").json["templates"] if t["prefix"] == prefix]
    return entry


def held_by(app, prefix="@code"):
    return [slot for slot, held in backend(app).slots.table.held.items() if held[0] == prefix]


def counts(admin, name, prefix="@code"):
    return {
        outcome: sample(admin, name, template=prefix, outcome=outcome)
        for outcome in ("ok", "failed")
    }


def called(llama, action):
    return sum(1 for a, _, _ in llama.actions if a == action)


def pause_passes(app):
    """As if the failed template's pause were over."""
    backend(app).warmth["@code"].retry_at = 0


def answers(status):
    def fault(llama):
        llama.status["save"] = llama.status["restore"] = status

    return fault


def raises(error):
    def fault(llama):
        llama.error["save"] = llama.error["restore"] = error

    return fault


def heal(llama):
    llama.status = {"save": 200, "restore": 200}
    llama.error.clear()


# Saves.

SAVE_FAULTS = {
    # llama-server answered: it is the same server, and the slot still holds the template.
    "500": (answers(500), "slot"),
    "400": (answers(400), "slot"),
    # No answer: whether the slot holds anything is unknown (a blocked save waited for
    # another request running there).
    "timeout": (raises(requests.ReadTimeout("slot busy")), "cold"),
    "refused": (raises(requests.ConnectionError("refused")), "cold"),
}


@pytest.mark.parametrize("fault, cache", SAVE_FAULTS.values(), ids=SAVE_FAULTS.keys())
def test_a_failed_save_leaves_the_template_failed_and_unrecorded(
    app, llama, client, admin, fault, cache
):
    fault(llama)

    warmer(app).check()

    entry = listed(admin)
    assert (entry["state"], entry["saved_file"]) == ("failed", None)
    assert entry["last_warmup"]["outcome"] == "failed"
    assert entry["last_warmup"]["error"].startswith("POST /slots/0?action=save: ")
    assert counts(admin, "bioproxy_warmups_total") == {"ok": 0, "failed": 1}
    assert counts(admin, "bioproxy_slot_saves_total") == {"ok": 0, "failed": 1}
    assert [w["outcome"] for w in admin.get("/status").json["warmups"]["recent"]] == ["failed"]
    assert backend(app).caches.registry.entries == {}
    answer = ask(client, "@code Why?")
    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Cache"] == cache


def test_a_failed_save_forgets_the_file_it_may_have_spoiled(app, llama, folder, admin):
    warmer(app).check()
    name = backend(app).caches.registry.entries["@code"]["file"]
    (folder / "slots" / name).write_bytes(b"kv")
    admin.post("/templates/@code/warmup")
    # llama-server queued the save behind another request: it may still write the file.
    llama.error["save"] = requests.ReadTimeout("slot busy")

    warmer(app).check()

    assert backend(app).caches.registry.entries == {}
    assert not (folder / "slots" / name).exists()
    assert listed(admin)["state"] == "failed"


def test_a_save_that_fails_on_a_full_disk_leaves_no_partial_file(app, llama, folder, admin):
    # Issue 16.6: llama-server writes what it can, then answers 500; the part stayed.
    def half_written(action, slot, name):
        if action == "save":
            (folder / "slots" / name).write_bytes(b"\0" * 4096)

    llama.on_action = half_written
    llama.status["save"] = 500

    warmer(app).check()

    assert listed(admin)["state"] == "failed"
    assert list((folder / "slots").iterdir()) == []
    assert backend(app).caches.registry.entries == {}


def restart(llama):
    llama.restart()  # the save then finds the new server's empty slot


def restart_and_refuse(llama):
    llama.restart()
    raise requests.ConnectionError("connection refused")


RESTARTS = {"empty slot": restart, "refused": restart_and_refuse}


@pytest.mark.parametrize("restart", RESTARTS.values(), ids=RESTARTS.keys())
def test_a_restart_between_evaluation_and_save_is_a_failed_warmup_tried_again_later(
    app, llama, client, admin, restart
):
    def restart_at_the_first_save(action, slot, name):
        if action == "save" and called(llama, "save") == 1:
            restart(llama)

    llama.on_action = restart_at_the_first_save

    warmer(app).check()

    assert listed(admin)["state"] == "failed"
    assert held_by(app) == []
    assert backend(app).caches.registry.entries == {}
    assert counts(admin, "bioproxy_warmups_total") == {"ok": 0, "failed": 1}
    cold = ask(client, "@code Why?")
    assert cold.headers["X-Bioproxy-Cache"] == "cold"
    assert cold.json["timings"]["cache_n"] == 0  # and it was indeed cold
    warmer(app).check()
    assert len(llama.evaluated) == 1  # not again before the pause
    pause_passes(app)
    warmer(app).check()
    assert listed(admin)["state"] == "warm"
    assert listed(admin)["saved_file"] is not None
    assert counts(admin, "bioproxy_warmups_total") == {"ok": 1, "failed": 1}
    warm = ask(client, "@code Why not?")
    assert warm.headers["X-Bioproxy-Cache"] == "slot"
    assert warm.json["timings"]["cache_n"] > 0


def test_a_save_that_keeps_failing_is_retried_after_doubling_pauses_not_in_a_storm(
    make_app,
    folder,
    llama,
):
    interval, seconds = 0.05, 2.0
    app = make_app(
        prefixes={"@code": "code.txt"},
        slot_save_path=str(folder / "slots"),
        warmup_check_interval=interval,
    )
    llama.status["save"] = 500
    saves = []
    llama.on_action = lambda action, slot, name: saves.append(time.monotonic())

    warmer(app).start()
    gevent.sleep(seconds)
    warmer(app).stop()

    # Tries at 0, then after pauses of 0.1, 0.2, 0.4, 0.8 s: at most five in 2 s.
    assert 3 <= len(saves) <= 5
    gaps = [b - a for a, b in itertools.pairwise(saves)]
    assert all(gap >= interval * 2 ** (i + 1) for i, gap in enumerate(gaps)), gaps
    passes = sum(1 for call in responses.calls if call.request.url.endswith("/props"))
    assert passes <= seconds / interval + 2  # one look at llama-server per interval
    assert backend(app).warmth["@code"].state == "failed"


# Restores: a user's request, into a slot the template was pushed out of.

RESTORE_FAULTS = {
    "500": answers(500),
    "501": answers(501),
    "timeout": raises(requests.ReadTimeout("slot busy")),
    "refused": raises(requests.ConnectionError("refused")),
}


def warm_then_pushed_out(app, llama):
    warmer(app).check()
    llama.run_other_task(llama.evaluated[0][0])
    return backend(app).caches.registry.entries["@code"]["file"]


@pytest.mark.parametrize("fault", RESTORE_FAULTS.values(), ids=RESTORE_FAULTS.keys())
def test_a_failed_restore_answers_cold_and_the_cold_request_warms_the_slot(
    app, llama, client, admin, fault
):
    saved = warm_then_pushed_out(app, llama)
    fault(llama)

    answers_ = [ask(client, f"@code Question {i}?") for i in range(3)]

    assert [a.status_code for a in answers_] == [200] * 3
    # The cold request leaves its slot holding the template: the next ones use it.
    assert [a.headers["X-Bioproxy-Cache"] for a in answers_] == ["cold", "slot", "slot"]
    assert called(llama, "restore") == 1
    assert counts(admin, "bioproxy_slot_restores_total") == {"ok": 0, "failed": 1}
    assert listed(admin)["state"] == "warm"
    assert listed(admin)["saved_file"] == saved  # the file is not at fault: kept
    warmer(app).check()
    assert called(llama, "restore") == 1 and len(llama.evaluated) == 1


# Restores by the warmer (after llama-server restarted).

WARMER_RESTORE_FAULTS = {
    "500": answers(500),
    "timeout": raises(requests.ReadTimeout("slot busy")),
    "refused": raises(requests.ConnectionError("refused")),
}


@pytest.mark.parametrize("fault", WARMER_RESTORE_FAULTS.values(), ids=WARMER_RESTORE_FAULTS.keys())
def test_a_warmer_s_restore_that_fails_is_tried_again_after_a_pause_not_evaluated(
    app, llama, admin, fault
):
    warmer(app).check()
    llama.restart()
    fault(llama)

    warmer(app).check()

    # Evaluating into a slot whose restore blocked would block just the same.
    assert len(llama.evaluated) == 1
    assert listed(admin)["state"] == "failed"
    assert counts(admin, "bioproxy_slot_restores_total") == {"ok": 0, "failed": 1}
    heal(llama)
    warmer(app).check()
    assert called(llama, "restore") == 1  # not again before the pause
    pause_passes(app)
    warmer(app).check()
    assert listed(admin)["state"] == "warm"
    assert len(llama.evaluated) == 1


def test_a_warmer_s_restore_of_a_missing_file_evaluates_again_at_once(app, llama, admin):
    warmer(app).check()
    old = backend(app).caches.registry.entries["@code"]["file"]
    llama.restart()
    llama.files.clear()  # llama-server's slot folder lost its files: 400

    warmer(app).check()

    assert [a for a, _, _ in llama.actions] == ["save", "restore", "save"]
    assert len(llama.evaluated) == 2
    assert listed(admin)["state"] == "warm"
    assert backend(app).caches.registry.entries["@code"]["file"] == old  # saved anew
    assert counts(admin, "bioproxy_slot_restores_total") == {"ok": 0, "failed": 1}


def test_a_restored_file_that_is_not_what_was_saved_is_forgotten_and_evaluated_again(
    app, llama, client, admin
):
    name = warm_then_pushed_out(app, llama)
    llama.files[name] = "another request's prompt"  # e.g. a save llama-server ran late

    answer = ask(client, "@code Why?")

    assert answer.headers["X-Bioproxy-Cache"] == "cold"
    assert counts(admin, "bioproxy_slot_restores_total") == {"ok": 0, "failed": 1}
    assert backend(app).caches.registry.entries == {}
    assert listed(admin)["state"] == "stale"
    warmer(app).check()
    assert listed(admin)["state"] == "warm" and len(llama.evaluated) == 2


def test_without_slot_save_path_a_file_saved_before_is_kept_and_the_template_evaluated(
    app, make_app, llama, folder, client, admin
):
    warmer(app).check()
    saved = backend(app).caches.registry.entries["@code"]
    llama.restart()  # now without --slot-save-path: every slot action answers 501
    llama.status = {"save": 501, "restore": 501}
    again = make_app(prefixes={"@code": "code.txt"}, slot_save_path=str(folder / "slots"))
    admin = again.test_client(base_url=ADMIN_BASE)

    warmer(again).check()

    assert [a for a, _, _ in llama.actions] == ["save", "restore", "save"]
    assert listed(admin)["state"] == "warm"
    assert backend(again).caches.registry.entries["@code"] == saved  # for a server that can use it
    assert counts(admin, "bioproxy_warmups_total") == {"ok": 1, "failed": 0}
    assert counts(admin, "bioproxy_slot_saves_total") == {"ok": 0, "failed": 1}
    answer = ask(again.test_client(), "@code Why?")
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    warmer(again).check()
    assert len(llama.evaluated) == 2  # warm: no more tries


def test_a_failed_template_keeps_its_pause_when_llama_server_restarts(app, llama, admin):
    llama.status["save"] = 500
    warmer(app).check()
    heal(llama)
    llama.restart()

    warmer(app).check()

    # A warmup that crashed llama-server must not crash it again as soon as it is back.
    assert len(llama.evaluated) == 1
    assert listed(admin)["state"] == "failed"
    pause_passes(app)
    warmer(app).check()
    assert listed(admin)["state"] == "warm"


def test_the_retry_of_a_failed_save_evaluates_the_template_its_slot_holds_in_one_piece(
    app,
    llama,
    folder,
):
    (folder / "code.txt").write_text("".join(f"rule {i}\n" for i in range(40)) + "<{message}>")
    warmer(app).warmups.piece_chars = 100
    llama.status["save"] = 500
    warmer(app).check()
    first = len(llama.evaluated)
    heal(llama)
    pause_passes(app)

    warmer(app).check()

    # In pieces, the first would cut llama-server's cache of the slot back to it.
    assert first > 2
    assert [prompt for _, prompt in llama.evaluated[first:]] == [llama.evaluated[first - 1][1]]
    assert backend(app).warmth["@code"].state == "warm"
