"""Warmups evaluated by a second llama-server (bioproxy/evaluator.py), against fakes of both."""

import json
import time

import gevent
import gevent.event
import pytest
import requests
import responses

from bioproxy.scheduler import USER, Ticket
from tests.fake_llama import SYSTEM, FakeLlama
from tests.test_metrics import samples
from tests.test_warmup import backend, templates_folder, warmer

EVALUATOR = "http://warmer.test:8082"
CODE_HEAD = SYSTEM + "You answer coding questions well and briefly.\n"
REVIEW_HEAD = SYSTEM + "You review code.\n"


@pytest.fixture
def folder(isolated_config):
    return templates_folder(isolated_config)


@pytest.fixture
def evaluator(fake_llama):
    """The warmup llama-server: the same model, and the same slot folder as fake_llama."""
    other = FakeLlama(base=EVALUATOR).install()
    other.files = fake_llama.files
    return other


def with_evaluator(make_app, folder, **settings):
    """The app, its warmups evaluated by the warmup llama-server at EVALUATOR."""
    return make_app(
        prefixes={"@code": "code.txt", "@review": "review.txt"},
        slot_save_path=str(folder / "slots"),
        warmup_backend_url=EVALUATOR,
        **settings,
    )


@pytest.fixture
def app(make_app, folder, fake_llama, evaluator):
    return with_evaluator(make_app, folder)


