"""Three llama-servers: bioproxy's routing against nginx round robin in front of them.

Six templates of about 1,000 tokens, three llama-servers started as users start them
(llama.cpp's defaults: slots automatic, a unified KV cache, idle slots cleared into its
RAM cache; plus --metrics for the counts and a slot folder for bioproxy's saved caches),
and a mixed load: clients sending at random moments (exponential gaps), one request in
five plain, the rest a question on one of the templates. The same schedule of requests
goes through nginx round robin (templates expanded by the client, as a client of
llama-server sends them) and through bioproxy (`@prefix question`), each against three
fresh llama-servers. Before it, every template has been evaluated once on every server:
through nginx by a request of each to each server, through bioproxy by its warmups.

Twice: with llama-server's default --cache-ram, where all six templates fit in each
server's RAM cache, and with --cache-ram small enough that they do not (standing in for
a model whose KV cache is large, or for many templates). Reported: time to first token
p50/p95, templated requests apart, and the prompt tokens the three servers evaluated.

--threads 1 starts each llama-server with one thread (-t 1). Three llama-servers of
llama.cpp's default threads (one a core) on one small machine spin at ggml's barriers
waiting for each other's cores, and a decoding step then takes seconds; with one thread
each they share the cores by time slices, the nearer stand-in for one llama-server a
machine, the case several backends are for.

Run:    .venv/bin/python -m bench.backends [--requests-per-client 8] [--clients 6]
            [--only LABEL] [--threads N]
"""

import argparse
import contextlib
import os
import tempfile
import time

import requests

from bench.proxy_overhead import machine, table
from bench.scheduling import (
    MEAN_GAP,
    PLAIN,
    PLAIN_SHARE,
    QUESTIONS,
    SMALL_CACHE_RAM,
    Mixed,
    percentile,
)
from bench.warmup import first_token
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import Bioproxy, Nginx, free_port

PROJECTS = ("orchard", "harbor", "quarry", "meadow", "lantern", "saddle")
SERVERS = 3
CACHE_RAM = {"default --cache-ram": None, f"--cache-ram {SMALL_CACHE_RAM}": SMALL_CACHE_RAM}


def prompt_tokens(url):
    """A llama-server's count of prompt tokens it evaluated (its --metrics)."""
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise RuntimeError(f"{url}/metrics has no llamacpp:prompt_tokens_total")


def nginx_round_robin(port, ports):
    servers = "".join(f" server 127.0.0.1:{p};" for p in ports)
    return f"""
    upstream llamas {{{servers} keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llamas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}"""


class Run(Mixed):
    """One schedule of requests, played through nginx and through bioproxy."""

    def __init__(self, folder, clients, per_client, threads=None, seed=13):
        super().__init__(folder, per_client, seed, projects=PROJECTS, clients=clients)
        self.threads = threads

    @contextlib.contextmanager
    def llamas(self, name, cache_ram):
        extra = ["--metrics"] + (["--cache-ram", str(cache_ram)] if cache_ram is not None else [])
        extra += ["--threads", str(self.threads)] if self.threads else []
        with contextlib.ExitStack() as stack:
            servers = []
            for i in range(SERVERS):
                server = LlamaServer(
                    free_port(),
                    defaults=True,
                    slot_save_path=os.path.join(self.folder, f"{name}-{i}", "slots"),
                    log_path=os.path.join(self.folder, f"{name}-{i}.log"),
                    extra_args=extra,
                )
                servers.append(stack.enter_context(server))
            yield servers

    def nginx(self, cache_ram):
        def content(prefix, question):
            return self.expanded(prefix, question) if prefix else PLAIN[len(question) % 4]

        with self.llamas("nginx", cache_ram) as servers:
            for server in servers:  # every template once on every server, as before
                for prefix in self.prefixes:
                    first_token(server.url, content(prefix, QUESTIONS[0]))
            port = free_port()
            site = nginx_round_robin(port, [s.port for s in servers])
            nginx = Nginx(os.path.join(self.folder, "nginx"), site)
            nginx.start(port)
            try:
                before = sum(prompt_tokens(s.url) for s in servers)
                results, _ = self.play(f"http://127.0.0.1:{port}", content)
                return results, sum(prompt_tokens(s.url) for s in servers) - before
            finally:
                nginx.stop()

    def bioproxy(self, cache_ram):
        def content(prefix, question):
            return f"{prefix} {question}" if prefix else PLAIN[len(question) % 4]

        with self.llamas("bioproxy", cache_ram) as servers:
            config = {
                "prefixes": self.prefixes,
                "warmup_check_interval": 0.5,
                "backends": [
                    {"url": s.url, "name": f"llama{i}", "slot_save_path": s.slot_save_path}
                    for i, s in enumerate(servers)
                ],
            }
            with Bioproxy(None, self.folder, config) as proxy:
                wait(lambda: all_warm(proxy), "templates warm on every backend")
                before = sum(prompt_tokens(s.url) for s in servers)
                results, _ = self.play(proxy.proxy_url, content)
                return results, sum(prompt_tokens(s.url) for s in servers) - before


