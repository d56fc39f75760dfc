"""Where bioproxy's worker spends its CPU on the warm path: GET /health and a streamed answer.

bioproxy runs as it does in production (gunicorn, one gevent worker, default settings,
access log on) before a real llama-server (-np 2). py-spy samples the worker while
load runs through it: wrk at one connection for GET /health, then streamed chat
completions of 4 tokens one after another. Only samples where the worker is on the CPU
count (py-spy leaves idle ones out). Two tables per path: the share of its samples by
the package or stdlib module whose code was running (the innermost frame), and the share
of samples in which a few named steps of the request are on the stack (a step includes
what it calls; lines starting with "-" are parts of the step above them).

Run:    .venv/bin/python -m bench.profile [--seconds 15] [--rate 500]
Needs py-spy (requirements-dev.txt; reading another process's memory is allowed to its
parent and to root, so it starts bioproxy itself) and wrk (scripts/setup --bench).
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

import requests

from bench.proxy_overhead import machine, table
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import Bioproxy, free_port


def on(frames, *parts):
    """Whether a frame on the stack holds every one of parts ("Class.function (path:line)")."""
    return any(all(part in frame for part in parts) for frame in frames)


# Steps of a request, each a test of a stack; a step includes what it calls.
STEPS = (
    (
        "gunicorn: read and parse the request",
        lambda f: on(f, "(gunicorn/http/message.py") or on(f, "(gunicorn/http/unreader.py"),
    ),
    (
        "flask/werkzeug outside the view (context, routing, hooks)",
        lambda f: on(f, "(flask/app.py") and not on(f, "Flask.dispatch_request"),
    ),
    ("the view, proxy.forward(), all of it", lambda f: on(f, "forward (bioproxy/proxy.py")),
    ("- its requests/urllib3 call to llama-server", lambda f: on(f, "HTTPAdapter.send")),
    (
        "- in that, http.client reading the answer's headers",
        lambda f: on(f, "HTTPAdapter.send") and on(f, "(http/client.py"),
    ),
    ("- its answer body's first chunk", lambda f: on(f, "AnswerBody.start")),
    ("prometheus-flask-exporter's hooks", lambda f: on(f, "(prometheus_flask_exporter/")),
    ("the access line and counters (proxy.done)", lambda f: on(f, "done (bioproxy/proxy.py")),
    ("gunicorn: write the response", lambda f: on(f, "(gunicorn/http/wsgi.py", "write")),
    ("outside any request (gevent's hub and loop)", lambda f: not on(f, "handle_request")),
)


def package(frame):
    """The top-level package (or stdlib module) of a frame's file."""
    path = frame.rpartition("(")[2]
    top = path.split("/")[0].split(":")[0]
    return top.removesuffix(".py") or "?"


def read_profile(path):
    """[(frames outermost first, samples)] from py-spy's raw (collapsed) output."""
    stacks = []
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks):
    total = sum(n for _, n in stacks) or 1
    by_package = collections.Counter()
    by_step = collections.Counter()
    for frames, n in stacks:
        by_package[package(frames[-1])] += n
        for step, test in STEPS:
            if test(frames):
                by_step[step] += n
    packages = [[name, f"{100 * n / total:.1f}"] for name, n in by_package.most_common(10)]
    steps = [[step, f"{100 * by_step[step] / total:.1f}"] for step, _ in STEPS]
    return total, packages, steps


def worker_pid(master):
    """The gunicorn worker's pid: the master's one child."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{master}/task/{master}/children") as f:
            children = f.read().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


def py_spy():
    """py-spy's command: on PATH, or beside this Python (a virtualenv not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return shutil.which("py-spy") or (beside if os.path.exists(beside) else None)


def record(pid, seconds, rate, output):
    """py-spy sampling the worker for seconds, in the background."""
    return subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",  # not pausing the worker at each sample
            "--output",
            output,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def streamed(url, until):
    """Streamed chat completions one after another until the monotonic clock reads until."""
    body = {
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "stream": True,
    }
    count = 0
    while time.monotonic() < until:
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
            r.raise_for_status()
            for _ in r.iter_content(chunk_size=None):
                pass
        count += 1
    return count


def profile(name, pid, seconds, rate, folder, load):
    """Sample the worker while load(seconds) runs; its summary and what the load did."""
    output = os.path.join(folder, f"{name}.txt")
    spy = record(pid, seconds, rate, output)
    time.sleep(0.5)  # attached before the load starts
    done = load(seconds)
    _, errors = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {errors}")
    return summarize(read_profile(output)), done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=500, help="samples a second")
    parser.add_argument("--keep", help="a folder to keep py-spy's raw stacks in")
    args = parser.parse_args()
    if py_spy() is None or shutil.which("wrk") is None:
        sys.exit("bench.profile needs py-spy and wrk (see this module's docstring)")
    print(f"Machine: {machine()}\n")
    with tempfile.TemporaryDirectory(prefix="bioproxy-profile-") as folder:
        llama = LlamaServer(free_port(), log_path=os.path.join(folder, "llama.log"))
        with llama, Bioproxy(llama.url, folder) as proxy:
            pid = worker_pid(proxy.process.pid)
            url = proxy.proxy_url

            def health(seconds):
                command = ["wrk", "-t1", "-c1", f"-d{seconds}s", url + "/health"]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                line = next(x for x in out.stdout.splitlines() if "Requests/sec" in x)
                return line.split()[-1] + " requests/s"

            def stream(seconds):
                answers = streamed(url, time.monotonic() + seconds)
                return f"{answers / seconds:.1f} answers/s"

            for name, load in (("GET /health", health), ("streamed, 4 tokens", stream)):
                (total, packages, steps), done = profile(
                    name.split()[0], pid, args.seconds, args.rate, args.keep or folder, load
                )
                print(f"{name}: {done}, {total} samples on the CPU\n")
                print(table(["package running", "% of samples"], packages) + "\n")
                print(table(["step on the stack", "% of samples"], steps) + "\n")


if __name__ == "__main__":
    main()
