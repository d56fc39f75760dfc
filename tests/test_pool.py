"""Several llama-servers: the backends key, routing between them, failover; faked llamas."""

import json
import time

import gevent
import gevent.event
import pytest
import requests
import responses
import urllib3

from bioproxy import config
from bioproxy.backend import BackendHung
from bioproxy.config import ConfigError
from bioproxy.errors import UpstreamTimeout
from bioproxy.pool import serving
from bioproxy.scheduler import USER, Ticket
from tests.conftest import ADMIN_BASE, BACKEND
from tests.fake_llama import FakeLlama
from tests.test_metrics import samples
from tests.test_warmup import CODE, ask, templates_folder

OTHER = "http://llama2.test:8082"


# The backends key.


def test_backend_url_alone_is_one_backend_named_by_its_host_and_port(isolated_config):
    (spec,) = config.load(
        {"backend_url": "http://gpu1:9000", "backend_api_key": "k"}
    ).backends_list()
    assert (spec.name, spec.url, spec.api_key) == ("gpu1:9000", "http://gpu1:9000", "k")
    assert spec.state_dir == config.load().paths.state_dir  # where one backend kept it


def test_backends_are_urls_or_objects_each_with_its_own_key_and_folders(isolated_config):
    settings = config.load(
        {
            "backend_api_key": "shared",
            "backends": [
                "http://a:8081",
                {"url": "https://b", "name": "big", "backend_api_key": "own"},
                {"url": "http://[::1]:8083", "slot_save_path": "slots-c"},
            ],
        }
    )
    a, b, c = settings.backends_list()
    assert [s.name for s in (a, b, c)] == ["a:8081", "big", "[::1]:8083"]
    assert [s.api_key for s in (a, b, c)] == ["shared", "own", "shared"]
    assert (a.slot_save_path, b.slot_save_path) == (None, None)
    assert c.slot_save_path == str(isolated_config.parent / "slots-c")
    # Each keeps its saved caches' record apart.
    assert len({a.state_dir, b.state_dir, c.state_dir}) == 3
    assert a.state_dir.startswith(settings.paths.state_dir)


def test_backends_come_from_the_environment_as_json(isolated_config):
    environ = {"BIOPROXY_CONFIG": str(isolated_config)}
    environ["BIOPROXY_BACKENDS"] = json.dumps(["http://a:1", "http://b:2"])
    assert [s.name for s in config.load(environ=environ).backends_list()] == ["a:1", "b:2"]


@pytest.mark.parametrize(
    "keys, says",
    [
        ({"backends": ["ftp://a"]}, "entry 0: url must be an http"),
        ({"backends": [{"name": "x"}]}, "entry 0 must be a URL, or an object with a url"),
        ({"backends": [3]}, "entry 0 must be a URL"),
        ({"backends": [{"url": "http://a", "port": 1}]}, "unknown key 'port'"),
        ({"backends": [{"url": "http://a", "name": "a b"}]}, "name must be"),
        ({"backends": [{"url": "http://a", "backend_api_key": 1}]}, "must be a string"),
        ({"backends": ["http://a:1", "http://a:1/"]}, "is there twice"),
        ({"backends": ["http://a:1"], "backend_url": "http://b:2"}, "both set"),
        (
            {"backends": ["http://a:1", "http://b:2"], "warmup_backend_url": "http://c:3"},
            "works with one backend only",
        ),
        ({"backends": {"url": "http://a"}}, "must be a JSON array"),
    ],
)
def test_bad_backends_are_refused_with_what_is_wrong(isolated_config, keys, says):
    with pytest.raises(ConfigError, match=says):
        config.load(keys)


# Routing, against two faked llama-servers.


@pytest.fixture
def llamas():
    responses.start()
    yield FakeLlama(base=BACKEND).install(), FakeLlama(base=OTHER).install()
    responses.stop()
    responses.reset()


@pytest.fixture
def app(make_app, isolated_config, llamas):
    folder = templates_folder(isolated_config)
    return make_app(
        backends=[
            {"url": BACKEND, "name": "one", "slot_save_path": str(folder / "slots")},
            {"url": OTHER, "name": "two", "slot_save_path": str(folder / "slots")},
        ],
        prefixes={"@code": "code.txt", "@review": "review.txt"},
    )


