"""bioproxy and nginx run for real on free loopback ports: for the tests and the benchmarks.

In the package, not in tests/, so that a benchmark need not import the tests.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from .config import template_file
from .llamacpp import LlamaServer, free_port
from .templates import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# llama-server as its users start it: the flags after `llama-server -m MODEL --host H
# --port P`, and whether it gets a --slot-save-path folder (issue 11). --no-kv-unified
# alone changes nothing in llama.cpp b11434 (automatic slots turn the unified cache on):
# it is tried with -np, as users who want it write it.
BACKEND_KEY = "llama-secret"
USERS_CONFIGS = {
    "defaults": ([], False),
    "slot-save-path": ([], True),
    **{f"np{n}": (["-np", str(n)], False) for n in range(1, 9)},
    "np2-slot-save-path": (["-np", "2"], True),
    "cache-ram-0": (["--cache-ram", "0"], False),
    "np1-cache-ram-0-slot-save-path": (["-np", "1", "--cache-ram", "0"], True),
    "np2-kv-unified": (["-np", "2", "--kv-unified"], False),
    "np4-no-kv-unified": (["-np", "4", "--no-kv-unified"], False),
    "no-cache-idle-slots": (["--no-cache-idle-slots"], False),
    "api-key": (["--api-key", BACKEND_KEY], True),
}

# Templated (the example templates: @code ~900 tokens, @review ~270) and plain requests
# in turn.
MIXED_SEQUENCE = [
    "@code How do I reverse a list?",
    "What is the capital of France?",
    "@review def f(x): return x*2",
    "@code How do I sort a dict by value?",
    "Name three colours.",
    "@code What does zip do?",
    "@review for i in range(len(xs)): print(xs[i])",
]


def users_llama(folder, args, slot_folder=None):
    """A llama-server started as its users start it, with these flags (its log in folder)."""
    return LlamaServer(
        free_port(),
        defaults=True,
        slot_save_path=str(slot_folder) if slot_folder else None,
        log_path=os.path.join(folder, "llama-server.log"),
        extra_args=args,
    )


def examples_workdir(folder, slot_folder=None, **keys):
    """folder/bioproxy holding the example templates, and their config (checked every
    second, slot_folder as its slot_save_path, plus keys) for a Bioproxy to write there."""
    work = os.path.join(folder, "bioproxy")
    shutil.copytree(EXAMPLES, work)
    with open(os.path.join(work, "config.json")) as f:
        config = {**json.load(f), "warmup_check_interval": 1, **keys}
    if slot_folder:
        config["slot_save_path"] = str(slot_folder)
    return work, config


def expanded(workdir, text):
    """A user's text as its template expands it (the config in workdir), or as it is."""
    prefix, _, words = text.partition(" ")
    with open(os.path.join(workdir, "config.json")) as f:
        prefixes = json.load(f)["prefixes"]
    if prefix not in prefixes:
        return text
    path, _ = template_file(prefixes[prefix])
    return load(prefix, path, str(workdir), str(workdir), 1 << 20).render(words)


def wait_until(check, timeout=120, what="condition", describe=lambda: "", every=0.2):
    """check()'s first true value, asked every `every` s; AssertionError after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; {describe()}")


def wait_answering(process, url, timeout, name, log):
    """Until url answers at all; RuntimeError with log() if the gunicorn process exits
    first or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{log()}")
        try:
            requests.get(url, timeout=5)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {timeout:g} s:\n{log()}")


def stop_process(process, timeout):
    """SIGTERM, then SIGKILL after timeout seconds (nothing if not started or ended)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Bioproxy:
    """bioproxy under real gunicorn with its gevent worker, configured by BIOPROXY_* variables."""

    def __init__(self, backend_url, workdir, config=None, **settings):
        """backend_url: llama-server's, or None when the config lists its backends."""
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.log_path = os.path.join(workdir, "gunicorn.log")
        config_path = os.path.join(workdir, "config.json")
        with open(config_path, "w") as f:
            json.dump(config or {}, f)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BIOPROXY_")}
        settings = {
            **({"backend_url": backend_url} if backend_url else {}),
            "proxy_port": self.proxy_port,
            "admin_port": self.admin_port,
            "state_dir": os.path.join(workdir, "state"),
            **settings,
        }
        self.env["BIOPROXY_CONFIG"] = config_path
        for key, value in settings.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            self.env["BIOPROXY_" + key.upper()] = text
        self.process = None

    @property
    def proxy_url(self):
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self):
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_ready(self, timeout=30.0):
        """Wait until the admin port answers (whatever llama.cpp's state)."""
        wait_answering(self.process, self.admin_url + "/health", timeout, "bioproxy", self.log)
        return self

    def stop(self, timeout=15.0):
        stop_process(self.process, timeout)

    def templates(self):
        """The admin port's /templates, by prefix."""
        answer = requests.get(self.admin_url + "/templates", timeout=10).json()
        return {t["prefix"]: t for t in answer["templates"]}

    def metric(self, name, **labels):
        """The sum of a metric's samples whose labels include the given ones (0 if none)."""
        text = requests.get(self.admin_url + "/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def all_warm(self):
        """Whether every template is warm, per the admin port's /templates."""
        return all(t["state"] == "warm" for t in self.templates().values())

    def settled(self):
        """Whether the queue is empty and every slot idle, per the admin port's /status.

        A response's slot is given back when the server closes it, a moment after the
        client has read the last byte: wait for this rather than assert it at once.
        """
        status = requests.get(self.admin_url + "/status", timeout=5).json()
        return not status["queue"] and all(s["state"] == "idle" for s in status["slots"])

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


class Nginx:
    """Debian's nginx in the foreground, with the caller's `http {}` content, as root or not."""

    def __init__(self, workdir, http_config):
        self.workdir = str(workdir)
        self.conf_path = os.path.join(self.workdir, "nginx.conf")
        temp = os.path.join(self.workdir, "temp")
        os.makedirs(temp, exist_ok=True)
        temp_paths = "\n".join(
            f"    {kind}_temp_path {temp}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        with open(self.conf_path, "w") as f:
            f.write(
                f"worker_processes 1;\n"
                f"daemon off;\n"
                f"pid {self.workdir}/nginx.pid;\n"
                f"error_log {self.workdir}/error.log warn;\n"
                f"events {{ worker_connections 1024; }}\n"
                f"http {{\n{temp_paths}\n    access_log off;\n{http_config}\n}}\n"
            )
        self.process = None

    @staticmethod
    def binary():
        path = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(path, os.X_OK):
            raise RuntimeError("nginx is not installed: run scripts/setup --bench")
        return path

    def start(self, port):
        self.process = subprocess.Popen(
            [
                self.binary(),
                "-p",
                self.workdir,
                "-e",
                os.path.join(self.workdir, "error.log"),
                "-c",
                self.conf_path,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx not listening on {port}:\n{self.error_log()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def error_log(self):
        try:
            with open(os.path.join(self.workdir, "error.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""
