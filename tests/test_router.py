"""llama-server in router mode: a backend's models, each a unit of its own; faked router."""

import json

import gevent
import pytest
import responses

from bioproxy import config
from bioproxy.config import ConfigError
from bioproxy.upstream import Upstream
from tests.conftest import ADMIN_BASE, BACKEND
from tests.fake_llama import FakeLlama, FakeRouter
from tests.test_warmup import ask, templates_folder


def test_a_routers_models_are_backends_of_their_own(isolated_config):
    settings = config.load(
        {"backends": [{"url": "http://box:8080", "name": "box", "models": ["a", "org/b:Q4"]}]}
    )
    a, b = settings.backends_list()
    assert [(s.name, s.url, s.model) for s in (a, b)] == [
        ("box/a", "http://box:8080", "a"),
        ("box/org/b:Q4", "http://box:8080", "org/b:Q4"),
    ]
    assert a.state_dir != b.state_dir and a.state_dir.endswith("box_a")


@pytest.mark.parametrize(
    "keys, says",
    [
        ({"backends": [{"url": "http://a", "models": "a"}]}, "models must be a JSON array"),
        ({"backends": [{"url": "http://a", "models": []}]}, "models must be a list"),
        ({"backends": [{"url": "http://a", "models": ["a", "a"]}]}, "each once"),
        ({"backends": [{"url": "http://a", "models": ["a b"]}]}, "without spaces"),
        ({"prefixes": {"@c": {"file": "c.txt", "size": 1}}}, "unknown key 'size'"),
        ({"prefixes": {"@c": {"model": "a"}}}, "not a file path"),
        ({"prefixes": {"@c": {"file": "c.txt", "model": 3}}}, "its model must be"),
    ],
)
def test_bad_models_are_refused_with_what_is_wrong(isolated_config, keys, says):
    with pytest.raises(ConfigError, match=says):
        config.load(keys)


def test_a_template_may_name_its_model(isolated_config):
    settings = config.load({"prefixes": {"@c": {"file": "c.txt", "model": "a"}, "@r": "r.txt"}})
    assert settings.templates() == {"@c": ("c.txt", "a"), "@r": ("r.txt", None)}


def test_bioproxys_own_calls_name_the_model_and_never_load_it():
    upstream = Upstream("http://box:8080", 1, 1, 1, model="org/b:Q4")
    url, body = upstream.own_call("GET", "/slots", None)
    assert url == "http://box:8080/slots?autoload=false&model=org%2Fb%3AQ4"
    url, body = upstream.own_call("POST", "/slots/0?action=save", {"filename": "f"})
    assert url == "http://box:8080/slots/0?action=save&autoload=false&model=org%2Fb%3AQ4"
    assert body == {"model": "org/b:Q4", "filename": "f"}
    plain = Upstream("http://box:8080", 1, 1, 1)
    assert plain.own_call("GET", "/slots", None) == ("http://box:8080/slots", None)


@pytest.fixture
def router():
    responses.start()
    yield FakeRouter(["a", "b"]).install()
    responses.stop()
    responses.reset()


@pytest.fixture
def app(make_app, isolated_config, router):
    folder = templates_folder(isolated_config)
    backend = {"url": BACKEND, "name": "r", "models": ["a", "b"]}
    backend["slot_save_path"] = str(folder / "slots")
    return make_app(
        backends=[backend],
        prefixes={"@code": {"file": "code.txt", "model": "a"}, "@review": "review.txt"},
    )


def units(app):
    return app.extensions["bioproxy"].pool


def test_each_model_warms_its_templates_and_the_ones_for_any_model(app, router):
    a, b = units(app)
    for unit in (a, b):
        unit.warmer.check()
    assert a.warmth["@code"].state == "warm" and a.warmth["@review"].state == "warm"
    assert b.warmth["@review"].state == "warm"
    assert not b.serves("@code") and b.state_of("@code") == "unserved"
    assert not b.joining  # what it serves is warm
    # Each call named its model, and none would make the router load one.
    assert router.calls and all(autoload == "false" for *_, autoload in router.calls)
    evaluated = {m: [p for _, p in fake.evaluated] for m, fake in router.models.items()}
    assert any("coding" in p for p in evaluated["a"])
    assert not any("coding" in p for p in evaluated["b"])
    templates = app.test_client(base_url=ADMIN_BASE).get("/templates").get_json()["templates"]
    code = next(t for t in templates if t["prefix"] == "@code")
    shown = [(s["name"], s["served"], s["state"]) for s in code["backends"]]
    assert shown == [("r/a", True, "warm"), ("r/b", False, "unserved")]


