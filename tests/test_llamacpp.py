"""A local llama-server that fails to start is reported at once, with its cause.

The llama-server here is a shell script standing in for a broken build: it writes a few
log lines and ends the way a real one did (a signal, or an exit with an error).
"""

import os
import subprocess
import sys
import textwrap
import types

import pytest

from bioproxy import cli, llamacpp
from tests.servers import ROOT, free_port


def fake_binary(folder, body):
    path = folder / "llama-server"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


CRASHES = """\
    echo "main: loading model"
    echo "llama threadpool init, n_threads = 2"
    kill -SEGV $$
"""


def fake_model(monkeypatch, folder):
    model = folder / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "model_path", lambda: str(model))


@pytest.fixture
def server(tmp_path, monkeypatch):
    fake_model(monkeypatch, tmp_path)
    log = tmp_path / "llama-server.log"
    log.write_text("an earlier run's line\n" * 30)

    def make(body):
        return llamacpp.LlamaServer(
            free_port(), log_path=str(log), binary=fake_binary(tmp_path, body)
        )

    return make


def test_a_crash_at_start_up_names_the_signal_this_runs_log_and_what_to_try(server):
    crashing = server(CRASHES).start()
    with pytest.raises(llamacpp.LlamaServerError) as caught:
        crashing.wait_ready(timeout=60)
    message = str(caught.value)
    first = message.splitlines()[0]
    assert first.startswith("llama-server exited with signal SIGSEGV (-11)")
    assert crashing.binary in first
    assert "LLAMA_ARG_REPACK=0" in first
    assert "llama threadpool init" in message
    assert "an earlier run's line" not in message
    assert crashing.log_path in message


def test_a_port_already_taken_says_how_to_choose_another(server):
    taken = server("""\
        echo "couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8081"
        exit 1
    """).start()
    with pytest.raises(llamacpp.LlamaServerError) as caught:
        taken.wait_ready(timeout=60)
    first = str(caught.value).splitlines()[0]
    assert first.startswith("llama-server exited with exit status 1")
    assert "--llama-port" in first


def test_a_server_that_never_answers_is_reported_after_the_timeout(server):
    silent = server("exec sleep 60\n").start()
    try:
        with pytest.raises(llamacpp.LlamaServerError, match=r"was not ready after 0.5 s"):
            silent.wait_ready(timeout=0.5)
    finally:
        silent.kill()


