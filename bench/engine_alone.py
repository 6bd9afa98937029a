"""The engine without the service: B2's and B3's conversations run straight on a worker's
Engine in this process (no HTTP, no database, no broker), to tell the engine's own speed from
the service's overhead.

Run: python -m bench.engine_alone [b2|b3]
"""

from __future__ import annotations

import sys
import threading
import time

from app.schemas import ChatMessage
from bench.report import percentile, say
from bench.stack import model_dir
from worker.inference.engine import Engine, GenerationParams
from worker.inference.loader import load_model
from worker.inference.prompt import build_prompt

SHAPES = {
    # name: (model size, conversations, turns, new tokens)
    "b2": ("tiny", 20, 20, 16),
    "b3": ("small", 16, 4, 32),
}


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "b2"
    size, conversations, turns, new_tokens = SHAPES[name]
    loaded = load_model(str(model_dir(size)))
    engine = Engine(loaded, max_batch=16, prefix_cache_bytes=1024 * 2**20)
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def converse(index: int) -> None:
        nonlocal tokens
        history: list[ChatMessage] = []
        for turn in range(turns):
            message = f"Conversation {index}, turn {turn}: tell me something new."
            prompt = build_prompt(
                loaded.tokenizer,
                system_prompt=None,
                history=history,
                message=message,
                max_context_tokens=loaded.max_context_tokens,
                max_new_tokens=new_tokens,
            )
            started = time.perf_counter()
            result = engine.generate(
                prompt, GenerationParams(max_new_tokens=new_tokens), prefix_key=f"c{index}"
            )
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens += result.completion_tokens
            history += [
                ChatMessage(role="user", content=message),
                ChatMessage(role="assistant", content=result.text),
            ]

    started = time.perf_counter()
    threads = [threading.Thread(target=converse, args=(i,)) for i in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cache = engine.prefix_cache
    say(f"{name} on the engine alone ({size} model): {len(latencies)} turns in {wall:.1f} s")
    say(f"  {len(latencies) / wall:.1f} turns/s, {tokens / wall:.1f} tokens/s")
    say(f"  turn latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms")
    if cache is not None:
        say(f"  prefix cache: {cache.hits} hits, {cache.misses} misses")


if __name__ == "__main__":
    main(sys.argv[1:])
