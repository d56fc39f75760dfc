"""Templates warmed, saved and restored in a real llama-server, with -np 1 and -np 2."""

import json
import os
import shutil
from pathlib import Path

import pytest
import requests

from bioproxy import templates
from tests.faultproxy import FaultProxy
from tests.integration.conftest import start_llama
from tests.integration.sse import read_events
from tests.servers import Bioproxy, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
QUESTION = "How do I reverse a list in Python?"


class Setup:
    """llama-server, bioproxy with the example templates (copied) plus a broken one."""

    def __init__(self, folder, slots, extra_args=()):
        self.folder = folder
        shutil.copytree(EXAMPLES / "templates", folder / "templates")
        # bioproxy's config folder is folder/bioproxy, its template root folder/bioproxy/templates.
        (folder / "secret.txt").write_text("TOP-SECRET-VALUE")
        (folder / "templates" / "bad.txt").write_text("Leak: <{../secret.txt}>\n<{message}>")
        self.llama = start_llama(folder / "llama", slots=slots, extra_args=extra_args)
        (folder / "llama").mkdir()
        self.config = {
            "prefixes": {
                "@code": "templates/code.txt",
                "@review": "templates/review.txt",
                "@bad": "templates/bad.txt",
            },
            "warmup_check_interval": 0.5,
            "template_root": "templates",
            "slot_save_path": self.llama.slot_save_path,
        }
        self.bioproxy = None

    def start_bioproxy(self):
        workdir = self.folder / "bioproxy"
        if not workdir.exists():  # a restart keeps the files as the tests left them
            workdir.mkdir()
            shutil.copytree(self.folder / "templates", workdir / "templates")
        self.bioproxy = Bioproxy(self.llama.url, workdir, self.config).start().wait_ready()
        return self.bioproxy

    def template(self, prefix):
        root = self.folder / "bioproxy"
        path = self.config["prefixes"][prefix]
        return templates.load(prefix, path, str(root), str(root / "templates"), 1 << 20)

    def listed(self):
        return self.bioproxy.templates()

    def wait_warm(self, digest=None):
        def warm():
            listed = self.listed()
            code = listed["@code"]
            ready = code["state"] == "warm" and listed["@review"]["state"] == "warm"
            return ready and (digest is None or code["digest"] == digest)

        wait_until(warm, what="templates warm")

    def metric(self, name, **labels):
        return self.bioproxy.metric(name, **labels)

    def tokens(self, text):
        answer = requests.post(self.llama.url + "/tokenize", json={"content": text}, timeout=10)
        return len(answer.json()["tokens"])

    def stop(self):
        if self.bioproxy:
            self.bioproxy.stop()
        self.llama.stop()


def started(setup):
    try:
        setup.llama.start().wait_ready()
        setup.start_bioproxy()
        setup.wait_warm()
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="module", params=[1, 2], ids=["np1", "np2"])
def setup(request, tmp_path_factory):
    yield from started(Setup(tmp_path_factory.mktemp(f"np{request.param}"), request.param))


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """One slot whose results do not depend on how a prompt is split into batches.

    llama.cpp's CPU kernels round differently for different batch sizes, so at its
    default batch size a prompt evaluated in two parts (a cached prefix, then the rest)
    can give another answer at temperature 0 than the same prompt evaluated at once:
    measured with llama-server alone, no bioproxy involved. With -ub 1 every token is
    evaluated alone on both paths, which isolates what bioproxy sends.
    """
    yield from started(Setup(tmp_path_factory.mktemp("exact"), 1, ["-ub", "1"]))


def chat(content, **extra):
    return {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 32,
        **extra,
    }