def pool(app):
    return app.extensions["bioproxy"].pool


def test_a_templated_request_goes_to_the_backend_that_holds_its_template(app, llamas):
    one, two = pool(app)
    one.slots.refresh()  # up, but nothing warmed there
    two.warmer.check()  # both templates warm here
    client = app.test_client()

    for _ in range(3):
        answer = ask(client, "@code Why?")
        assert answer.headers["X-Bioproxy-Backend"] == "two"
        assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert llamas[0].chats == []


def test_a_template_busy_in_its_slot_on_one_backend_goes_where_a_free_slot_holds_it(app):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()  # @code in slot 0 of each, @review in slot 1
    entry = app.extensions["bioproxy"].catalog["@code"]
    ticket = Ticket(USER, "@code")
    one.scheduler.acquire(ticket)
    assert ticket.slot == 0 and one.scheduler.free_slots() == [1]
    # one would restore it into its other slot: two has it ready.
    assert {pool(app).route(entry, entry.template).name for _ in range(4)} == {"two"}


def test_it_spills_over_where_waiting_would_cost_more_than_warming(app):
    one, two = pool(app)
    one.slots.refresh()
    two.warmer.check()
    entry = app.extensions["bioproxy"].catalog["@code"]
    # Both of two's slots busy, users holding them long: restoring on one costs less.
    one.warmer.check()
    held = [two.scheduler.submit(Ticket(USER)) for _ in range(2)]
    two.scheduler.hold_seconds = 30.0
    assert pool(app).route(entry, entry.template).name == "one"
    # Held briefly: waiting for two's slot costs less than evaluating it on one.
    for ticket in held:
        two.scheduler.release(ticket)
    held = [two.scheduler.submit(Ticket(USER)) for _ in range(2)]
    two.scheduler.hold_seconds = 0.001
    one.warmth["@code"].evaluation_seconds = 5.0
    for key in list(one.caches.registry.entries):
        one.caches.registry.forget(key)
    for slot in range(one.slots.table.count):
        one.slots.forget(slot)
    assert pool(app).route(entry, entry.template).name == "two"


def test_plain_requests_go_where_a_slot_is_free(app):
    one, two = pool(app)
    for backend in (one, two):
        backend.slots.refresh()
    for _ in range(2):
        one.scheduler.submit(Ticket(USER))
    client = app.test_client()
    body = {"messages": [{"role": "user", "content": "Hello"}]}
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Backend"] == "two"


def refuse(request):
    reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")
    raise requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, request.url, reason))


def test_a_backend_that_refuses_is_left_and_the_request_goes_to_another(app, llamas):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    responses.remove("POST", f"{BACKEND}/v1/chat/completions")
    responses.add_callback("POST", f"{BACKEND}/v1/chat/completions", refuse)
    responses.add_callback("GET", f"{BACKEND}/v1/models", refuse)
    responses.add("GET", f"{OTHER}/v1/models", json={"data": []})
    client = app.test_client()
    # Routed to one first (in turn with two, both holding it), refused, sent to two.
    served = {ask(client, "@code Why?").headers["X-Bioproxy-Backend"] for _ in range(2)}
    assert served == {"two"}
    assert not one.up() and two.up()
    assert client.get("/v1/models").headers["X-Bioproxy-Backend"] == "two"
    # Nothing of it reached one: its chats are the ones it never got.
    assert len(llamas[1].chats) == 2
    metrics = samples(app.test_client(base_url=ADMIN_BASE))
    assert metrics[("bioproxy_backend_up", (("backend", "one"),))] == 0
    assert metrics[("bioproxy_backend_up", (("backend", "two"),))] == 1
    assert metrics[("bioproxy_backend_requests_total", (("backend", "two"),))] == 3


def test_when_every_backend_refuses_the_client_gets_a_clear_error(app):
    for backend in pool(app):
        backend.slots.refresh()
    for base in (BACKEND, OTHER):
        responses.add_callback("GET", f"{base}/v1/models", refuse)
    answer = app.test_client().get("/v1/models")
    assert answer.status_code == 502
    assert answer.get_json()["error"]["code"] == "upstream_unavailable"


def test_a_backend_that_answers_again_is_taken_back_by_its_warmer(app):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    one.unreachable()
    assert not one.up()
    one.warmer.check()  # what its health check wakes it for
    assert one.up()