def test_the_run_command_stops_with_the_crash_in_one_line(tmp_path, monkeypatch, capsys):
    fake_model(monkeypatch, tmp_path)
    binary = fake_binary(tmp_path, CRASHES)
    monkeypatch.setattr(llamacpp, "binary_path", lambda: binary)
    monkeypatch.setenv("BIOPROXY_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(SystemExit) as caught:
        cli.main(["--llama-port", str(free_port())])
    first = str(caught.value.code).splitlines()[0]
    assert first.startswith("bioproxy: llama-server exited with signal SIGSEGV")
    assert "last lines of its log" in str(caught.value.code)


def test_llama_port_with_a_configured_backend_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("BIOPROXY_BACKEND_URL", "http://127.0.0.1:9")
    with pytest.raises(SystemExit, match="--llama-port is the port of the local llama-server"):
        cli.main(["--llama-port", "9000"])


class DiesLater:
    """A local backend that is running at first and then has crashed."""

    def __init__(self):
        self.checks = 0
        self.stopped = False

    def check_running(self):
        self.checks += 1
        if self.checks > 1:
            raise llamacpp.LlamaServerError("llama-server exited with signal SIGSEGV (-11)")

    def stop(self):
        self.stopped = True


def test_a_local_backend_that_dies_later_stops_bioproxy_with_its_cause(monkeypatch, capsys):
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(cli, "gunicorn_command", lambda: command)
    backend = DiesLater()
    assert cli.run_beside(backend) == 1
    assert backend.stopped
    assert "bioproxy: the local llama-server exited with signal SIGSEGV" in capsys.readouterr().err


def test_describe_exit():
    assert llamacpp.describe_exit(0) == "exit status 0"
    assert llamacpp.describe_exit(-4) == "signal SIGILL (-4)"
    assert llamacpp.describe_exit(-200) == "signal 200"


def test_integration_tests_stop_at_once_with_the_cause_when_llama_server_cannot_run(tmp_path):
    # The whole integration suite, with a llama-server that crashes as the native build
    # did on an Intel Xeon with AMX: one cause, not an error at every fixture.
    environ = {**os.environ, "BIOPROXY_LLAMA_SERVER": fake_binary(tmp_path, CRASHES)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "no integration test can run: llama-server exited with signal SIGSEGV" in run.stdout
    assert " passed" not in run.stdout and " error" not in run.stdout, run.stdout[-2000:]


def test_a_warmup_llama_server_that_cannot_start_leaves_warmups_to_the_serving_one(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("BIOPROXY_WARMUP_BACKEND_URL", raising=False)
    serving = llamacpp.LlamaServer(
        free_port(),
        slot_save_path=str(tmp_path / "slots"),
        log_path=str(tmp_path / "llama-server.log"),
        binary=fake_binary(tmp_path, CRASHES),
    )
    assert cli.start_evaluator(serving) is None
    assert "not started (llama-server exited with signal SIGSEGV" in capsys.readouterr().out
    assert "BIOPROXY_WARMUP_BACKEND_URL" not in os.environ


def started_servers(monkeypatch):
    """LlamaServer.start and wait_ready faked: the servers started, in order."""
    started = []

    def start(self):
        started.append(self)
        self.process = types.SimpleNamespace(pid=4242)
        return self

    monkeypatch.setattr(llamacpp.LlamaServer, "start", start)
    monkeypatch.setattr(llamacpp.LlamaServer, "wait_ready", lambda self: self)
    return started


def test_the_local_llama_server_is_started_without_a_ram_cache(tmp_path, monkeypatch):
    started = started_servers(monkeypatch)
    monkeypatch.delenv("BIOPROXY_SLOT_SAVE_PATH", raising=False)
    port = free_port()
    settings = types.SimpleNamespace(
        backend_url=f"http://127.0.0.1:{port}", paths=types.SimpleNamespace(state_dir=str(tmp_path))
    )
    server = cli.start_local_backend(settings)
    assert started == [server]
    command = server.command()
    # Its warmups are evaluated beside it, and its copies of idle slots served nobody.
    assert command[command.index("--cache-ram") + 1] == "0"
    assert command[command.index("--port") + 1] == str(port)
    assert os.environ.pop("BIOPROXY_SLOT_SAVE_PATH") == server.slot_save_path


def test_the_warmup_llama_server_is_started_as_the_serving_one_at_nice_19(tmp_path, monkeypatch):
    serving = llamacpp.LlamaServer(
        free_port(), slots=3, context=999, slot_save_path=str(tmp_path / "slots"), ram_cache=False
    )
    started = started_servers(monkeypatch)
    monkeypatch.delenv("BIOPROXY_WARMUP_BACKEND_URL", raising=False)
    monkeypatch.delenv("BIOPROXY_WARMUP_BACKEND_PID", raising=False)
    evaluator = cli.start_evaluator(serving)
    assert started == [evaluator]
    assert evaluator.nice == 19 and evaluator.port != serving.port
    same = [a for a in evaluator.command() if a != str(evaluator.port)]
    assert same == [a for a in serving.command() if a != str(serving.port)]
    assert "--cache-ram" in same
    assert os.environ.pop("BIOPROXY_WARMUP_BACKEND_URL") == evaluator.url
    assert os.environ.pop("BIOPROXY_WARMUP_BACKEND_PID") == "4242"  # stopped for users
