"""Chunked prefill: how long the turns already decoding wait for their next token while a long
new prompt joins the batch.

On the engine alone (small model with a 4,096-token window, no service): 15 turns decode, then
a prompt of 3,000 tokens joins. Reports the gaps between consecutive decoding steps (each a
token for every running turn) while it is prefilled, and the long turn's time to first token,
with prefill budgets (WORKER_PREFILL_TOKENS; 512 by default) of 128 and 512 tokens and, in
the same run, with the whole prompt prefilled at once.

Run: python -m bench.prefill_stall
"""

from __future__ import annotations

import itertools
import threading
import time

from bench.report import percentile, say
from bench.stack import long_model_dir
from worker.inference.engine import Engine, GenerationParams
from worker.inference.loader import LoadedModel, load_model
from worker.inference.prompt import Prompt

RUNNING, LONG_PROMPT = 15, 3000
BUDGETS = (128, 512, LONG_PROMPT)  # the last: the whole prompt at once


def _stall(loaded: LoadedModel, prefill_tokens: int) -> tuple[list[float], float]:
    """Gaps between steps (s) from the long prompt's arrival to its first token, and its time
    to first token (s)."""
    steps: list[float] = []
    engine = Engine.in_process(
        loaded,
        max_batch=RUNNING + 1,
        prefill_tokens=prefill_tokens,
        on_step=lambda _stats: steps.append(time.perf_counter()),
    )
    done = threading.Event()
    vocab = len(loaded.tokenizer)

    def decode(index: int) -> None:
        prompt = Prompt([(index * 31 + i) % (vocab - 10) + 10 for i in range(24)], 0)
        engine.generate(prompt, GenerationParams(max_new_tokens=2000), should_cancel=done.is_set)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(RUNNING)]
    for thread in threads:
        thread.start()
    while len(steps) < 20:  # all fifteen decoding
        time.sleep(0.05)
    long_prompt = Prompt([(i * 7) % (vocab - 10) + 10 for i in range(LONG_PROMPT)], 0)
    arrived = time.perf_counter()
    result = engine.generate(long_prompt, GenerationParams(max_new_tokens=1))
    first_token = result.time_to_first_token_s or 0.0
    time.sleep(1)  # the step that made its token is recorded after it has returned
    # From the last step before it arrived to half a second after its first token.
    before = max(t for t in steps if t < arrived)
    during = [t for t in steps if before <= t <= arrived + first_token + 0.5]
    done.set()
    for thread in threads:
        thread.join()
    engine.close()
    gaps = [b - a for a, b in itertools.pairwise(during)]
    return gaps, first_token


def main() -> None:
    loaded = load_model(str(long_model_dir()))
    say(f"Prefill stall: {RUNNING} turns decoding, a prompt of {LONG_PROMPT} tokens joins")
    for budget in BUDGETS:
        name = "whole prompt at once" if budget >= LONG_PROMPT else f"chunks of {budget}"
        gaps, first_token = _stall(loaded, budget)
        say(
            f"  {name}: gap between tokens of the running turns p50 "
            f"{percentile(gaps, 0.5) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms "
            f"({len(gaps)} steps); the long turn's first token after {first_token:.2f} s"
        )


if __name__ == "__main__":
    main()