def test_a_templated_request_goes_to_its_models_unit_which_it_then_names(app, router):
    for unit in units(app):
        unit.warmer.check()
    client = app.test_client()

    answer = ask(client, "@code Why?")  # no model: the template's
    assert answer.status_code == 200, answer.get_data()
    assert answer.headers["X-Bioproxy-Backend"] == "r/a"
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert router.models["a"].chats[-1]["model"] == "a"

    answer = ask(client, "@review x = 1", model="b")  # the model the client names
    assert answer.headers["X-Bioproxy-Backend"] == "r/b"
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert router.models["b"].chats[-1]["model"] == "b"

    plain = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": "b", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    assert plain.headers["X-Bioproxy-Backend"] == "r/b"


def test_a_model_the_router_reloads_is_warmed_again(app, router):
    a, b = units(app)
    for unit in (a, b):
        unit.warmer.check()
    router.max_instances = 1
    router.unloaded.add("a")  # past --models-max, or idle
    a.warmer.check()
    assert not a.up() and router.loads == []  # no room: bioproxy would make it unload b
    status = app.test_client(base_url=ADMIN_BASE).get("/health").get_json()
    assert status["status"] == "ok"  # the router answers, and loads it when asked
    assert [s["status"] for s in status["backends"]] == ["unloaded", "ok"]

    router.reload("a")  # a user's request made the router load it again: empty slots
    router.unloaded.add("b")
    a.warmer.check()
    assert a.up() and a.warmth["@code"].state == "warm"
    restored = [name for action, _, name in router.models["a"].actions if action == "restore"]
    assert len(restored) == 2  # from its saved files, not evaluated again


def test_a_model_not_running_is_loaded_where_the_router_has_room(app, router):
    a, b = units(app)
    router.unloaded.add("a")
    for unit in (a, b):
        unit.warmer.check()
    assert router.loads == ["a"]
    a.warmer.check()
    assert a.up() and a.warmth["@code"].state == "warm"


def test_a_router_without_models_named_makes_a_backend_of_each_model_it_lists(
    make_app, isolated_config, router, caplog
):
    caplog.set_level("INFO")
    templates_folder(isolated_config)
    app = make_app(
        backend_url=BACKEND,
        prefixes={"@code": {"file": "code.txt", "model": "a"}, "@review": "review.txt"},
    )
    pool = units(app)
    (found,) = pool
    found.warmer.check()
    assert found.router and not found.up()
    assert [b.name for b in pool] == ["llama.test:8081", "llama.test:8081/a", "llama.test:8081/b"]
    assert router.calls == []  # nothing was asked of a model yet: each unit's warmer does
    _, a, b = pool
    assert pool.first is a and pool.of_model(None) == [a, b] and pool.of_model("b") == [b]
    # Its own folder for each, as a backends entry naming the models makes.
    assert a.caches.registry.path != b.caches.registry.path
    assert a.caches.registry.path.endswith("backends/llama.test_8081_a/saved.json")
    for unit in (a, b):
        unit.warmer.check()
    assert a.warmth["@code"].state == "warm" and b.state_of("@code") == "unserved"
    assert b.warmth["@review"].state == "warm" and found.state_of("@review") == "unserved"
    answer = ask(app.test_client(), "@code Why?")
    assert answer.headers["X-Bioproxy-Backend"] == "llama.test:8081/a"
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    status = app.test_client(base_url=ADMIN_BASE).get("/status").get_json()
    shown = [(s["name"], s["router"], s.get("models"), s["up"]) for s in status["backends"]]
    assert shown == [
        ("llama.test:8081", True, ["a", "b"], False),
        ("llama.test:8081/a", False, None, True),
        ("llama.test:8081/b", False, None, True),
    ]
    assert "each model it lists becomes a backend" in caplog.text


def test_a_model_the_router_lists_later_becomes_a_backend_at_the_next_look(
    make_app, isolated_config, router
):
    templates_folder(isolated_config)
    app = make_app(backends=[BACKEND], prefixes={"@review": "review.txt"})
    pool = units(app)
    pool.first.warmer.check()
    assert [b.model for b in pool] == [None, "a", "b"]
    router.models["c"] = FakeLlama(model="/models/c.gguf", base=BACKEND)
    pool.backends[0].warmer.check()
    pool.backends[0].warmer.check()  # once each
    assert [b.model for b in pool] == [None, "a", "b", "c"]
    c = pool.by_name["llama.test:8081/c"]
    c.warmer.check()
    assert c.warmth["@review"].state == "warm"


