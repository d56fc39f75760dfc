"""A real llama-server in router mode, serving the bundled model under two names."""

import contextlib
import os
import signal

import requests

from bioproxy.llamacpp import LlamaServer, model_path
from bioproxy.testing import examples_workdir
from tests.servers import Bioproxy, free_port, wait_until

MODELS = ("coder", "writer")


@contextlib.contextmanager
def router(folder, defaults=False):
    """llama-server in router mode: each model a server of its own, two slots each (or,
    with defaults, as users start it: --models-dir, --port and a slot folder only)."""
    models = folder / "models"
    models.mkdir(parents=True)
    for name in MODELS:  # two names, one file: two servers to the router
        (models / f"{name}.gguf").symlink_to(model_path())
    server = LlamaServer(
        free_port(),
        slots=2,
        context=8192,
        slot_save_path=str(folder / "slots"),
        log_path=str(folder / "router.log"),
        models_dir=str(models),
        defaults=defaults,
    )
    try:
        with server:
            yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)  # its models' servers too


# What a warm templated request may be served from, where llama-server clears idle slots.
WARM = ("slot", "restored", "server")


def ask(proxy, text, **extra):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}
    answer = requests.post(proxy.proxy_url + "/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    headers = answer.headers
    return headers["X-Bioproxy-Backend"], headers.get("X-Bioproxy-Cache"), answer.json()


def shown(proxy):
    """{backend: (up, {template: state})} from /status."""
    status = requests.get(proxy.admin_url + "/status", timeout=10).json()
    return {b["name"]: (b["up"], b["templates"]) for b in status["backends"]}


def warm(proxy):
    units = shown(proxy)
    coder, writer = units["router/coder"], units["router/writer"]
    return (
        coder[0]
        and writer[0]
        and coder[1] == {"@code": "warm", "@review": "warm"}
        and writer[1] == {"@code": "unserved", "@review": "warm"}
    )


def test_each_model_of_a_router_is_warmed_and_served_warm_and_warmed_again(tmp_path):
    with router(tmp_path / "llama") as llama:
        # Nothing loaded yet: GET /slots there needs a model.
        refused = requests.get(llama.url + "/slots", timeout=10)
        assert refused.status_code == 400, refused.text
        work, config = examples_workdir(tmp_path / "proxy", health_check_interval=0.5)
        config["prefixes"]["@code"] = {"file": config["prefixes"]["@code"], "model": "coder"}
        config["backends"] = [
            {
                "url": llama.url,
                "name": "router",
                "models": list(MODELS),
                "slot_save_path": llama.slot_save_path,
            }
        ]
        with Bioproxy(None, work, config) as proxy:
            # bioproxy had the router load both models (it has room for four), then
            # warmed each one's templates in its own slots.
            wait_until(
                lambda: warm(proxy),
                timeout=300,
                what="both models warm",
                describe=lambda: str(shown(proxy)),
            )
            models = requests.get(llama.url + "/models", timeout=10).json()["data"]
            assert {m["id"]: m["status"]["value"] for m in models} == dict.fromkeys(
                MODELS, "loaded"
            )
            # Three saved caches (@code on coder, @review on both) in the one folder the
            # router gives its models, each file named for its unit.
            assert len(os.listdir(llama.slot_save_path)) == 3

            name, cache, answer = ask(proxy, "@code Why?")  # no model: its template's
            assert (name, cache) == ("router/coder", "slot"), answer
            assert answer["timings"]["prompt_n"] < 40, answer["timings"]
            assert answer["model"] == "coder"
            name, cache, answer = ask(proxy, "@review x = 1", model="writer")
            assert (name, cache) == ("router/writer", "slot"), answer
            assert answer["timings"]["prompt_n"] < 40, answer["timings"]
            plain = ask(proxy, "Name a colour.", model="writer")
            assert plain[0] == "router/writer" and plain[1] is None

            # The router unloads coder (past --models-max, or asked): its KV is gone.
            unloaded = requests.post(
                llama.url + "/models/unload", json={"model": "coder"}, timeout=30
            )
            assert unloaded.status_code == 200, unloaded.text
            wait_until(lambda: not shown(proxy)["router/coder"][0], timeout=30, what="coder out")
            # Loaded again (here by bioproxy, the router having room), and its templates
            # restored from their files.
            wait_until(lambda: warm(proxy), timeout=120, what="coder warm again")
            templates = requests.get(proxy.admin_url + "/templates", timeout=10).json()
            code = next(t for t in templates["templates"] if t["prefix"] == "@code")
            on_coder = next(b for b in code["backends"] if b["name"] == "router/coder")
            assert on_coder["last_warmup"]["outcome"] == "restored", on_coder["last_warmup"]
            name, cache, answer = ask(proxy, "@code And why not?")
            assert (name, cache) == ("router/coder", "slot"), answer
            assert answer["timings"]["prompt_n"] < 40, answer["timings"]


def test_a_router_named_without_its_models_has_each_found_warmed_and_served_warm(tmp_path):
    with router(tmp_path / "llama", defaults=True) as llama:
        # Passes and health checks far apart: the router's changes below are seen at once
        # only because bioproxy follows its model events (GET /models/sse).
        slow = {"health_check_interval": 600, "warmup_check_interval": 600}
        work, config = examples_workdir(tmp_path / "proxy", **slow)
        config["prefixes"]["@code"] = {"file": config["prefixes"]["@code"], "model": "coder"}
        config["backend_url"] = llama.url  # as for one llama-server: no models named
        config["slot_save_path"] = llama.slot_save_path
        name = f"127.0.0.1:{llama.port}"
        with Bioproxy(None, work, config) as proxy:

            def found_and_warm():
                units = shown(proxy)
                coder, writer = units.get(f"{name}/coder"), units.get(f"{name}/writer")
                return (
                    coder is not None
                    and writer is not None
                    and coder == (True, {"@code": "warm", "@review": "warm"})
                    and writer == (True, {"@code": "unserved", "@review": "warm"})
                )

            wait_until(
                found_and_warm,
                timeout=300,
                what="both models found and warm",
                describe=lambda: str(shown(proxy)),
            )
            status = requests.get(proxy.admin_url + "/status", timeout=10).json()
            found = status["backends"][0]
            assert (found["name"], found["router"], found["up"]) == (name, True, False)
            assert found["models"] == sorted(MODELS)

            for text, model, unit in (
                ("@code Why?", None, "coder"),
                ("@review x = 1", "writer", "writer"),
            ):
                extra = {"model": model} if model else {}
                backend, cache, answer = ask(proxy, text, **extra)
                # Restored before the request, or left to the RAM cache once measured: a
                # router's models, started with llama.cpp's defaults, clear their idle
                # slots (a unified KV cache). prompt_n tells it was warm either way.
                assert backend == f"{name}/{unit}" and cache in WARM, answer
                assert answer["timings"]["prompt_n"] < 40, answer["timings"]
                assert answer["model"] == unit

            # The writer taken off the router (its file gone, its list reloaded: the router
            # re-reads its folder only when asked, and unloads a running model it lost).
            link = tmp_path / "llama" / "models" / "writer.gguf"
            link.unlink()
            requests.get(llama.url + "/models?reload=1", timeout=30).raise_for_status()
            wait_until(
                lambda: f"{name}/writer" not in shown(proxy),
                timeout=30,
                what="the writer's backend gone",
                describe=lambda: str(shown(proxy)),
            )
            backend, cache, answer = ask(proxy, "@review y = 2")
            assert backend == f"{name}/coder" and cache in WARM, answer
            assert "no longer lists the model writer" in proxy.log()

            # Back: a backend again, warm from the file it saved before.
            link.symlink_to(model_path())
            requests.get(llama.url + "/models?reload=1", timeout=30).raise_for_status()
            wait_until(
                lambda: shown(proxy).get(f"{name}/writer", (False, {}))[1].get("@review") == "warm",
                timeout=120,
                what="the writer's backend back and warm",
                describe=lambda: str(shown(proxy)),
            )
            backend, cache, answer = ask(proxy, "@review z = 3", model="writer")
            assert backend == f"{name}/writer" and cache in WARM, answer
            assert answer["timings"]["prompt_n"] < 40, answer["timings"]
