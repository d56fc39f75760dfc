"""Scheduling under load: mixed traffic on shared slots, and a user arriving during a warmup.

1. Mixed workload. Four templates of about 1,000 tokens, llama-server with 2 slots, 8
   clients sending at random moments (exponential gaps), one request in five plain. The
   same schedule of requests goes straight to llama-server (templates expanded by the
   client) and through bioproxy, each against a fresh llama-server, once with
   llama-server's default --cache-ram and once with --cache-ram small enough that the
   templates do not fit (standing in for a model whose KV cache is large). Reported: time
   to first token p50/p95, prompt tokens llama-server evaluated, requests per minute.
2. A user arrives during a warmup. bioproxy evaluates a ~1,500-token template (edited, so
   nothing is cached); a short plain request arrives at a random moment of it. Its time to
   first token is compared with the same request on an idle server, for two piece sizes,
   and with llama-server alone while it evaluates the template in its other slot.

Run:    .venv/bin/python -m bench.scheduling [--requests-per-client 5] [--samples 6]
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time

import requests

from bench.proxy_overhead import machine, table
from bench.warmup import first_token
from bioproxy import templates
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import Bioproxy, free_port

CLIENTS = 8
PROJECTS = ("orchard", "harbor", "quarry", "meadow")  # a template each
PLAIN_SHARE = 0.2
MEAN_GAP = 1.0  # seconds between a client's requests, on average
SMALL_CACHE_RAM = 16  # MiB: one ~1,000-token template of this model takes ~23 MB
QUESTIONS = [
    "Which function parses a path?",
    "What does the limit argument do?",
    "Which call stores a record?",
    "When is ValueError raised?",
    "How many items can be returned?",
    "Which function loads a table?",
]
PLAIN = ["Name a colour.", "Say hello.", "Name a fruit.", "Count to three."]


def reference(project, lines):
    """Made-up API reference text for one project: distinct from its first line on."""
    verbs = ["returns", "computes", "checks", "builds", "parses", "formats", "loads", "stores"]
    nouns = ["list", "mapping", "path", "number", "record", "string", "table", "stream"]
    text = f"You answer questions about the {project} library, using this reference.\n"
    for i in range(lines):
        j = i + 11 * len(project)
        text += (
            f"- {project}.{verbs[j % 8]}_{nouns[j * 3 % 8]}_{i}(value, limit={j % 7}): "
            f"{verbs[(j + 3) % 8]} the {nouns[j % 8]} given as value, up to {j % 13 + 2} "
            f"items, and raises ValueError when the {nouns[(j + 5) % 8]} is empty.\n"
        )
    return text + "Question: <{message}>\n"


def llama_server(folder, name, cache_ram=None):
    args = ["--metrics"] + (["--cache-ram", str(cache_ram)] if cache_ram is not None else [])
    return LlamaServer(
        free_port(),
        slots=2,
        context=2 * 4096,
        slot_save_path=os.path.join(folder, name, "slots"),
        log_path=os.path.join(folder, f"{name}.log"),
        extra_args=args,
    )


def prompt_tokens(llama):
    """llama-server's count of prompt tokens it evaluated (its --metrics)."""
    text = requests.get(llama.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise RuntimeError("llama-server's /metrics has no llamacpp:prompt_tokens_total")


class Mixed:
    """One schedule of requests, played against llama-server alone and through bioproxy."""

    def __init__(self, folder, per_client, seed=7, projects=PROJECTS, clients=CLIENTS):
        self.folder = folder
        self.prefixes = {}
        os.makedirs(os.path.join(folder, "templates"))
        for project in projects:
            path = os.path.join("templates", f"{project}.txt")
            with open(os.path.join(folder, path), "w") as f:
                f.write(reference(project, 26))
            self.prefixes["@" + project] = path
        rng = random.Random(seed)
        self.schedule = [
            [
                (
                    rng.expovariate(1 / MEAN_GAP),
                    None if rng.random() < PLAIN_SHARE else rng.choice(list(self.prefixes)),
                    rng.choice(QUESTIONS),
                )
                for _ in range(per_client)
            ]
            for _ in range(clients)
        ]

    def expanded(self, prefix, question):
        path = self.prefixes[prefix]
        return templates.load(prefix, path, self.folder, self.folder, 1 << 22).render(question)

    def play(self, url, content_for):
        """Every client's requests, concurrently; (results, seconds) for the whole run."""
        results, threads = [], []

        def client(requests_):
            for gap, prefix, question in requests_:
                time.sleep(gap)
                try:
                    ttft, evaluated, _ = first_token(url, content_for(prefix, question))
                    results.append((prefix, ttft, evaluated))
                except requests.RequestException as e:
                    results.append((prefix, None, str(e)))

        started = time.monotonic()
        for requests_ in self.schedule:
            threads.append(threading.Thread(target=client, args=(requests_,)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        return results, time.monotonic() - started

    def direct(self, cache_ram):
        def content(prefix, question):
            return self.expanded(prefix, question) if prefix else PLAIN[len(question) % 4]

        with llama_server(self.folder, "direct", cache_ram) as llama:
            # Each template used once first, as it would have been before: llama-server's
            # own cache then holds what fits.
            for prefix in self.prefixes:
                first_token(llama.url, content(prefix, QUESTIONS[0]))
            before = prompt_tokens(llama)
            results, seconds = self.play(llama.url, content)
            return results, seconds, prompt_tokens(llama) - before

    def bioproxy(self, cache_ram):
        def content(prefix, question):
            return f"{prefix} {question}" if prefix else PLAIN[len(question) % 4]

        with llama_server(self.folder, "bioproxy", cache_ram) as llama:
            config = {
                "prefixes": self.prefixes,
                "warmup_check_interval": 0.5,
                "slot_save_path": llama.slot_save_path,
            }
            with Bioproxy(llama.url, self.folder, config) as proxy:
                wait_for(proxy.all_warm)
                before = prompt_tokens(llama)
                results, seconds = self.play(proxy.proxy_url, content)
                return results, seconds, prompt_tokens(llama) - before


def wait_for(check, timeout=600, step=0.2):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(step)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def mixed_rows(label, results, seconds, evaluated):
    ok = [r for r in results if r[1] is not None]
    ttfts = [r[1] * 1e3 for r in ok]
    return [
        label,
        len(results),
        len(results) - len(ok),
        f"{percentile(ttfts, 50):.0f}",
        f"{percentile(ttfts, 95):.0f}",
        f"{sum(r[2] for r in ok):,}",
        f"{evaluated:,.0f}",
        f"{len(ok) / seconds * 60:.0f}",
    ]


class DuringWarmup:
    """A short request arriving while a long template is evaluated."""

    def __init__(self, folder, samples, seed=11):
        self.folder = folder
        self.samples = samples
        self.rng = random.Random(seed)
        self.path = os.path.join(folder, "long.txt")
        self.text = reference("longbow", 40)
        self.version = 0

    def edit(self):
        self.version += 1
        with open(self.path, "w") as f:
            f.write(f"Version {self.version}.\n{self.text}")

    def through_bioproxy(self, piece_chars):
        self.edit()
        with llama_server(self.folder, f"pieces{piece_chars}") as llama:
            config = {
                "prefixes": {"@long": "long.txt"},
                "warmup_check_interval": 0.2,
                "warmup_piece_chars": piece_chars,
                "slot_save_path": llama.slot_save_path,
            }
            with Bioproxy(llama.url, self.folder, config) as proxy:

                def state():
                    return proxy.templates()["@long"]["state"]

                wait_for(lambda: state() == "warm")
                idle = [self.user(proxy.proxy_url, pause=0.5) for _ in range(self.samples)]
                busy, warmups = [], []
                for _ in range(self.samples):
                    self.edit()
                    started = time.monotonic()
                    wait_for(lambda: state() == "warming", step=0.02)
                    time.sleep(self.rng.uniform(0.2, 1.5))
                    busy.append(self.user(proxy.proxy_url))
                    wait_for(lambda: state() == "warm")
                    warmups.append(time.monotonic() - started)
                return idle, busy, statistics.median(warmups)

    def llama_alone(self):
        """llama-server alone: the template evaluated in slot 1 while the user uses slot 0."""
        with llama_server(self.folder, "alone") as llama:
            idle = [self.user(llama.url, pause=0.5, id_slot=0) for _ in range(self.samples)]
            busy = []
            for _ in range(self.samples):
                self.edit()
                body = {"prompt": f"Version {self.version}.\n{self.text}", "n_predict": 0}
                evaluation = threading.Thread(
                    target=requests.post,
                    args=(llama.url + "/completion",),
                    kwargs={"json": {**body, "id_slot": 1}, "timeout": 600},
                )
                started = time.monotonic()
                evaluation.start()
                time.sleep(self.rng.uniform(0.2, 1.5))
                busy.append(self.user(llama.url, id_slot=0))
                evaluation.join()
                seconds = time.monotonic() - started
            return idle, busy, seconds

    @staticmethod
    def user(url, pause=0.0, content="Say hi.", **extra):
        """Time to the first token of a short request (after a pause, to let the last one end).

        The client hangs up at the first token; llama-server generates on until bioproxy's
        next write fails, so a request sent at once would find that slot still busy.
        """
        time.sleep(pause)
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "stream": True,
            **extra,
        }
        start = time.monotonic()
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        return time.monotonic() - start
        raise RuntimeError("no token came")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=5)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--pieces", default="600,150,40", help="warmup_piece_chars to compare")
    parser.add_argument("--part", choices=["all", "mixed", "warmup"], default="all")
    args = parser.parse_args()
    lines = [f"Machine: {machine()}", ""]
    with tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as folder:
        if args.part != "warmup":
            lines += run_mixed(Mixed(folder, args.requests_per_client))
        if args.part != "mixed":
            pieces = [int(p) for p in args.pieces.split(",")]
            lines += run_during_warmup(DuringWarmup(folder, args.samples), pieces)
    print("\n".join(lines))


def run_mixed(mixed):
    header = [
        "path",
        "requests",
        "errors",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "prompt tokens (requests)",
        "prompt tokens (llama-server, all)",
        "requests/min",
    ]
    lines = []
    for name, cache_ram in (("default", None), (f"{SMALL_CACHE_RAM} MiB", SMALL_CACHE_RAM)):
        direct = mixed.direct(cache_ram)
        through = mixed.bioproxy(cache_ram)
        p95 = [
            percentile([r[1] for r in run[0] if r[1] is not None], 95) for run in (direct, through)
        ]
        block = [
            f"Mixed workload, --cache-ram {name}: {CLIENTS} clients, "
            f"{sum(map(len, mixed.schedule))} requests, 4 templates, 2 slots",
            "",
            table(
                header,
                [
                    mixed_rows("llama-server alone", *direct),
                    mixed_rows("through bioproxy", *through),
                ],
            ),
            "",
            f"p95 through bioproxy / alone: {p95[1] / p95[0]:.2f}",
            "",
        ]
        print("\n".join(block), flush=True)
        lines += block
    return lines


def run_during_warmup(during, pieces):
    cases = [(f"bioproxy, pieces of {n} chars", during.through_bioproxy(n)) for n in pieces]
    cases.append(("llama-server alone, other slot", during.llama_alone()))
    rows = []
    for label, (idle, busy, warmup) in cases:
        idle_ms = statistics.median(idle) * 1e3
        busy_ms = [v * 1e3 for v in busy]
        rows.append(
            [
                label,
                f"{idle_ms:.0f}",
                f"{statistics.median(busy_ms):.0f}",
                f"{max(busy_ms):.0f}",
                f"{statistics.median(busy_ms) / idle_ms:.1f}",
                f"{warmup:.1f}",
            ]
        )
    header = ["case", "idle TTFT ms", "during warmup p50 ms", "max ms", "p50 / idle", "warmup s"]
    return [
        f"A user arriving during a warmup ({during.samples} samples each, random moments):",
        "",
        table(header, rows),
        "",
    ]


if __name__ == "__main__":
    main()