def test_an_edited_template_is_stale_on_every_backend(app, isolated_config):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    (isolated_config.parent / "code.txt").write_text(CODE + " Edited.")
    one.warmer.reload()
    assert [b.warmth["@code"].state.value for b in (one, two)] == ["stale", "stale"]


def test_status_and_health_show_each_backend(app):
    one, two = pool(app)
    one.warmer.check()
    two.slots.refresh()
    admin = app.test_client(base_url=ADMIN_BASE)
    responses.add("GET", f"{BACKEND}/health", json={"status": "ok"})
    responses.add("GET", f"{OTHER}/health", status=503, json={"error": {"message": "Loading"}})

    status = admin.get("/status").get_json()
    shown = {b["name"]: b for b in status["backends"]}
    assert shown["one"]["templates_warm"] == 2 and shown["two"]["templates_warm"] == 0
    assert shown["one"]["up"] and shown["two"]["slot_count"] == 2
    assert len(shown["two"]["slots"]) == 2

    health = admin.get("/health")
    assert health.status_code == 200  # one of them answers
    assert health.get_json()["status"] == "degraded"
    assert [b["status"] for b in health.get_json()["backends"]] == ["ok", "loading"]

    templates = admin.get("/templates").get_json()["templates"]
    code = next(t for t in templates if t["prefix"] == "@code")
    assert [(b["name"], b["state"]) for b in code["backends"]] == [
        ("one", "warm"),
        ("two", "stale"),
    ]


def test_requests_waiting_at_a_backend_that_goes_out_go_to_another(app, llamas):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    held = {b: [Ticket(USER) for _ in range(2)] for b in (one, two)}
    for backend, tickets in held.items():
        for ticket in tickets:
            backend.scheduler.acquire(ticket)
    two.scheduler.hold_seconds = 30.0  # so routing would rather wait at one
    body = {"messages": [{"role": "user", "content": "Hello"}]}
    waiting = gevent.spawn(app.test_client().post, "/v1/chat/completions", json=body)
    gevent.sleep(0.05)
    assert len(one.scheduler.queue) == 1  # waiting there

    one.unreachable()  # its health check, or another request, found it gone
    gevent.sleep(0.05)
    assert one.scheduler.queue == [] and len(two.scheduler.queue) == 1
    two.scheduler.release(held[two][0])

    answer = waiting.get(timeout=5)
    assert answer.status_code == 200, answer.get_data()
    assert answer.headers["X-Bioproxy-Backend"] == "two"
    assert llamas[0].chats == [] and len(llamas[1].chats) == 1
    assert held[one][0].outcome == "granted"  # what runs there is left to end


def test_waiting_requests_stay_when_no_other_backend_is_up(app):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    for ticket in [Ticket(USER) for _ in range(2)]:
        one.scheduler.acquire(ticket)
    waiting = one.scheduler.submit(Ticket(USER))
    two.unreachable()
    one.unreachable()
    assert waiting.outcome == "queued" and one.scheduler.queue == [waiting]


def test_a_backend_warming_after_its_start_takes_no_templated_requests(app, llamas):
    one, two = pool(app)
    two.warmer.check()
    one.slots.refresh()  # up, its warmer not done yet: both templates still to warm
    assert one.joining and not two.joining
    entry = app.extensions["bioproxy"].catalog["@code"]
    for ticket in [Ticket(USER) for _ in range(2)]:
        two.scheduler.submit(ticket)
    two.scheduler.hold_seconds = 60.0  # a spill-over would pay, but one is not warm yet
    assert pool(app).route(entry, entry.template).name == "two"
    assert pool(app).route().name == "one"  # plain requests go there at once

    one.warmer.check()
    assert not one.joining
    assert pool(app).route(entry, entry.template).name == "one"


def test_a_restarted_backend_is_warmed_again_before_templated_requests(app, llamas):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    entry = app.extensions["bioproxy"].catalog["@code"]
    restoring = gevent.event.Event()
    llamas[0].restart()
    llamas[0].on_action = lambda action, slot, filename: restoring.wait(5)
    checking = gevent.spawn(one.warmer.check)
    gevent.sleep(0.05)
    assert one.joining  # found restarted, its templates being restored
    assert {pool(app).route(entry, entry.template).name for _ in range(4)} == {"two"}
    restoring.set()
    checking.join(timeout=5)
    assert not one.joining and one.warmth["@code"].state == "warm"
    assert {pool(app).route(entry, entry.template).name for _ in range(4)} == {"one", "two"}


