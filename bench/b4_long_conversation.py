"""B4 Long conversations: one conversation grown to 60 turns with the small model, through the
whole service. Reports the latency of turn 60 over turn 1 (target: at most 1.5x, by reuse of
the conversation's cached prefix) and, in the same run, the same conversation with the prefix
cache off (every turn prefilled whole), as the baseline reuse is measured against.

The small model here has GPT-2 small's compute shape and a context window of 4,096 tokens, as
chat models have (GPT-2's 1,024 would make the window slide from about turn 25): the benchmark
measures reuse, and once the window slides every turn is prefilled whole (positions shift), with
reuse or without. Each turn's prompt size is printed, so that shows.

Run: python -m bench.b4_long_conversation
"""

from __future__ import annotations

from pathlib import Path

from bench.conversations import TurnRecord, hold_conversations
from bench.report import percentile, say
from bench.stack import BenchStack, long_model_dir

TURNS, NEW_TOKENS = 60, 16
_ENDS = 5  # turns at each end of the conversation whose medians are compared too


def _conversation(model: Path, *, prefix_cache_mb: str) -> list[TurnRecord]:
    with BenchStack("b4", model=model, WORKER_PREFIX_CACHE_MB=prefix_cache_mb) as stack:
        key = stack.create_key("bench")
        generation = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
        # A turn of another conversation first, so that turn 1 is not the worker's first.
        hold_conversations(stack.base_url, key, conversations=1, turns=1, generation=generation)
        records, _ = hold_conversations(
            stack.base_url, key, conversations=1, turns=TURNS, generation=generation
        )
    return records[0]


def _report(name: str, turns: list[TurnRecord]) -> float:
    first, last = turns[0], turns[-1]
    ratio = last.latency_s / first.latency_s
    middle = percentile([t.latency_s for t in turns[1:-1]], 0.5)
    say(
        f"  {name}: turn 1 {first.latency_s * 1000:.0f} ms, turn {len(turns)} "
        f"{last.latency_s * 1000:.0f} ms = {ratio:.2f}x; turns 2-{len(turns) - 1} "
        f"p50 {middle * 1000:.0f} ms"
    )
    # One turn against one turn moves by a third between runs on a shared machine (seen:
    # 1.38x to 2.09x for the same code); the ends' medians move less.
    head = percentile([t.latency_s for t in turns[:_ENDS]], 0.5)
    tail = percentile([t.latency_s for t in turns[-_ENDS:]], 0.5)
    say(
        f"    p50 of the last {_ENDS} turns over the first {_ENDS}: {tail * 1000:.0f} / "
        f"{head * 1000:.0f} ms = {tail / head:.2f}x"
    )
    for index in (0, len(turns) // 2, len(turns) - 1):
        job = turns[index].job
        say(
            f"    turn {index + 1}: {job['usage']['prompt_tokens']} prompt tokens, "
            f"{job['context_messages']} earlier messages, "
            f"{job['usage']['completion_tokens']} generated"
        )
    return ratio


def main() -> None:
    model = long_model_dir()
    say(f"B4: one conversation of {TURNS} turns, {NEW_TOKENS} new tokens a turn, small model")
    reused = _report("prefix reuse", _conversation(model, prefix_cache_mb="1024"))
    say(f"  turn {TURNS} over turn 1: {reused:.2f}x (target <= 1.5x)")
    whole = _report("prefix cache off", _conversation(model, prefix_cache_mb="0"))
    say(f"  baseline, every turn prefilled whole: {whole:.2f}x")


if __name__ == "__main__":
    main()
