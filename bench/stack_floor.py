"""The decided stack alone: what any proxy built on it costs before bioproxy's own code.

A pass-through with nothing but the stack bioproxy is built on: gunicorn with one gevent
worker, one Flask view that sends every request on with requests (pooled, streamed) and
hands the answer back as it comes, chunk by chunk. No templates, scheduler, checks,
metrics or access log; its answer's head goes out with the first chunk the view yields
(as a WSGI app's does), not held for llama.cpp's first token. Accepted connections get
TCP_NODELAY as bioproxy's do (bioproxy/worker.py), so Nagle's algorithm is not measured.

bench.proxy_overhead runs it as its fourth path: what it adds over llama-server alone is
the floor under bioproxy's figures on this machine.

Run by hand:  STACK_FLOOR_UPSTREAM=http://127.0.0.1:8081 .venv/bin/python -m gunicorn \
                  -c python:bench.stack_floor_gunicorn -b 127.0.0.1:8090 bench.stack_floor:app
"""

import os
import subprocess
import sys

import requests
from flask import Flask, Response, request

from bioproxy.testing import ROOT, free_port, stop_process, wait_answering

UPSTREAM = os.environ.get("STACK_FLOOR_UPSTREAM", "http://127.0.0.1:8081")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

app = Flask(__name__)
session = requests.Session()  # in the worker: gunicorn imports the app after patching


@app.route("/", defaults={"path": ""}, methods=METHODS)
@app.route("/<path:path>", methods=METHODS)
def forward(path):
    headers = {k: v for k, v in request.headers if k.lower() not in HOP_BY_HOP | {"host"}}
    answer = session.request(
        request.method,
        f"{UPSTREAM}/{path}",
        params=request.query_string,
        data=request.get_data(),
        headers=headers,
        stream=True,
        timeout=600,
    )
    passed = [(k, v) for k, v in answer.raw.headers.items() if k.lower() not in HOP_BY_HOP]
    return Response(answer.raw.stream(None, decode_content=False), answer.status_code, passed)


class StackFloor:
    """The pass-through under real gunicorn, in front of upstream_url."""

    def __init__(self, upstream_url, log_path):
        self.port = free_port()
        self.upstream_url = upstream_url
        self.log_path = log_path
        self.process = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        env = {**os.environ, "STACK_FLOOR_UPSTREAM": self.upstream_url}
        command = [sys.executable, "-m", "gunicorn", "-c", "python:bench.stack_floor_gunicorn"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "-b", f"127.0.0.1:{self.port}", "bench.stack_floor:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_answering(self.process, self.url + "/health", 30, "the stack floor", self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        stop_process(self.process, 15)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()
