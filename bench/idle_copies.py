"""What llama-server's RAM cache of prompts costs the request after a templated one.

With --cache-ram (8 GiB by default), llama-server copies each idle slot whose tokens
changed into that cache whenever a task starts, in its loop, before the task. A slot that
holds a template and a question (a templated request, answered) is such a slot: the next
request, whatever its slot, waits for the copy. This runs the pattern against one
llama-server started as bioproxy starts its own (-np 2, a slot folder), once with
llama.cpp's default --cache-ram and once with --cache-ram 0 (as the bioproxy command
starts it, with a warmup llama-server beside: LlamaServer.ram_cache):
slot 0 gets the template and a question of its own, then a short streamed chat request
goes to slot 1, twice. Reported: the median time to first token of the first of the two
(after the slot changed) and of the second (nothing changed since), for templates of
~1,650 and ~6,600 tokens.

Run:    .venv/bin/python -m bench.idle_copies [--rounds 8]
"""

import argparse
import statistics
import tempfile
import time

import requests

from bench.proxy_overhead import machine, table
from bench.scheduling import DuringWarmup, reference
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import free_port

SIZES = {"~1,650 tokens": 40, "~6,600 tokens": 160}  # lines of reference text
RAM_CACHE = {  # LlamaServer's ram_cache, and its row's label
    "llama.cpp's default --cache-ram (8 GiB)": True,
    "--cache-ram 0 (as the bioproxy command starts it)": False,
}


def first_token_ms(url, slot):
    """A short streamed chat request's time to its first token, pinned to slot."""
    return DuringWarmup.user(url, id_slot=slot) * 1e3


def complete(url, prompt, n_predict):
    body = {"prompt": prompt, "n_predict": n_predict, "id_slot": 0, "cache_prompt": True}
    answer = requests.post(url + "/completion", json=body, timeout=600)
    answer.raise_for_status()


def measure(text, ram_cache, rounds):
    """(first request after slot 0 changed, the one after it): median ms each."""
    with (
        tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as folder,
        LlamaServer(free_port(), slots=2, slot_save_path=folder, ram_cache=ram_cache) as llama,
    ):
        complete(llama.url, text, 0)
        for _ in range(3):
            first_token_ms(llama.url, 1)  # slot 1 holds the short request's own prompt
        after_change, unchanged = [], []
        for k in range(rounds):
            complete(llama.url, f"{text}\nQuestion {k}: what is this?\n", 4)
            time.sleep(0.3)
            after_change.append(first_token_ms(llama.url, 1))
            time.sleep(0.3)
            unchanged.append(first_token_ms(llama.url, 1))
            time.sleep(0.3)
        return statistics.median(after_change), statistics.median(unchanged)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    rows = []
    for size, lines in SIZES.items():
        text = reference("longbow", lines)
        for label, ram_cache in RAM_CACHE.items():
            changed, unchanged = measure(text, ram_cache, args.rounds)
            rows.append(
                [size, label, f"{changed:.1f}", f"{unchanged:.1f}", f"{changed / unchanged:.2f}"]
            )
            print(rows[-1], flush=True)
    header = [
        "template",
        "llama-server",
        "TTFT after the slot changed, ms",
        "TTFT next, ms",
        "ratio",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
