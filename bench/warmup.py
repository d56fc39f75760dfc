"""How much sooner a templated request answers when bioproxy keeps its template warm.

For templates of about 1,000 and 4,000 tokens, side by side in one run, the time to the
first token (TTFT) and the prompt tokens llama.cpp evaluated for a templated request:

- warm:      through bioproxy, after its warmup (a new question each time)
- cold:      the same expanded request straight to llama-server, nothing cached
- restarted: through bioproxy, the first request after llama-server restarted
- edited:    through bioproxy, the first request after the template file changed
- best:      llama.cpp's own best case: straight to llama-server, pinned to a slot that
             holds exactly the template's prefix, with the same questions as "warm"

Run:    .venv/bin/python -m bench.warmup [--rounds 5]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import requests

from bench.proxy_overhead import machine, table
from bioproxy import templates
from bioproxy.llamacpp import LlamaServer
from bioproxy.testing import Bioproxy, free_port

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
QUESTIONS = [
    "How do I reverse a list?",
    "How do I read a file line by line?",
    "How do I sort a dict by value?",
    "What is a generator?",
    "How do I time a function?",
    "How do I merge two dicts?",
    "How do I remove duplicates from a list?",
    "How do I parse JSON?",
]


def long_reference(n):
    """n lines of made-up but varied API reference text, to make a long template."""
    verbs = ["returns", "computes", "checks", "builds", "parses", "formats", "loads", "stores"]
    nouns = ["list", "mapping", "path", "number", "record", "string", "table", "stream"]
    return "".join(
        f"- {verbs[i % 8]}_{nouns[i * 3 % 8]}_{i}(value, limit={i % 7}): "
        f"{verbs[(i + 3) % 8]} the {nouns[i % 8]} given as value, up to {i % 13 + 2} items, "
        f"and raises ValueError when the {nouns[(i + 5) % 8]} is empty.\n"
        for i in range(n)
    )


def write_templates(folder):
    with open(os.path.join(EXAMPLES, "templates", "code.txt")) as f:
        code = f.read()
    os.makedirs(os.path.join(folder, "templates"))
    with (
        open(os.path.join(EXAMPLES, "templates", "style.md")) as f,
        open(os.path.join(folder, "templates", "style.md"), "w") as out,
    ):
        out.write(f.read())
    files = {"@t1k": code, "@t4k": "## Reference\n" + long_reference(70) + "\n" + code}
    for prefix, text in files.items():
        with open(os.path.join(folder, "templates", prefix[1:] + ".txt"), "w") as f:
            f.write(text)
    return {prefix: f"templates/{prefix[1:]}.txt" for prefix in files}


def first_token(url, content, **extra):
    """(seconds to the first token, tokens evaluated, X-Bioproxy-Cache) of a streamed chat."""
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    start = time.monotonic()
    ttft, timings = None, None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        cache = r.headers.get("X-Bioproxy-Cache", "-")
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            delta = event["choices"][0]["delta"] if event.get("choices") else {}
            if ttft is None and delta.get("content"):
                ttft = time.monotonic() - start
            timings = event.get("timings", timings)
    return ttft, timings["prompt_n"], cache


class Bench:
    def __init__(self, folder, rounds):
        self.folder, self.rounds = folder, rounds
        self.prefixes = write_templates(folder)
        self.llama = LlamaServer(
            free_port(),
            slots=2,
            context=2 * 8192,
            slot_save_path=os.path.join(folder, "slots"),
            log_path=os.path.join(folder, "llama.log"),
        )
        self.config = {
            "prefixes": self.prefixes,
            "warmup_check_interval": 0.5,
            "slot_save_path": self.llama.slot_save_path,
        }
        self.proxy = None
        self.questions = iter(QUESTIONS * 100)

    def expanded(self, prefix, question):
        template = templates.load(prefix, self.prefixes[prefix], self.folder, self.folder, 1 << 22)
        return template.render(question)

    def listed(self):
        return self.proxy.templates()

    def wait_warm(self, check=lambda listed: True):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            listed = self.listed()
            if all(t["state"] == "warm" for t in listed.values()) and check(listed):
                return
            time.sleep(0.2)
        raise RuntimeError("templates did not get warm")

    def through_bioproxy(self, prefix):
        return first_token(self.proxy.proxy_url, f"{prefix} {next(self.questions)}")

    def run(self):
        results = {}
        with self.llama:
            self.proxy = Bioproxy(self.llama.url, self.folder, self.config).start().wait_ready()
            try:
                self.wait_warm()
                for prefix in self.prefixes:
                    results[prefix] = self.measure(prefix)
            finally:
                self.proxy.stop()
        return results

    def measure(self, prefix):
        cases = {name: [] for name in ("warm", "cold", "restarted", "edited", "best")}
        # bioproxy alone first: other clients' requests would push its template out.
        self.proxy_only_warm(prefix)
        questions = [next(self.questions) for _ in range(self.rounds)]
        for question in questions:
            cases["warm"].append(first_token(self.proxy.proxy_url, f"{prefix} {question}"))
        # llama.cpp's best case: exactly the template's prefix in the slot, the same
        # questions, so both evaluate the same tokens.
        head = self.rendered_head(prefix)
        for question in questions:
            prefill = {"prompt": head, "n_predict": 0, "id_slot": 0, "cache_prompt": True}
            requests.post(self.llama.url + "/completion", json=prefill, timeout=600)
            expanded = self.expanded(prefix, question)
            cases["best"].append(first_token(self.llama.url, expanded, id_slot=0))
        for question in questions:
            expanded = self.expanded(prefix, question)
            cases["cold"].append(first_token(self.llama.url, expanded, cache_prompt=False))
        for _ in range(max(1, self.rounds // 2)):
            restores = self.restores(prefix)
            self.llama.stop()
            self.llama.start().wait_ready()
            self.wait_for(lambda before=restores: self.restores(prefix) > before)
            cases["restarted"].append(self.through_bioproxy(prefix))

            digest = self.listed()[prefix]["digest"]
            path = os.path.join(self.folder, self.prefixes[prefix])
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(f"Edited at {time.time()}.\n{text}")
            self.wait_warm(lambda listed, old=digest: listed[prefix]["digest"] != old)
            cases["edited"].append(self.through_bioproxy(prefix))
        return cases

    def rendered_head(self, prefix):
        """The prompt text before the message, as llama-server's chat template renders it."""
        marker = "\u2063bench\u2063"
        messages = [{"role": "user", "content": self.expanded(prefix, marker)}]
        answer = requests.post(
            self.llama.url + "/apply-template", json={"messages": messages}, timeout=60
        )
        prompt = answer.json()["prompt"]
        return prompt[: prompt.index(marker)]

    def proxy_only_warm(self, prefix):
        """Put the template back in its slot, as bioproxy keeps it when it is the only client."""
        requests.post(f"{self.proxy.admin_url}/templates/{prefix}/warmup", timeout=10)
        self.wait_warm()
        self.wait_for(lambda: self.listed()[prefix]["state"] == "warm")

    def restores(self, prefix):
        return self.proxy.metric("bioproxy_slot_restores_total", template=prefix, outcome="ok")

    @staticmethod
    def wait_for(check, timeout=120):
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError("timed out")
            time.sleep(0.2)


def report(results):
    lines = [f"Machine: {machine()}", ""]
    for prefix, cases in results.items():
        ms = {name: statistics.median(v[0] for v in runs) * 1e3 for name, runs in cases.items()}
        rows = [
            [
                name,
                len(runs),
                f"{ms[name]:.0f}",
                "/".join(str(v[1]) for v in runs),
                "/".join(sorted({v[2] for v in runs})),
                f"{ms[name] / ms['cold']:.3f}",
                f"{ms[name] / ms['best']:.2f}",
            ]
            for name, runs in cases.items()
        ]
        tokens = max(v[1] for v in cases["cold"])
        header = [
            "case",
            "runs",
            "TTFT ms",
            "tokens evaluated",
            "X-Bioproxy-Cache",
            "vs cold",
            "vs best",
        ]
        lines += [
            f"Template {prefix} ({tokens} prompt tokens cold), median over the runs:",
            "",
            table(header, rows),
            "",
        ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as folder:
        results = Bench(folder, args.rounds).run()
        print(report(results))


if __name__ == "__main__":
    main()
