"""Leaving templated requests to llama-server's RAM cache where it clears idle slots.

Against a llama-server with llama.cpp's defaults and a slot folder, every templated
request was restored from the template's file first. A later turn of a conversation then
got the template back without the turns before it, which llama-server's RAM cache held:
measured with the bundled model, turns 2-4 evaluated 69, 125 and 180 tokens where
llama-server alone evaluated 16 or so each.
"""

import json

import pytest

from bioproxy.ram_cache import COPIES_COUNTED, REUSED_SHARE, RamCache
from tests.test_warmup import ask, backend, sample, templates_folder, warmer


@pytest.fixture
def llama(fake_llama):
    fake_llama.clears_idle_slots = True  # as llama-server started without -np
    return fake_llama


@pytest.fixture
def app(make_app, isolated_config, llama):
    folder = templates_folder(isolated_config)
    return make_app(
        prefixes={"@code": "code.txt", "@review": "review.txt"},
        slot_save_path=str(folder / "slots"),
    )


def restores(llama):
    return [a for a in llama.actions if a[0] == "restore"]


def notes(admin):
    return " ".join(admin.get("/status").get_json()["backend_mode"]["notes"])


def test_the_ram_cache_is_measured_once_the_templates_are_warm(app, llama, admin, caplog):
    caplog.set_level("INFO", logger="bioproxy")
    warmer(app).check()  # warmed and saved
    assert backend(app).ram.keeps is None
    assert "not measured yet" in notes(admin)

    warmer(app).check()  # then measured: @code (the larger) restored, cleared, reused

    assert backend(app).ram.keeps is True
    assert restores(llama)[-1][2] == backend(app).caches.registry.entries["@code"]["file"]
    assert "its RAM cache keeps @code" in caplog.text
    assert "keeps templates (measured)" in notes(admin)
    mode = admin.get("/status").get_json()["backend_mode"]
    assert mode["ram_cache_keeps_templates"] is True
    warmer(app).check()
    assert len(restores(llama)) == 1  # measured once


def test_requests_are_left_to_it_once_a_copy_is_counted_there(app, llama, client, admin):
    warmer(app).check()
    warmer(app).check()  # measured
    first = ask(client, "@review x = 1")  # restored: no copy of @review counted yet
    assert first.headers["X-Bioproxy-Cache"] == "restored"
    ask(client, "A plain question.")  # its start clears @review's slot into the RAM cache
    done = len(restores(llama))

    second = ask(client, "@review y = 2")

    assert second.headers["X-Bioproxy-Cache"] == "server"
    assert len(restores(llama)) == done  # nothing restored: loaded from the RAM cache
    assert "id_slot" not in llama.chats[-1]
    assert second.get_json()["timings"]["cache_n"] > 0
    served = sample(admin, "bioproxy_template_requests_total", template="@review", cache="server")
    assert served == 1
    # The probe left @code in its slot, copied to the cache since: counted there too.
    assert ask(client, "@code How?").headers["X-Bioproxy-Cache"] == "server"


def test_a_later_turn_gets_its_conversation_back_not_the_template_alone(app, llama, client):
    warmer(app).check()
    warmer(app).check()
    opening = {"role": "user", "content": "@code How do I reverse a list?"}
    ask(client, opening["content"])
    ask(client, "A plain question.")  # the conversation's slot goes to the RAM cache
    turns = [opening, {"role": "assistant", "content": "ok"}]
    body = {"messages": [*turns, {"role": "user", "content": "And in place?"}]}

    answer = client.post("/v1/chat/completions", data=json.dumps(body), buffered=True)

    assert answer.headers["X-Bioproxy-Cache"] == "server"
    first_turn = llama.chats[0]
    rendered = llama.render(first_turn["messages"])
    timings = answer.get_json()["timings"]
    # The whole first turn reused, not only the template's head.
    assert timings["cache_n"] >= len(rendered.split()) - 1, timings


def test_a_ram_cache_that_keeps_nothing_leaves_requests_restored(app, llama, client, admin, caplog):
    caplog.set_level("INFO", logger="bioproxy")
    llama.ram_keeps = False  # --cache-ram too small for a template
    warmer(app).check()
    warmer(app).check()

    assert backend(app).ram.keeps is False
    assert "its RAM cache did not keep @code" in caplog.text
    assert "did not keep a template (measured" in notes(admin)
    answers = [ask(client, "@code One?"), ask(client, "A plain one."), ask(client, "@code Two?")]
    assert [a.headers["X-Bioproxy-Cache"] for a in answers[::2]] == ["restored", "restored"]
    assert all(a.get_json()["timings"]["cache_n"] > 0 for a in answers[::2])