def test_a_model_the_router_no_longer_lists_leaves_the_pool_and_comes_back_warm(
    make_app, isolated_config, router, caplog
):
    folder = templates_folder(isolated_config)
    backend = {"url": BACKEND, "slot_save_path": str(folder / "slots")}
    app = make_app(backends=[backend], prefixes={"@review": "review.txt"})
    admin = app.test_client(base_url=ADMIN_BASE)
    pool = units(app)
    pool.first.warmer.check()
    b = pool.by_name["llama.test:8081/b"]
    b.warmer.check()
    assert b.warmth["@review"].state == "warm"
    evaluations = len(router.models["b"].evaluated)
    gone = router.models.pop("b")

    pool.backends[0].warmer.check()

    assert [u.name for u in pool] == ["llama.test:8081", "llama.test:8081/a"]
    assert b.warmer.greenlet is None or b.warmer.greenlet.dead
    assert "no longer lists the model b" in caplog.text
    metrics = admin.get("/metrics").get_data(as_text=True)
    assert 'backend="llama.test:8081/b"' not in metrics
    shown = [s["name"] for s in admin.get("/status").get_json()["backends"]]
    assert shown == ["llama.test:8081", "llama.test:8081/a"]
    answer = ask(app.test_client(), "@review Look.")  # served by the model still listed
    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Backend"] == "llama.test:8081/a"

    router.models["b"] = gone  # listed again: a unit again, from its saved cache
    pool.backends[0].warmer.check()
    back = pool.by_name["llama.test:8081/b"]
    assert back is not b
    back.warmer.check()
    assert back.warmth["@review"].state == "warm"
    assert len(gone.evaluated) == evaluations  # restored, not evaluated again
    assert "restore" in [action for action, _, _ in gone.actions]


def model_events(*events):
    """A /models/sse body of the router's: these events, then the end of the stream."""
    return b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events)


def test_a_routers_model_events_wake_the_backends_they_concern(make_app, isolated_config, router):
    templates_folder(isolated_config)
    app = make_app(backends=[BACKEND], prefixes={"@review": "review.txt"})
    pool = units(app)
    pool.first.warmer.check()
    assert len(pool) == 3  # the router, and a unit of each of its two models
    assert list(pool.followed) == [BACKEND]  # following since it found a router there
    events = pool.followed[BACKEND]

    def woken(*sent):
        for unit in pool:
            unit.warmer.wake.clear()
        sse = model_events(*sent)
        responses.upsert("GET", f"{BACKEND}/models/sse", body=sse, content_type="text/event-stream")
        events.follow()
        return [unit.warmer.wake.is_set() for unit in pool]

    loaded = {"model": "b", "event": "model_status", "data": {"status": "loaded"}}
    assert woken(loaded) == [True, False, True]  # b's, and the router's (a new model?)
    assert woken({"model": "*", "event": "models_reload"}) == [True, True, True]
    assert woken({"model": "a", "event": "model_remove"}) == [True, True, True]
    progress = {"model": "c", "event": "download_progress", "data": {}}
    assert woken(progress) == [False, False, False]


def test_a_llama_server_without_model_events_is_not_followed(make_app, isolated_config, router):
    templates_folder(isolated_config)
    app = make_app(backends=[BACKEND], prefixes={"@review": "review.txt"})
    pool = units(app)
    pool.first.warmer.check()
    responses.upsert("GET", f"{BACKEND}/models/sse", status=404, json={"error": "no"})
    # It gives up at once instead of asking again every few seconds.
    assert gevent.with_timeout(2, pool.followed[BACKEND].run, timeout_value="still") is None


def test_a_router_whose_models_cannot_be_read_takes_requests_itself(
    make_app, isolated_config, router
):
    templates_folder(isolated_config)
    app = make_app(backends=[BACKEND], prefixes={"@review": "review.txt"})
    responses.replace("GET", f"{BACKEND}/models", status=500, json={"error": "boom"})
    pool = units(app)
    pool.first.warmer.check()
    (found,) = pool
    assert found.router and pool.of_model(None) == [found]
    plain = app.test_client().post(
        "/v1/chat/completions",
        data=json.dumps({"model": "b", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    assert plain.status_code == 200  # passed on as it came, for the router to place
    assert router.models["b"].chats[-1]["messages"][0]["content"] == "Hi"


def test_a_request_naming_a_models_alias_goes_to_that_models_backend(
    make_app, isolated_config, router
):
    templates_folder(isolated_config)
    router.aliases["b"] = ["bee"]
    app = make_app(backends=[BACKEND], prefixes={"@review": "review.txt"})
    pool = units(app)
    pool.first.warmer.check()
    _, a, b = pool
    assert pool.of_model("bee") == [b] and pool.of_model("b") == [b]
    for unit in (a, b):
        unit.warmer.check()
    answer = ask(app.test_client(), "@review x = 1", model="bee")
    assert answer.headers["X-Bioproxy-Backend"] == "llama.test:8081/b"
    assert answer.headers["X-Bioproxy-Cache"] == "slot"
