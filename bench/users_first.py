"""Users during a warmup: in llama-server's own slots, and with a warmup llama-server.

A template of about 1,500 and one of about 6,000 tokens is edited (so nothing of it is
cached) and bioproxy warms it again while a user sends short streamed requests ("Say
hi.", at random gaps of 0.2 to 1 s). Each request's time to the first token is compared
with the same request on the idle server, sampled in the same run just before each
edit: the users' p50 and p95 against the idle median, and their p95 against the idle
p95 too (the idle server has a tail of its own). Four ways bioproxy warms, each against
a fresh llama-server started as bioproxy starts its own (-np 2, a slot folder; with a
warmup llama-server, both without a RAM cache, as the bioproxy command starts them):

- here:  in the serving llama-server's own slots, in pieces of warmup_piece_chars (150),
         cancelled by each user and started again once no user is in flight (llama.cpp's
         default RAM cache, as deploy/ starts it);
- bare:  the same, llama-server started without its RAM cache (--cache-ram 0);
- nice:  in a warmup llama-server started the same way at nice 19 (warmup_backend_url),
         its saved slot restored into the serving one;
- held:  the same, its process also stopped while a user waits for a first byte
         (warmup_backend_pid, as the bioproxy command sets it: bioproxy/hold.py).

"warmup s" runs from the edit to the template being warm again; "÷ alone" divides it by
the same template's evaluation on an idle llama-server (measured first). A case whose
warmup does not end while the user keeps sending stops the user after --max-samples
requests, and says so.

--part load: users send requests at Poisson moments (one a second on average, half of
them templated, for --seconds), once without an edit and once with the ~1,500-token
template edited a quarter of the way in: how long it takes to be warm again, and the
users' p95 time to first token against the run without the edit, both ways of warming.

Run:    .venv/bin/python -m bench.users_first [--rounds 2] [--part during|load|all]
                                              [--ways here,bare,nice,held]
"""

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import time

import requests

from bench.proxy_overhead import machine, percentile, table
from bench.scheduling import DuringWarmup, reference
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import Bioproxy, free_port

SIZES = {"~1,500 tokens": 40, "~6,000 tokens": 160}  # lines of reference text
WAYS = {  # how bioproxy warms, and its row's label
    "here": "here (pieces of 150)",
    "bare": "here, no RAM cache",
    "nice": "warmup llama-server, nice 19",
    "held": "warmup llama-server, nice 19, stopped for users",
}
IDLE_SAMPLES = 10  # a round's idle requests before its edit: the idle p95 needs a few dozen


def llama_server(folder, name, nice=0, ram_cache=True):
    return LlamaServer(
        free_port(),
        slots=2,
        context=2 * 8192,
        slot_save_path=os.path.join(folder, "slots"),
        log_path=os.path.join(folder, f"{name}.log"),
        nice=nice,
        ram_cache=ram_cache,
    )


def first_token(url, content="Say hi."):
    """Seconds to the first token of a short streamed chat request."""
    return DuringWarmup.user(url, content=content)


class Case:
    def __init__(self, folder, lines, rounds, max_samples, seed=5):
        self.folder = folder
        self.text = reference("longbow", lines)
        self.rounds = rounds
        self.max_samples = max_samples
        self.rng = random.Random(seed)
        self.version = 0

    def edit(self):
        self.version += 1
        with open(os.path.join(self.folder, "long.txt"), "w") as f:
            f.write(f"Version {self.version}.\n{self.text}")

    def alone_seconds(self):
        """The template's evaluation on an idle llama-server, and its tokens."""
        with llama_server(self.folder, "alone") as llama:
            start = time.monotonic()
            body = {"prompt": self.text, "n_predict": 0, "cache_prompt": False}
            answer = requests.post(llama.url + "/completion", json=body, timeout=600).json()
            return time.monotonic() - start, answer["timings"]["prompt_n"]

    def run(self, way):
        with self.bioproxy(way) as proxy:
            return self.measure(proxy)

    @contextlib.contextmanager
    def bioproxy(self, way):
        """bioproxy before a fresh llama-server, warming one of the WAYS."""
        self.edit()
        with contextlib.ExitStack() as stack:
            # With a warmup llama-server, both without a RAM cache, as the bioproxy
            # command starts them (LlamaServer.ram_cache).
            ram_cache = way == "here"
            serving = stack.enter_context(llama_server(self.folder, "serving", 0, ram_cache))
            config = {
                "prefixes": {"@long": "long.txt"},
                "warmup_check_interval": 0.2,
                "slot_save_path": serving.slot_save_path,
            }
            if way not in ("here", "bare"):
                warmup = stack.enter_context(llama_server(self.folder, "warmup", 19, ram_cache))
                config["warmup_backend_url"] = warmup.url
                if way == "held":
                    config["warmup_backend_pid"] = warmup.process.pid
            yield stack.enter_context(Bioproxy(serving.url, self.folder, config))

    def measure(self, proxy):
        def state():
            return proxy.templates()["@long"]["state"]

        wait(lambda: state() == "warm")
        idle, busy, warmups, stopped = [], [], [], 0
        self.last = []  # per user: how many users of its round came after it
        for _ in range(self.rounds):
            for _ in range(IDLE_SAMPLES):
                time.sleep(0.5)
                idle.append(first_token(proxy.proxy_url))
            self.edit()
            started = time.monotonic()
            wait(lambda: state() == "warming", step=0.02)
            sent = 0
            while True:
                if sent == self.max_samples:
                    stopped += 1  # the warmup would not end while the user keeps sending
                    break
                time.sleep(self.rng.uniform(0.2, 1.0))
                if state() == "warm":  # looked at after the pause: it may have ended in it
                    break
                busy.append(first_token(proxy.proxy_url))
                sent += 1
            self.last += range(sent - 1, -1, -1)
            wait(lambda: state() == "warm")
            warmups.append(time.monotonic() - started)
        return idle, busy, statistics.median(warmups), stopped


