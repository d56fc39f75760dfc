"""What the portable llama-server build costs against a build tuned to this machine.

scripts/setup builds llama-server with GGML_NATIVE=OFF (AVX2, FMA, F16C; no AVX-512, no
AMX), because a native build crashed on an Intel Xeon with AMX under KVM. This runs both
builds on the same model, one after the other in rounds, and prints their prompt
processing and generation speed side by side, with the ratio.

Build the native one into another checkout's .venv first, for example:

    git clone . /tmp/native && cd /tmp/native &&
        BIOPROXY_LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON scripts/setup

Run:    .venv/bin/python -m bench.llama_build --other /tmp/native/.venv/.../llama-server
"""

import argparse
import os
import statistics
import tempfile

import requests

from bench.proxy_overhead import machine, table
from bench.warmup import long_reference
from bioproxy.llamacpp import LlamaServer, binary_path
from tests.servers import free_port


def measure(binary, prompt, workdir, name):
    """(prompt tokens, prompt tokens/s, generated tokens/s) of one cold evaluation."""
    log = os.path.join(workdir, f"{name}.log")
    with LlamaServer(free_port(), slots=1, context=8192, log_path=log, binary=binary) as server:
        body = {
            "prompt": prompt,
            "n_predict": 128,
            "ignore_eos": True,
            "cache_prompt": False,
            "temperature": 0,
        }
        timings = requests.post(server.url + "/completion", json=body, timeout=600).json()[
            "timings"
        ]
    return timings["prompt_n"], timings["prompt_per_second"], timings["predicted_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="the llama-server to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lines", type=int, default=60, help="prompt length, in lines")
    args = parser.parse_args()
    builds = {"portable (scripts/setup)": binary_path(), "other": args.other}
    prompt = long_reference(args.lines)
    results = {name: [] for name in builds}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            for name, binary in builds.items():  # alternated: both see the same machine
                results[name].append(measure(binary, prompt, workdir, "llama"))
    print(machine())
    for name, binary in builds.items():
        print(f"{name}: {binary}")
    rows = []
    base_pp = statistics.median(r[1] for r in results["portable (scripts/setup)"])
    base_tg = statistics.median(r[2] for r in results["portable (scripts/setup)"])
    for name, runs in results.items():
        pp = statistics.median(r[1] for r in runs)
        tg = statistics.median(r[2] for r in runs)
        rows.append(
            [
                name,
                runs[0][0],
                f"{pp:.0f}",
                f"{pp / base_pp:.2f}",
                f"{tg:.0f}",
                f"{tg / base_tg:.2f}",
            ]
        )
    print(
        table(
            [
                "build",
                "prompt tokens",
                "prompt tokens/s (median)",
                "÷ portable",
                "generated tokens/s",
                "÷ portable",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