def ask(setup, prefix, question=QUESTION):
    answer = requests.post(
        setup.bioproxy.proxy_url + "/v1/chat/completions",
        json=chat(f"{prefix} {question}"),
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return answer


def assert_warm(setup, answer, prefix="@code", question=QUESTION):
    """Only the message and the text after it were evaluated."""
    after = setup.template(prefix).pieces[1]
    limit = setup.tokens(question) + setup.tokens(after) + 16
    timings = answer.json()["timings"]
    assert timings["prompt_n"] <= limit, timings
    assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored")


def test_the_first_templated_request_evaluates_only_the_message(setup):
    answer = ask(setup, "@code")

    assert answer.headers["X-Bioproxy-Template"] == "@code"
    assert_warm(setup, answer)


def test_a_warm_answer_equals_the_uncached_answer(exact):
    for prefix in ("@code", "@review", "@code"):
        warm = ask(exact, prefix)
        expanded = exact.template(prefix).render(QUESTION)
        cold = requests.post(
            exact.llama.url + "/v1/chat/completions",
            json=chat(expanded, cache_prompt=False),
            timeout=120,
        ).json()

        assert cold["timings"]["cache_n"] == 0
        assert_warm(exact, warm, prefix)
        assert warm.json()["choices"][0]["message"] == cold["choices"][0]["message"]


def test_streamed_templated_requests_are_warm_and_counted(setup):
    before = setup.metric("bioproxy_prompt_tokens_reused_total", template="@review")
    with requests.post(
        setup.bioproxy.proxy_url + "/v1/chat/completions",
        json=chat("@review print(eval(input()))", stream=True),
        stream=True,
        timeout=120,
    ) as answer:
        assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored")
        events = read_events(answer)

    timings = json.loads(events[-2][1])["timings"]
    assert timings["cache_n"] > 200
    reused = setup.metric("bioproxy_prompt_tokens_reused_total", template="@review")
    assert reused - before == timings["cache_n"]


def test_a_template_outside_the_root_is_refused_and_never_sent(setup):
    answer = requests.post(
        setup.bioproxy.proxy_url + "/v1/chat/completions", json=chat("@bad hi"), timeout=10
    )

    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["code"] == "template_broken"
    assert "@bad" in error["message"] and "outside the template root" in error["message"]
    assert "TOP-SECRET" not in answer.text
    assert setup.listed()["@bad"]["state"] == "broken"
    assert "TOP-SECRET" not in requests.get(setup.llama.url + "/slots", timeout=5).text


@pytest.mark.parametrize("content", [7, {"text": "@code hi"}], ids=["number", "object"])
def test_content_neither_text_nor_parts_goes_untouched_to_llama_server_which_refuses_it(
    setup, content
):
    answer = requests.post(
        setup.bioproxy.proxy_url + "/v1/chat/completions", json=chat(content), timeout=30
    )

    # Not a templated request: llama-server's own OpenAI-style 400 comes back unchanged.
    assert answer.status_code == 400
    assert "X-Bioproxy-Template" not in answer.headers
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and "content" in error["message"]


def test_the_process_environment_is_refused_and_never_sent(llama, tmp_path):
    # A value only bioproxy's environment holds, so only /proc/self/environ could leak it.
    canary = "CANARY-" + os.urandom(8).hex()
    folder = tmp_path / "templates"
    folder.mkdir()
    # Include paths are relative to the config file's folder, tmp_path.
    (folder / "ok.txt").write_text("<{templates/marker.txt}>\n<{message}>")
    (folder / "marker.txt").write_text("INCLUDED-MARKER")
    environ = {
        "@absolute": "/proc/self/environ",
        "@relative": "../" * len(tmp_path.parts) + "proc/self/environ",
        "@symlink": "templates/environ.txt",
    }
    os.symlink("/proc/self/environ", folder / "environ.txt")
    for prefix, include in environ.items():
        (folder / f"{prefix[1:]}.txt").write_text(f"Env: <{{{include}}}>\n<{{message}}>")
    config = {
        "prefixes": {p: f"templates/{p[1:]}.txt" for p in ["@ok", *environ]},
        "warmup_check_interval": 0.5,
        "template_root": "templates",
    }
    # Between bioproxy and llama-server: records every byte llama-server gets.
    recorder = FaultProxy(llama.port)
    server = Bioproxy(recorder.url, tmp_path, config)
    server.env["LEAK_CANARY"] = canary
    try:
        with server:
            # The canary is there to be leaked: gunicorn's environment, which its worker
            # inherits, holds it.
            with open(f"/proc/{server.process.pid}/environ", "rb") as f:
                assert f"LEAK_CANARY={canary}".encode() in f.read()
            # The recording is complete enough to catch a template's text once warmed.
            wait_until(lambda: server.templates()["@ok"]["state"] == "warm", 120, "@ok warm")
            for prefix, include in environ.items():
                answer = requests.post(
                    server.proxy_url + "/v1/chat/completions", json=chat(f"{prefix} hi"), timeout=10
                )

                assert answer.status_code == 500, answer.text
                error = answer.json()["error"]
                assert error["code"] == "template_broken"
                assert prefix in error["message"]
                assert f"include {include} resolves outside the template root" in error["message"]
                assert canary not in answer.text
            listed = server.templates()
            assert all(listed[prefix]["state"] == "broken" for prefix in environ)
            assert canary not in json.dumps(listed)
            assert canary not in server.log()
    finally:
        recorder.close()
    received = recorder.received()
    assert b"INCLUDED-MARKER" in received
    assert canary.encode() not in received
    # Not even another variable of the environment: its usual first ones.
    assert b"PATH=" not in received and b"HOME=" not in received


def test_an_edited_template_is_warmed_again(setup):
    path = setup.folder / "bioproxy" / "templates" / "code.txt"
    old_file = setup.listed()["@code"]["saved_file"]
    path.write_text("Answer in one short paragraph.\n\n" + path.read_text())
    digest = setup.template("@code").digest

    setup.wait_warm(digest)
    answer = ask(setup, "@code")

    assert_warm(setup, answer)
    assert setup.listed()["@code"]["saved_file"] != old_file
    assert not (Path(setup.llama.slot_save_path) / old_file).exists()


def test_a_restarted_llama_server_is_warm_again_without_a_request(setup):
    restores = setup.metric("bioproxy_slot_restores_total", template="@code", outcome="ok")
    setup.llama.stop()
    setup.llama.start().wait_ready()

    wait_until(
        lambda: (
            setup.metric("bioproxy_slot_restores_total", template="@code", outcome="ok") > restores
        ),
        what="@code restored after the restart",
    )
    # With one slot for two templates, @code may have to come back from its file.
    assert_warm(setup, ask(setup, "@code"))


def test_a_restarted_bioproxy_restores_instead_of_warming_again(setup):
    setup.bioproxy.stop()
    setup.start_bioproxy()

    setup.wait_warm()

    assert setup.metric("bioproxy_warmups_total", template="@code", outcome="ok") == 0
    assert setup.metric("bioproxy_slot_restores_total", template="@code", outcome="ok") >= 1
    assert_warm(setup, ask(setup, "@code"))
