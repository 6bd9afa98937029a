"""B3 Model throughput: end to end with the small model (GPT-2 small's shape).

16 conversations of 4 turns, 32 new tokens a turn, greedy, through the whole service. Reports
generated tokens/s end to end and, in the same run on the same first-turn prompts, (a) one
`generate` call per turn, one at a time (what the usual FastAPI-plus-Celery service does), and
(b) one padded batch of 16 (the model's ceiling on this machine), and (c) transformers' own
continuous batching (`generate_batch`, paged attention), which the engine is kept against.
Target: end to end at least 6x (a), and at least 90% of (b).

Run: python -m bench.b3_model_throughput
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig

from bench.conversations import hold_conversations
from bench.report import say
from bench.stack import BenchStack, model_dir
from worker.inference.loader import LoadedModel, load_model
from worker.inference.prompt import build_prompt

CONVERSATIONS, TURNS, NEW_TOKENS = 16, 4, 32


def _first_prompts(loaded: LoadedModel) -> list[list[int]]:
    return [
        build_prompt(
            loaded.tokenizer,
            system_prompt=None,
            history=[],
            message=f"Conversation {i}, turn 0: tell me something new.",
            max_context_tokens=loaded.max_context_tokens,
            max_new_tokens=NEW_TOKENS,
        ).input_ids
        for i in range(CONVERSATIONS)
    ]


def _generated(rows: torch.Tensor, prompt_width: int, stop_ids: set[int]) -> int:
    """Tokens generated per row up to and including its first stop token."""
    total = 0
    for row in rows[:, prompt_width:].tolist():
        ends = [i for i, token in enumerate(row) if token in stop_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


def one_at_a_time(loaded: LoadedModel, prompts: list[list[int]]) -> float:
    """(a) tokens/s of one `generate` per turn, one after the other."""
    stop = set(loaded.tokenizer.all_special_ids)
    tokens, started = 0, time.perf_counter()
    for ids in prompts:
        tensor = torch.tensor([ids], device=loaded.device)
        out = loaded.model.generate(
            tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        tokens += _generated(out, tensor.shape[1], stop)
    return tokens / (time.perf_counter() - started)


def padded_batch(loaded: LoadedModel, prompts: list[list[int]]) -> float:
    """(b) tokens/s of one left-padded `generate` of all the turns at once."""
    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    out = loaded.model.generate(
        ids,
        attention_mask=mask.to(loaded.device),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad,
    )
    elapsed = time.perf_counter() - started
    return _generated(out, width, set(loaded.tokenizer.all_special_ids)) / elapsed


def library_batching(loaded: LoadedModel, prompts: list[list[int]]) -> float:
    """(c) tokens/s of transformers' continuous batching (`generate_batch`) on the prompts."""
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=loaded.tokenizer.eos_token_id,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    started = time.perf_counter()
    outputs = loaded.model.generate_batch(inputs=prompts, generation_config=config)
    elapsed = time.perf_counter() - started
    return sum(len(output.generated_tokens) for output in outputs.values()) / elapsed


def _engine_counters(stack: BenchStack) -> tuple[float, float, float]:
    """Decoding steps, turns advanced (summed over steps), and seconds spent stepping."""
    return (
        stack.worker_metric("parley_worker_batch_size_count"),
        stack.worker_metric("parley_worker_batch_size_sum"),
        stack.worker_metric("parley_worker_step_seconds_sum"),
    )


def main() -> None:
    loaded = load_model(str(model_dir("small")))
    prompts = _first_prompts(loaded)
    with torch.inference_mode():
        padded_batch(loaded, prompts[:2])  # warm-up
        baseline_a = one_at_a_time(loaded, prompts)
        baseline_b = padded_batch(loaded, prompts)
        library_batching(loaded, prompts[:2])  # warm-up: its manager and paged cache
        library = library_batching(loaded, prompts)
    del loaded
    say(f"B3: {CONVERSATIONS} conversations x {TURNS} turns, {NEW_TOKENS} new tokens, small model")
    say(f"  (a) one generate per turn, one at a time: {baseline_a:.1f} tokens/s")
    say(f"  (b) one padded batch of {CONVERSATIONS}: {baseline_b:.1f} tokens/s")
    say(f"  (c) transformers' generate_batch (continuous batching): {library:.1f} tokens/s")
    with BenchStack("b3", model="small", WORKER_MAX_BATCH=str(CONVERSATIONS)) as stack:
        key = stack.create_key("bench")
        generation = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
        hold_conversations(stack.base_url, key, conversations=2, turns=1, generation=generation)
        before = _engine_counters(stack)
        records, wall = hold_conversations(
            stack.base_url, key, conversations=CONVERSATIONS, turns=TURNS, generation=generation
        )
        time.sleep(2)  # the workers' next heartbeat publishes their metrics
        after = _engine_counters(stack)
    tokens = sum(r.job["usage"]["completion_tokens"] for c in records for r in c)
    end_to_end = tokens / wall
    say(f"  end to end: {tokens} tokens in {wall:.1f} s = {end_to_end:.1f} tokens/s")
    say(f"  ratio to (a): {end_to_end / baseline_a:.2f}x (target >= 6x)")
    say(f"  ratio to (b): {end_to_end / baseline_b:.0%} (target >= 90%)")
    say(f"  ratio to (c): {end_to_end / library:.2f}x")
    steps, rows, seconds = (a - b for a, b in zip(after, before, strict=True))
    if steps:
        say(
            f"  engine: {steps:.0f} steps, {rows / steps:.1f} turns a step on average, "
            f"{seconds / steps * 1000:.0f} ms a step"
        )


if __name__ == "__main__":
    main()