def all_warm(proxy):
    """Every template warm on every backend, and each one's RAM cache measured where that
    is done (ram_cache.py): bioproxy's start-up, as the nginx servers' first requests."""
    status = requests.get(proxy.admin_url + "/status", timeout=10).json()
    return all(
        b["up"] and all(state == "warm" for state in b["templates"].values()) and measured(b)
        for b in status["backends"]
    )


def measured(backend):
    mode = backend["backend_mode"]
    unmeasured = mode["clears_idle_slots"] and mode["saves"]
    return not unmeasured or mode["ram_cache_keeps_templates"] is not None


def wait(check, what, timeout=900, step=0.5):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step)


def rows(label, results, evaluated):
    ok = [r for r in results if r[1] is not None]
    templated = [r[1] * 1e3 for r in ok if r[0] is not None]
    every = [r[1] * 1e3 for r in ok]
    return [
        label,
        len(results),
        len(results) - len(ok),
        f"{percentile(templated, 50):.0f}",
        f"{percentile(templated, 95):.0f}",
        f"{percentile(every, 50):.0f}",
        f"{percentile(every, 95):.0f}",
        f"{evaluated:,.0f}",
    ], percentile(templated, 95)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--only", choices=sorted(CACHE_RAM), action="append")
    parser.add_argument("--threads", type=int, help="each llama-server's -t (default: its own)")
    args = parser.parse_args()
    print(machine())
    threads = f", -t {args.threads}" if args.threads else ""
    print(
        f"{SERVERS} llama-servers (llama.cpp's defaults, --metrics, a slot folder{threads}), "
        f"{len(PROJECTS)} templates of ~1,000 tokens, {args.clients} clients x "
        f"{args.requests_per_client} requests, {PLAIN_SHARE:.0%} plain, mean gap {MEAN_GAP:g} s"
    )
    header = [
        "llama-servers / way",
        "requests",
        "errors",
        "templated p50 ms",
        "templated p95 ms",
        "all p50 ms",
        "all p95 ms",
        "prompt tokens evaluated",
    ]
    lines, ratios = [], []
    with tempfile.TemporaryDirectory() as folder:
        for label, cache_ram in CACHE_RAM.items():
            if args.only and label not in args.only:
                continue
            folder_run = os.path.join(folder, str(len(lines)))
            run = Run(folder_run, args.clients, args.requests_per_client, args.threads)
            nginx, nginx_p95 = rows(f"{label} / nginx round robin", *run.nginx(cache_ram))
            ours, our_p95 = rows(f"{label} / bioproxy", *run.bioproxy(cache_ram))
            lines += [nginx, ours]
            ratios.append((label, our_p95 / nginx_p95))
    print(table(header, lines))
    for label, ratio in ratios:
        print(f"{label}: bioproxy's templated p95 is {ratio:.2f}x nginx's (target: at most 0.3x)")


if __name__ == "__main__":
    main()
