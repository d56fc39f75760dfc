"""bioproxy in front of llama-server started each way its users start it, side by side.

For each configuration (bioproxy.testing.USERS_CONFIGS): the mixed sequence of templated
and plain requests, streamed, once through bioproxy (after its warmups) and once straight
to a new llama-server of the same configuration with the same expanded messages. Prints,
per configuration, the median time to the first token of the templated requests through
bioproxy against the same requests to llama-server with no cache (cold), and the prompt
tokens llama-server evaluated for the whole sequence both ways.

With --system, every request carries a system message, as most chat clients send: each
template is then served as a variant (docs/TEMPLATES.md), whose first request is cold by
design; the warm figure is the median of the templated requests after each template's
first, and the first ones are shown apart.

Run:    .venv/bin/python -m bench.configs [--system] [--only defaults np2 ...]
Prints a Markdown table for docs/BENCHMARKS.md.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import requests

from bioproxy.testing import (
    BACKEND_KEY,
    MIXED_SEQUENCE,
    USERS_CONFIGS,
    Bioproxy,
    examples_workdir,
    expanded,
    users_llama,
    wait_until,
)

SYSTEM_MESSAGE = {"role": "system", "content": "You are a patient teacher. Answer in one line."}


def stream(url, content, key=None, system=None, **extra):
    """(ms to the first token's event, the answer's timings) of one streamed chat."""
    body = {
        "messages": [*([system] if system else []), {"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 8,
        "stream": True,
        **extra,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    first, timings = None, None
    with requests.post(
        url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=300
    ) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta", {})
            if first is None and delta.get("content"):
                first = (time.perf_counter() - started) * 1000
            timings = event.get("timings", timings)
    return first, timings


def measure(folder, name, system=None):
    args, has_folder = USERS_CONFIGS[name]
    key = BACKEND_KEY if "--api-key" in args else None
    slots = folder / "slots" if has_folder else None
    work, config = examples_workdir(folder, slots, **({"backend_api_key": key} if key else {}))
    with users_llama(folder, args, slots) as server, Bioproxy(server.url, work, config) as bp:
        wait_until(bp.all_warm, timeout=300, what="every template warm")
        through = [stream(bp.proxy_url, text, system=system) for text in MIXED_SEQUENCE]
        time.sleep(0.5)  # the last answer's bookkeeping, done once its stream has closed
        # The templated requests' tokens as bioproxy counts them: their answers' prompt_n,
        # and for a variant's first request the head bioproxy evaluated for it first.
        templated_tokens = bp.metric("bioproxy_prompt_tokens_evaluated_total")
    (folder / "alone").mkdir()
    with users_llama(folder / "alone", args, slots and folder / "alone-slots") as server:
        direct = [stream(server.url, expanded(work, text), key, system) for text in MIXED_SEQUENCE]
        cold = [
            stream(server.url, expanded(work, text), key, system, cache_prompt=False)[0]
            for text in MIXED_SEQUENCE
            if text.startswith("@")
        ]
    templated, first, seen, evaluated = [], None, set(), int(templated_tokens)
    for (ms, timings), text in zip(through, MIXED_SEQUENCE, strict=True):
        prefix = text.split(" ", 1)[0]
        if not text.startswith("@"):
            evaluated += timings["prompt_n"]
        elif system and prefix not in seen:
            first = ms if prefix == "@code" else first  # its variant's first: shown apart
        else:
            templated.append(ms)
        seen.add(prefix)
    texts = [text for text in MIXED_SEQUENCE if text.startswith("@")]
    code_cold = [ms for ms, text in zip(cold, texts, strict=True) if text.startswith("@code")]
    return {
        "first_ms": first,
        "first_cold_ms": statistics.median(code_cold),
        "warm_ms": statistics.median(templated),
        "cold_ms": statistics.median(cold),
        "tokens": evaluated,
        "tokens_alone": sum(t["prompt_n"] for _, t in direct),
    }


def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1] for line in f if line.startswith("model name"))
            return next(names).strip()
    except (OSError, StopIteration):
        return platform.machine()


def report(results, system):
    templated = sum(1 for text in MIXED_SEQUENCE if text.startswith("@"))
    lines = [
        f"{cpu()}: per configuration, {len(MIXED_SEQUENCE)} requests ({templated} "
        "templated, the others plain), `max_tokens` 8, streamed"
        + (
            ", each after a system message (each template a variant: first is @code's "
            "first request, whose head is evaluated and saved, against @code cold)."
            if system
            else "."
        ),
        "",
        "| llama-server started with | warm TTFT | cold TTFT | warm ÷ cold "
        + ("| first TTFT | first ÷ cold " if system else "")
        + "| prompt tokens, bioproxy | llama-server alone | bioproxy ÷ alone |",
        "|---|---|---|---|" + ("---|---|" if system else "") + "---|---|---|",
    ]
    for name, r in results.items():
        args, has_folder = USERS_CONFIGS[name]
        words = [("K" if a == BACKEND_KEY else a) for a in args]
        words += ["--slot-save-path DIR"] if has_folder else []
        flags = f"`{' '.join(words)}`" if words else "(defaults)"
        lines.append(
            f"| {flags} | {r['warm_ms']:.0f} ms | {r['cold_ms']:.0f} ms "
            f"| {r['warm_ms'] / r['cold_ms']:.2f} "
            + (
                f"| {r['first_ms']:.0f} ms | {r['first_ms'] / r['first_cold_ms']:.2f} "
                if system
                else ""
            )
            + f"| {r['tokens']} | {r['tokens_alone']} "
            f"| {r['tokens'] / r['tokens_alone']:.2f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(USERS_CONFIGS), default=None)
    parser.add_argument("--system", action="store_true", help="a system message on each")
    options = parser.parse_args()
    names = options.only or list(USERS_CONFIGS)
    system = SYSTEM_MESSAGE if options.system else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = Path(tmp) / name
            folder.mkdir()
            results[name] = measure(folder, name, system)
            print(f"{name}: {results[name]}", flush=True)
    print()
    print(report(results, system))


if __name__ == "__main__":
    main()