def test_a_copy_found_missing_sets_every_later_request_back_to_restoring(
    app, llama, client, admin, caplog
):
    warmer(app).check()
    warmer(app).check()
    ask(client, "@code One?")
    ask(client, "A plain one.")
    llama.ram.clear()  # evicted: more than --cache-ram holds came since
    caplog.set_level("INFO", logger="bioproxy")

    missed = ask(client, "@code Two?")
    ask(client, "Another plain one.")
    after = ask(client, "@code Three?")

    assert missed.headers["X-Bioproxy-Cache"] == "server"
    assert missed.get_json()["timings"]["cache_n"] == 0  # evaluated in full, once
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="cold") == 1
    assert caplog.text.count("RAM cache did not hold it") == 1
    assert backend(app).ram.keeps is False
    assert after.headers["X-Bioproxy-Cache"] == "restored"
    assert after.get_json()["timings"]["cache_n"] > 0


def test_a_restart_forgets_what_was_measured(app, llama, client):
    warmer(app).check()
    warmer(app).check()
    ask(client, "@code One?")
    assert backend(app).ram.keeps is True
    llama.restart()
    llama.ram.clear()

    warmer(app).check()  # restored from the files again

    assert backend(app).ram.keeps is None
    assert backend(app).ram.copies == {}
    assert ask(client, "@code Two?").headers["X-Bioproxy-Cache"] == "restored"


def test_copies_are_counted_taken_and_weighed_as_llama_server_loads_them():
    ram = RamCache()
    ram.left("@code", "d1", 100)
    assert not ram.take("@code", "d1", 90)  # not measured to keep templates
    ram.measured(True)
    assert not ram.take("@code", "d2", 90)  # another version of the text
    assert not ram.take("@review", "d1", 90)
    ram.left("@code", "d1", 1000)
    assert ram.take("@code", "d1", 90)  # the copy of 100 tokens, the one reused the most
    # The one left is too long for a new question to reuse a quarter of it.
    assert REUSED_SHARE == 0.3
    assert not ram.take("@code", "d1", 299)
    assert ram.take("@code", "d1", 300)
    assert not ram.take("@code", "d1", 900)  # none left: both taken
    ram.left("@code", "d1", 100)
    assert ram.missed() and ram.keeps is False and ram.copies == {}
    assert not ram.missed()  # said once
    ram.reset()
    assert ram.keeps is None


def test_a_probe_that_failed_is_tried_again_a_minute_later(app, llama, monkeypatch):
    warmer(app).check()
    llama.status["restore"] = 500  # llama-server fails the probe's restore
    warmer(app).check()
    warmer(app).check()
    assert len(restores(llama)) == 1  # not again at each pass
    assert backend(app).ram.keeps is None

    llama.status["restore"] = 200
    monkeypatch.setattr(backend(app).ram, "probe_at", 0.0)  # the minute has passed
    warmer(app).check()
    assert backend(app).ram.keeps is True


def test_the_copies_counted_are_bounded():
    ram = RamCache()
    for n in range(1000):
        ram.left("@code", "d1", 100 + n)
    assert len(ram.copies[("@code", "d1")]) == COPIES_COUNTED


def test_a_request_whose_client_named_its_slot_is_restored_there(app, llama, client):
    # The client's id_slot goes to llama-server as sent: left to the RAM cache, the
    # request ran pinned to a slot llama-server had cleared, and loaded nothing there.
    warmer(app).check()
    warmer(app).check()
    assert ask(client, "@code How?").headers["X-Bioproxy-Cache"] == "server"  # the probe's
    ask(client, "A plain one.")

    answer = ask(client, "@code And why?", id_slot=1)

    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert restores(llama)[-1][1] == 1
    assert llama.chats[-1]["id_slot"] == 1
    assert answer.get_json()["timings"]["cache_n"] > 0


def test_a_probe_that_spans_a_restart_measures_nothing(app, llama):
    warmer(app).check()
    ram = backend(app).ram

    def restarted(body):
        if body["prompt"] != " ":
            ram.reset()  # as the pass that finds the restart does, while the head runs

    llama.on_completion = restarted
    warmer(app).check()

    assert ram.keeps is None and ram.copies == {}
    state = backend(app).warmth["@code"]
    assert state.last_warmup["outcome"] != "restored"  # the probe's restore is no warmup