class Load(Case):
    """Poisson users for a while, with or without an edit of the template."""

    QUESTIONS = ("Which function parses a path?", "When is ValueError raised?")

    def measure_load(self, way, seconds, edit):
        with self.bioproxy(way) as proxy:
            return self.play(proxy, seconds, edit)

    def play(self, proxy, seconds, edit):
        def warm():
            return proxy.templates()["@long"]["state"] == "warm"

        wait(warm)
        rng = random.Random(9)  # the same moments with and without the edit
        ttft, start, edited, warm_again = [], time.monotonic(), None, None
        moment = 0.0
        while moment < seconds:
            moment += rng.expovariate(1.0)
            templated = rng.random() < 0.5
            question = rng.choice(self.QUESTIONS)
            while time.monotonic() - start < moment:
                now = time.monotonic() - start
                if edit and edited is None and now >= seconds / 4:
                    self.edit()
                    edited = now
                    time.sleep(0.5)  # seen by the watcher (warmup_check_interval 0.2 s)
                elif edited is not None and warm_again is None and warm():
                    warm_again = now - edited
                time.sleep(0.02)
            content = f"@long {question}" if templated else "Say hi."
            ttft.append(first_token(proxy.proxy_url, content))
        if edited is not None and warm_again is None:
            wait(warm)
            warm_again = time.monotonic() - start - edited
        return ttft, warm_again


def run_load(folder, seconds, ways):
    case = Load(folder, SIZES["~1,500 tokens"], 1, 0)
    alone, tokens = case.alone_seconds()
    rows = []
    for way in ways:
        label = WAYS[way]
        quiet, _ = case.measure_load(way, seconds, edit=False)
        busy, warm_again = case.measure_load(way, seconds, edit=True)
        p95_quiet, p95_busy = (percentile(v, 95) * 1e3 for v in (quiet, busy))
        rows.append(
            [
                label,
                len(busy),
                f"{p95_quiet:.0f}",
                f"{p95_busy:.0f}",
                f"{p95_busy / p95_quiet:.2f}",
                f"{warm_again:.1f}",
                f"{warm_again / alone:.2f}",
            ]
        )
        print(rows[-1], flush=True)
    header = [
        f"template of {tokens} tokens, warmed",
        "requests",
        "p95 ms, no edit",
        "p95 ms, edited",
        "edited ÷ no edit",
        "warm again after s",
        "÷ alone",
    ]
    return table(header, rows)


def slowest(ttfts, after, n=5):
    """The n longest times to first token, each with the number of users after it in its
    round: 0 is the last one before the template was seen warm again (its restore)."""
    worst = sorted(zip(ttfts, after, strict=True), reverse=True)[:n]
    return ", ".join(f"{t * 1e3:.0f} ({k})" for t, k in worst)


def wait(check, timeout=900, step=0.2):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("bioproxy did not get there")
        time.sleep(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-samples", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--part", choices=["during", "load", "all"], default="all")
    parser.add_argument("--ways", default=",".join(WAYS), help="of: " + ", ".join(WAYS))
    args = parser.parse_args()
    ways = args.ways.split(",")
    if not set(ways) <= set(WAYS):
        parser.error(f"--ways: of {', '.join(WAYS)}")
    print(f"Machine: {machine()}\n")
    if args.part != "during":
        with tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as folder:
            print(run_load(folder, args.seconds, ways) + "\n")
    if args.part == "load":
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as folder:
        for size, lines in SIZES.items():
            case = Case(folder, lines, args.rounds, args.max_samples)
            alone, tokens = case.alone_seconds()
            for way in ways:
                label = WAYS[way]
                idle, busy, warmup, stopped = case.run(way)
                idle_ms = statistics.median(idle) * 1e3
                idle_p95 = percentile(idle, 95) * 1e3
                p50, p95 = (percentile(busy, p) * 1e3 for p in (50, 95))
                note = f" (user stopped {stopped}×)" if stopped else ""
                rows.append(
                    [
                        f"{size} ({tokens}), {label}",
                        len(busy),
                        f"{idle_ms:.0f}",
                        f"{p50:.0f}",
                        f"{p95:.0f}",
                        f"{p50 / idle_ms:.2f}",
                        f"{p95 / idle_ms:.2f}",
                        f"{idle_p95:.0f}",
                        f"{p95 / idle_p95:.2f}",
                        f"{warmup:.1f}{note}",
                        f"{warmup / alone:.2f}",
                    ]
                )
                print(rows[-1], flush=True)
                print(
                    "  slowest users, ms (users after it in its round):", slowest(busy, case.last)
                )
    header = [
        "template, warmed",
        "users",
        "idle TTFT ms",
        "p50 ms",
        "p95 ms",
        "p50 ÷ idle",
        "p95 ÷ idle",
        "idle p95 ms",
        "p95 ÷ idle p95",
        "warmup s",
        "÷ alone",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