def ask(client, text):
    body = {"messages": [{"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", data=json.dumps(body), buffered=True)


def test_templates_are_evaluated_there_and_restored_here(app, fake_llama, evaluator, admin):
    warmer(app).check()

    assert [prompt for _, prompt in evaluator.evaluated] == [CODE_HEAD, REVIEW_HEAD]
    assert fake_llama.evaluated == []  # nothing evaluated in the serving llama-server
    assert [a for a, _, _ in evaluator.actions] == ["save", "save"]
    assert [a for a, _, _ in fake_llama.actions] == ["restore", "restore"]
    states = {e["prefix"]: e["state"] for e in admin.get("/templates").get_json()["templates"]}
    assert states == {"@code": "warm", "@review": "warm"}
    mode = admin.get("/status").get_json()["backend_mode"]
    assert not any("own slots" in note for note in mode["notes"])
    assert mode["warmup_backend"] == {
        "url": EVALUATOR,
        "usable": True,
        "problem": None,
        "evaluating": None,
        "requests_waited": 0,
        "hold": None,  # its process not known (warmup_backend_pid)
    }


def test_a_user_in_flight_does_not_hold_the_evaluation_off(app, fake_llama, evaluator):
    gate = backend(app).gate
    gate.user_started()  # a user request in flight, as the proxy reports it
    try:
        warmer(app).check()
    finally:
        gate.user_finished()
    assert [prompt for _, prompt in evaluator.evaluated] == [CODE_HEAD, REVIEW_HEAD]
    assert backend(app).warmth["@code"].state.value == "warm"


def test_an_evaluation_there_is_not_cancelled_by_a_user(app, fake_llama, evaluator):
    gate = backend(app).gate
    evaluator.on_completion = lambda body: gate.user_started()  # a user arrives meanwhile
    try:
        warmer(app).check()
    finally:
        for _ in range(gate.users):
            gate.user_finished()
    assert len(evaluator.evaluated) == 2
    assert fake_llama.evaluated == []


def test_another_model_there_is_not_used(app, fake_llama, evaluator, admin, caplog):
    evaluator.model = "/models/other.gguf"
    warmer(app).check()

    assert evaluator.evaluated == []
    assert [prompt for _, prompt in fake_llama.evaluated] == [CODE_HEAD, REVIEW_HEAD]
    mode = admin.get("/status").get_json()["backend_mode"]
    assert mode["warmup_backend"]["usable"] is False
    assert "not the serving llama-server's" in mode["warmup_backend"]["problem"]
    assert any("warmup llama-server is not used" in note for note in mode["notes"])
    assert any("own slots" in note for note in mode["notes"])  # and what that costs users
    assert sum("not used" in r.message for r in caplog.records) == 1  # said once


def test_a_warmup_llama_server_that_is_down_leaves_warmups_here(app, fake_llama, evaluator):
    refused = requests.exceptions.ConnectionError("refused")
    responses.replace(responses.GET, f"{EVALUATOR}/props", body=refused)
    warmer(app).check()

    assert evaluator.evaluated == []
    assert len(fake_llama.evaluated) == 2
    assert backend(app).warmth["@review"].state.value == "warm"


def test_files_that_do_not_restore_here_turn_it_off(app, fake_llama, evaluator):
    evaluator.files = {}  # another slot folder: its saves are not seen here
    warmer(app).check()  # saved there, not restorable here: refused, stale again
    warmer(app).check()  # evaluated here

    assert backend(app).evaluator.disabled
    assert len(fake_llama.evaluated) == 2
    assert backend(app).warmth["@code"].state.value == "warm"


def test_a_save_there_that_fails_leaves_the_warmup_here(app, fake_llama, evaluator):
    evaluator.status["save"] = 500
    warmer(app).check()

    assert len(evaluator.evaluated) == 1  # then it is left alone for a while
    assert len(fake_llama.evaluated) == 2  # both evaluated here, and saved here
    assert [a for a, _, _ in fake_llama.actions] == ["save", "save"]
    assert "tried again in 60 s" in backend(app).evaluator.problem

    evaluator.status["save"] = 200
    backend(app).evaluator.paused = (0, "past")  # the pause is over
    warmer(app).request_warmup("@code")
    warmer(app).check()
    assert len(evaluator.evaluated) == 2  # used again
    assert len(fake_llama.evaluated) == 2


def test_requests_are_served_from_what_it_saved(app, fake_llama, evaluator, client):
    warmer(app).check()
    fake_llama.run_other_task(0)
    fake_llama.run_other_task(1)
    backend(app).slots.refresh()

    assert ask(client, "@code How?").headers["X-Bioproxy-Cache"] == "restored"
    assert ask(client, "@code Why?").headers["X-Bioproxy-Cache"] == "slot"


def test_an_edit_after_its_save_does_not_turn_it_off(app, folder, fake_llama, evaluator):
    def edit_after_save(action, slot, name):
        if action == "save":
            (folder / "code.txt").write_text("Edited.\n<{message}>")
            warmer(app).reload()

    evaluator.on_action = edit_after_save
    warmer(app).check()  # @code saved there, then edited before its restore here
    evaluator.on_action = None
    warmer(app).check()  # the edit, warmed there too

    assert backend(app).evaluator.disabled is None
    assert fake_llama.evaluated == []
    assert SYSTEM + "Edited.\n" in [prompt for _, prompt in evaluator.evaluated]
    assert backend(app).warmth["@code"].state.value == "warm"


def edited_and_held_there(app, folder, evaluator, fails=False):
    """@code edited, and its evaluation there held until the event returned is set (then
    it fails, if fails); the greenlet that warms it."""
    warmer(app).check()
    (folder / "code.txt").write_text("Edited.\n<{message}>")
    warmer(app).reload()
    started, go = gevent.event.Event(), gevent.event.Event()

    def evaluating(body):
        started.set()
        go.wait(5)
        if fails:
            raise requests.exceptions.ConnectionError("the warmup llama-server went away")

    evaluator.on_completion = evaluating
    warming = gevent.spawn(warmer(app).check)
    assert started.wait(5)
    return go, warming


def test_a_request_for_the_template_it_evaluates_waits_for_it(
    app, folder, fake_llama, evaluator, client
):
    go, warming = edited_and_held_there(app, folder, evaluator)
    asked = gevent.spawn(ask, client, "@code How?")
    gevent.sleep(0.1)
    assert not asked.ready()  # waiting for the evaluation there, not evaluating it here
    go.set()
    response = asked.get(timeout=5)
    warming.get(timeout=5)

    assert response.status_code == 200
    assert response.headers["X-Bioproxy-Cache"] in ("restored", "slot")
    assert fake_llama.evaluated == []  # the edited template: evaluated there only
    assert backend(app).evaluator.waited == 1


def test_a_request_waiting_for_the_evaluation_there_counts_among_the_users_waiting(
    app, folder, fake_llama, evaluator, client, admin
):
    go, warming = edited_and_held_there(app, folder, evaluator)
    asked = gevent.spawn(ask, client, "@code How?")
    gevent.sleep(0.1)
    status = admin.get("/status").get_json()
    length = samples(admin)[("bioproxy_queue_length", (("backend", backend(app).name),))]
    go.set()
    response = asked.get(timeout=5)
    warming.get(timeout=5)

    assert [(q["template"], q["waits_for"]) for q in status["queue"]] == [("@code", "evaluation")]
    assert length == 1
    assert backend(app).scheduler.users_waiting() == 0  # no longer, once answered
    assert response.headers["X-Bioproxy-Cache"] in ("restored", "slot")


def test_a_request_does_not_wait_for_the_evaluation_when_the_queue_is_full(
    make_app, folder, fake_llama, evaluator
):
    app = with_evaluator(make_app, folder, queue_max_length=0)
    go, warming = edited_and_held_there(app, folder, evaluator)
    response = gevent.spawn(ask, app.test_client(), "@code How?").get(timeout=2)  # no wait
    go.set()
    warming.get(timeout=5)
    assert response.status_code == 200  # a slot was free: it ran at once, cold
    assert response.headers["X-Bioproxy-Cache"] == "cold"
    assert backend(app).evaluator.waited == 0


def test_a_request_that_waited_goes_on_when_the_evaluation_there_fails(
    app, folder, fake_llama, evaluator, client
):
    go, warming = edited_and_held_there(app, folder, evaluator, fails=True)
    asked = gevent.spawn(ask, client, "@code How?")
    gevent.sleep(0.1)
    go.set()
    response = asked.get(timeout=5)
    warming.get(timeout=5)

    assert response.status_code == 200  # answered, cold: nothing lost
    assert response.headers["X-Bioproxy-Cache"] == "cold"
    assert backend(app).evaluator.waited == 1


def test_a_request_for_another_template_does_not_wait(app, folder, fake_llama, evaluator, client):
    go, warming = edited_and_held_there(app, folder, evaluator)
    response = gevent.spawn(ask, client, "@review Look.").get(timeout=2)  # served meanwhile
    go.set()
    warming.get(timeout=5)
    assert response.headers["X-Bioproxy-Cache"] in ("restored", "slot")
    assert backend(app).evaluator.waited == 0


def held_there(app, evaluator):
    """@code's evaluation there (warmed already, forced again) held until the event
    returned is set; the greenlet that warms it."""
    warmer(app).check()
    started, go = gevent.event.Event(), gevent.event.Event()

    def evaluating(body):
        started.set()
        go.wait(5)

    evaluator.on_completion = evaluating
    warmer(app).request_warmup("@code")
    warming = gevent.spawn(warmer(app).check)
    assert started.wait(5)
    return go, warming


def test_a_request_does_not_wait_for_a_version_already_saved(app, evaluator, client):
    go, warming = held_there(app, evaluator)  # forced: evaluated again, its file kept
    response = gevent.spawn(ask, client, "@code How?").get(timeout=2)  # served meanwhile
    go.set()
    warming.get(timeout=5)
    assert response.headers["X-Bioproxy-Cache"] in ("restored", "slot")
    assert backend(app).evaluator.waited == 0


def test_a_variant_does_not_wait_for_its_template_s_evaluation(app, folder, evaluator, client):
    go, warming = edited_and_held_there(app, folder, evaluator)
    body = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "@code How?"},
        ]
    }
    post = client.post
    asked = gevent.spawn(post, "/v1/chat/completions", data=json.dumps(body), buffered=True)
    response = asked.get(timeout=2)  # its head is evaluated apart: nothing to wait for
    go.set()
    warming.get(timeout=5)
    assert response.status_code == 200 and "X-Bioproxy-Variant" in response.headers
    assert backend(app).evaluator.waited == 0


def test_the_wait_for_an_evaluation_counts_against_queue_timeout(
    make_app, folder, fake_llama, evaluator
):
    app = with_evaluator(make_app, folder, queue_timeout=0.3, queue_max_length=5)
    client = app.test_client()
    go, warming = edited_and_held_there(app, folder, evaluator)
    scheduler = backend(app).scheduler
    taken = [Ticket(USER, None) for _ in range(scheduler.slots.count)]
    for ticket in taken:  # every slot busy
        scheduler.submit(ticket)
    started = time.monotonic()
    response = gevent.spawn(ask, client, "@code How?").get(timeout=5)
    waited = time.monotonic() - started
    for ticket in taken:
        scheduler.release(ticket)
    go.set()
    warming.get(timeout=5)  # its restore here needs a slot
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "queue_timeout"
    assert waited < 0.55  # one queue_timeout in all, not one for each wait
