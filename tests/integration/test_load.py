"""Load and soak on one gunicorn worker, against a fast fake llama-server.

The fake streams quickly so that bioproxy, not the model, is what is measured: 200 clients
at once, then thousands of requests with aborted streams among them, after which the
worker's open files, greenlets and memory must come back to where they were.
"""

import contextlib
import json
import os
import re
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.servers import Bioproxy, JSONHandler, resident_kib, serve_http, wait_until

SLOTS = 8


class FastLlama(JSONHandler):
    """Enough of llama-server for bioproxy: its slots, and chat streams that echo the client.

    Each event carries the client's message, so an answer sent to the wrong client shows.
    A client named "abort-..." gets a long stream, so that it leaves in the middle of it.
    """

    protocol_version = "HTTP/1.1"
    events = 20

    def do_GET(self):
        if self.path == "/props":
            self.send_json({"total_slots": SLOTS, "model_path": "fake.gguf", "build_info": "fake"})
        elif self.path == "/slots":
            self.send_json(
                [
                    {"id": i, "id_task": -1, "is_processing": False, "n_ctx": 4096}
                    for i in range(SLOTS)
                ]
            )
        else:
            self.send_json({"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        who = body["messages"][-1]["content"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            # A stream its client leaves goes on until bioproxy stops reading it.
            for n in range(1000 if who.startswith("abort-") else self.events):
                event = {
                    "choices": [{"delta": {"content": f"{who}#{n} "}}],
                    "slot": body["id_slot"],
                }
                self.chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                time.sleep(0.001)
            self.chunk(b"data: [DONE]\n\n")
            self.chunk(b"")
        except OSError:
            pass  # bioproxy closed: its client left

    def handle(self):
        # bioproxy resets a connection whose answer it stopped reading (a client left).
        with contextlib.suppress(ConnectionResetError):
            super().handle()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


@pytest.fixture(scope="module")
def llama():
    server = serve_http(FastLlama, backlog=512)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def proxy(llama, tmp_path_factory):
    config = {"queue_max_length": 1000, "warmup_check_interval": 0.5}
    with Bioproxy(llama.url, tmp_path_factory.mktemp("load"), config) as proxy:
        wait_until(
            lambda: requests.get(proxy.admin_url + "/status", timeout=5).json()["slots"],
            timeout=10,
            what="bioproxy to know the slots",
        )
        yield proxy


def chat(url, who, session=None):
    body = {"messages": [{"role": "user", "content": who}], "stream": True}
    return (session or requests).post(
        url + "/v1/chat/completions", json=body, stream=True, timeout=60
    )


def events_of(answer):
    return [line[6:] for line in answer.iter_lines() if line.startswith(b"data: ")]


def test_200_concurrent_streams_all_complete_and_none_is_mixed_up(proxy):
    def client(i):
        who = f"client-{i:03d}"
        with chat(proxy.proxy_url, who) as answer:
            assert answer.status_code == 200
            events = events_of(answer)
        assert events[-1] == b"[DONE]"
        contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
        assert contents == [f"{who}#{n} " for n in range(FastLlama.events)]
        return {json.loads(e)["slot"] for e in events[:-1]}

    with ThreadPoolExecutor(200) as pool:
        slots = list(pool.map(client, range(200)))

    assert all(len(used) == 1 for used in slots)  # each stream came from one slot
    wait_until(proxy.settled, timeout=5, what="every slot idle, the queue empty")
    assert proxy.metric("bioproxy_queue_wait_seconds_count") >= 200


def worker_pid(proxy):
    children = f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children"
    with open(children) as f:
        (pid,) = f.read().split()
    return int(pid)


def files_of(pid, ports):
    """The worker's open files counted by kind, a TCP socket by the port it is at or to
    (ports: a name for each port of interest): what a leak is made of."""
    peers = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                name = ports.get(remote, ports.get(local, "other"))
                peers[fields[9]] = f"tcp {name}"
    kinds = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while listed
        inode = re.fullmatch(r"socket:\[(\d+)\]", target)
        kinds[peers.get(inode[1], "socket") if inode else re.sub(r"\d+", "N", target)] += 1
    return dict(kinds)


def not_pooled(files):
    return sum(n for kind, n in files.items() if kind != "tcp llama")


def abort_mid_stream(url, who):
    """Read the first chunk of a stream, then hang up."""
    body = json.dumps({"messages": [{"role": "user", "content": who}], "stream": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert client.recv(4096).startswith(b"HTTP/1.1 200")


def test_10000_requests_with_1000_aborted_leave_no_files_or_memory_behind(proxy, llama):
    FastLlama.events = 3
    pid = worker_pid(proxy)
    ports = {int(proxy.proxy_url.rsplit(":", 1)[1]): "client", llama.server_address[1]: "llama"}

    def round_of(n, start):
        def one(i):
            if i % 10 == 0:
                abort_mid_stream(proxy.proxy_url, f"abort-{i}")
                return True
            with requests.Session() as session, chat(proxy.proxy_url, f"c-{i}", session) as answer:
                return events_of(answer)[-1] == b"[DONE]"

        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, range(start, start + n)))

    try:
        assert all(round_of(1000, 0))  # warm: pools, caches and buffers reach their size
        time.sleep(1)
        memory, before = resident_kib(pid), files_of(pid, ports)
        greenlets = proxy.metric("bioproxy_greenlets")

        started = time.monotonic()
        assert all(round_of(9000, 1000))
        seconds = time.monotonic() - started

        # Connections to llama.cpp kept for reuse are as many as were once needed at the
        # same time: a few more or fewer from one round to the next, never more than what
        # the slots and bioproxy's own calls use at once. A leaked one would pile up.
        def closed():
            now = files_of(pid, ports)
            return (
                now.get("tcp llama", 0) <= SLOTS + 4 and not_pooled(now) <= not_pooled(before) + 2
            )

        wait_until(
            closed,
            timeout=10,
            what=f"files closed (were {before})",
            describe=lambda: f"now {files_of(pid, ports)}",
        )
    finally:
        FastLlama.events = 20
    grown = resident_kib(pid) - memory
    # Connections the clients closed end their greenlets a moment later.
    wait_until(
        lambda: proxy.metric("bioproxy_greenlets") <= greenlets + 2,
        timeout=10,
        what=f"greenlets back to {greenlets:g}",
    )
    print(
        f"9,000 requests (900 aborted) in {seconds:.1f} s; worker files {before} -> "
        f"{files_of(pid, ports)}, memory {memory} KiB -> {memory + grown} KiB, greenlets "
        f"{greenlets:g} -> {proxy.metric('bioproxy_greenlets'):g}"
    )
    # Bound: 16 MiB, for allocator slack; a leak of even 2 KiB per request would be 18 MiB.
    assert grown < 16 * 1024, f"worker memory grew by {grown} KiB over 9,000 requests"
    wait_until(proxy.settled, timeout=5, what="every slot idle, the queue empty")
    assert proxy.metric("bioproxy_requests_in_flight") == 0