def test_warm_backends_keeps_each_template_warm_on_that_many(make_app, isolated_config, llamas):
    folder = templates_folder(isolated_config)
    app = make_app(
        backends=[
            {"url": BACKEND, "name": "one", "slot_save_path": str(folder / "slots")},
            {"url": OTHER, "name": "two", "slot_save_path": str(folder / "slots")},
        ],
        prefixes={"@code": "code.txt", "@review": "review.txt"},
        warm_backends=1,
    )
    one, two = pool(app)
    for backend in (one, two):
        backend.slots.refresh()
        backend.failures = 0
    for backend in (one, two):
        backend.warmer.check()
    for prefix in ("@code", "@review"):
        warm = [b.name for b in (one, two) if b.warmth[prefix].state == "warm"]
        (server,) = serving([one, two], prefix, 1)
        assert warm == [server.name], prefix
        assert [b.serves(prefix) for b in (one, two)] == [server is one, server is two]
    assert not one.joining and not two.joining  # each warmed what it serves

    # The backend that serves @code goes out: the other takes it over and warms it.
    (server,) = serving([one, two], "@code", 1)
    other = two if server is one else one
    other.warmer.wake.clear()
    server.unreachable()
    assert other.warmer.wake.is_set()
    other.warmer.check()
    assert other.warmth["@code"].state == "warm"


def test_warm_backends_is_a_count(isolated_config):
    with pytest.raises(ConfigError, match="warm_backends must be 0 or more"):
        config.load({"warm_backends": -1})


def test_a_backend_that_stops_answering_cuts_its_stalled_answers_only(app):
    one, _ = pool(app)

    class Answer:
        def __init__(self, read_at):
            self.read_at, self.on_close, self.was_cut = read_at, None, False

        def cut(self):
            self.was_cut = True

    now = time.monotonic()
    stalled, streaming = Answer(now - 60), Answer(now)
    for answer in (stalled, streaming):
        one.answering(answer)
    one.cut_stalled()
    assert (stalled.was_cut, streaming.was_cut) == (True, False)
    stalled.on_close(stalled)  # closed: no longer counted
    assert one.answers == {streaming}


def test_a_request_waiting_for_a_silent_backend_gets_a_clean_error(app):
    one, _ = pool(app)

    def waits():
        with one.awaiting():
            gevent.sleep(30)  # llama-server never answers

    waiting = gevent.spawn(waits)
    gevent.sleep(0)
    one.heads[waiting] -= 60  # waiting for a minute
    one.cut_stalled()
    with pytest.raises(UpstreamTimeout, match="stopped answering"):
        waiting.get(timeout=5)
    assert one.heads == {}


def stalls(backend, calls):
    """backend's chat answers never start: its health check finds it silent meanwhile."""

    def hangs(request):
        calls.append(request)
        backend.unreachable()
        raise BackendHung(f"llama-server {backend.name} stopped answering")

    url = f"{backend.upstream.base_url}/v1/chat/completions"
    responses.remove("POST", url)
    responses.add_callback("POST", url, hangs)


def test_a_request_whose_backend_stalls_before_answering_goes_to_another(app):
    one, two = pool(app)
    for backend in (one, two):
        backend.warmer.check()
    calls = []
    stalls(one, calls)
    client = app.test_client()
    answers = [ask(client, "@code Why?") for _ in range(2)]  # one of them routed to one
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["X-Bioproxy-Backend"] for a in answers] == ["two", "two"]
    assert len(calls) == 1
    # Its slot there stays taken until a look sees it idle: the server may run it yet.
    assert one.scheduler.users_waiting() == 0 and len(one.scheduler.free_slots()) == 1


def test_a_request_whose_backend_stalls_with_no_other_up_gets_a_clean_error(app):
    one, two = pool(app)
    one.warmer.check()
    two.unreachable()
    calls = []
    stalls(one, calls)
    answer = ask(app.test_client(), "@code Why?")
    assert answer.status_code == 504, answer.get_data()
    assert answer.get_json()["error"]["code"] == "upstream_timeout"
    assert len(calls) == 1
