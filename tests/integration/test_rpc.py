"""bioproxy in front of a llama-server whose model runs on llama.cpp's RPC workers (issue 15).

A model too big for one machine is served by one llama-server started with --rpc, listing
the ggml-rpc-server workers that hold its layers. To bioproxy that is one llama-server
like any other: nothing new is needed, and this test shows it. One worker on loopback
holds every layer and the KV cache (-ngl 99), so the warmups, the saves and the restores
bioproxy asks for move the KV cache over the RPC connection; the answers are still
llama-server's own to the expanded prompt.
"""

import os
import re
import socket
import subprocess
from contextlib import contextmanager

from bioproxy.llamacpp import binary_path
from bioproxy.testing import examples_workdir, expanded, stop_process, users_llama
from tests.integration.test_llama_configs import chat_body, post, same_answer
from tests.servers import Bioproxy, free_port, wait_until


def worker_binary():
    path = os.path.join(os.path.dirname(binary_path()), "ggml-rpc-server")
    assert os.access(path, os.X_OK), (
        f"{path} is missing: llama.cpp was built without -DGGML_RPC=ON (scripts/setup builds it so)"
    )
    return path


@contextmanager
def rpc_worker(folder):
    """A ggml-rpc-server on a free loopback port: its "host:port" for llama-server's --rpc."""
    port = free_port()
    log_path = os.path.join(folder, "rpc-worker.log")
    with open(log_path, "w") as log:
        command = [worker_binary(), "--host", "127.0.0.1", "--port", str(port), "--threads", "2"]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:

        def listening():
            # It prints its endpoint only once it exits (stdout to a file is buffered): a
            # connection it accepts tells instead, and one that sends nothing it closes.
            assert process.poll() is None, open_log()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        def open_log():
            with open(log_path, errors="replace") as f:
                return f.read()

        wait_until(listening, timeout=30, what="ggml-rpc-server listening")
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process, 10)


def test_a_llama_server_on_rpc_workers_is_fronted_as_any_other(tmp_path):
    slots = tmp_path / "slots"
    work, config = examples_workdir(tmp_path, slots)
    texts = [
        "@code How do I reverse a list?",
        "What is the capital of France?",
        "@review def f(x): return x*2",
        "@code What does zip do?",
    ]
    with (
        rpc_worker(tmp_path) as worker,
        # -lv 4: its log then says where the layers and the KV cache went.
        users_llama(tmp_path, ["--rpc", worker, "-ngl", "99", "-lv", "4"], slots) as llama,
        Bioproxy(llama.url, work, config) as bp,
    ):
        wait_until(bp.all_warm, what="every template warm", describe=lambda: bp.log()[-3000:])
        answers = [post(bp.proxy_url, chat_body(text)) for text in texts]
        last = texts[-1]
        uncached = post(llama.url, chat_body(expanded(work, last), cache_prompt=False)).json()
        saved = [f for f in os.listdir(slots) if f.endswith(".bin")]
        templates = bp.templates()
        with open(llama.log_path, errors="replace") as f:
            llama_log = f.read()
        access = [line for line in bp.log().splitlines() if "template=@" in line]

    brief = [(a.headers.get("X-Bioproxy-Cache"), a.json()["timings"]) for a in answers]
    print(*brief, *access, sep="\n")  # pytest -s: the figures in docs/RELIABILITY.md
    # The model and its KV cache are on the worker, not in llama-server's own memory.
    assert re.search(r"offloaded (\d+)/\1 layers", llama_log), llama_log[:5000]
    assert re.search(r"RPC0\[127\.0\.0\.1:\d+\] KV buffer size", llama_log), llama_log[:5000]
    assert len(saved) == 2, saved  # @code and @review, saved from the worker's KV cache
    assert all(t["state"] == "warm" for t in templates.values()), templates
    for text, answer in zip(texts, answers, strict=True):
        assert answer.json()["choices"][0]["message"]["content"], text
        if not text.startswith("@"):
            continue
        timings = answer.json()["timings"]
        assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored", "server"), text
        # Only the user's words evaluated: the template came back from the worker's KV.
        assert timings["cache_n"] > 200 and timings["prompt_n"] < 40, (text, timings)
    assert same_answer(answers[-1].json(), uncached), (answers[-1].json(), uncached)
