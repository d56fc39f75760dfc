"""What pieces cost a warmup nobody interrupts: in pieces against one evaluation.

A warmup in the serving llama-server's own slots evaluates its template in pieces of
about warmup_piece_chars characters (bioproxy/evaluation.py), so that a user who arrives
waits for one piece at most. With no user arriving, that costs more than evaluating the
template in one request: one HTTP call and one generated token a piece, and shorter
batches. Templates of about 1,500 and 6,000 tokens, each round with a first line of its
own (nothing of it cached), evaluated into slot 0 of one llama-server started as bioproxy
starts its own (-np 2), in one piece and then in pieces of each size, in turn.

Run:    .venv/bin/python -m bench.pieces [--rounds 3] [--sizes 150,600]
"""

import argparse
import os
import statistics
import tempfile
import time

from bench.proxy_overhead import machine, table
from bench.scheduling import reference
from bench.users_first import SIZES
from bioproxy.evaluation import Evaluation, cuts_of
from bioproxy.llamacpp import LlamaServer
from bioproxy.prompts import Prompts
from bioproxy.testing import free_port
from bioproxy.upstream import Upstream


class Unchanging:
    """A catalog entry whose template never changes while it is evaluated."""

    def is_current(self, template):
        return True


def evaluate(prompts, text, piece_chars):
    """Seconds to evaluate text into slot 0, in pieces of piece_chars (None: in one, as
    the warmup llama-server evaluates a template: one streamed request)."""
    run = Evaluation(Unchanging(), 0, None, prompts, gate=None)
    start = time.monotonic()
    run.run(text, piece_chars or len(text), in_one_piece=piece_chars is None)
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="150,600", help="piece sizes in characters")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    ways = [None, *sizes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bioproxy-bench-") as folder:
        llama = LlamaServer(
            free_port(), slots=2, context=2 * 8192, log_path=os.path.join(folder, "llama.log")
        )
        with llama:
            upstream = Upstream(llama.url, 5, 600, 5)
            prompts = Prompts(upstream, 600)
            for name, lines in SIZES.items():
                text = reference("longbow", lines)
                tokens = prompts.count(text)
                seconds = {way: [] for way in ways}
                for round_ in range(args.rounds):
                    for way in ways:
                        head = f"Round {round_}, {way}.\n{text}"
                        seconds[way].append(evaluate(prompts, head, way))
                whole = statistics.median(seconds[None])
                for way in ways:
                    median = statistics.median(seconds[way])
                    label = "one piece" if way is None else f"pieces of {way} characters"
                    pieces = 1 if way is None else len(cuts_of(text, way))
                    rows.append(
                        [
                            f"{name} ({tokens})",
                            label,
                            pieces,
                            f"{median:.2f}",
                            f"{median / whole:.2f}",
                        ]
                    )
            upstream.close()
    print(f"Machine: {machine()}\n")
    print(f"A template evaluated into an empty slot, median of {args.rounds} rounds:\n")
    print(table(["template", "evaluated", "pieces", "seconds", "÷ one piece"], rows))


if __name__ == "__main__":
    main()
