"""A reply streamed in pieces adds up to the stored reply exactly, whatever the ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from worker.inference.engine import Engine, GenerationParams
from worker.inference.loader import LoadedModel, load_model
from worker.inference.model_init import build_model
from worker.inference.prompt import FALLBACK_ROLE_MARKERS, build_prompt
from worker.inference.reply_text import ReplyStream, decoded_reply


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory: Path = build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)
    return load_model(str(directory))


def _streamed(
    tokenizer: Any, ids: list[int], *, stop_ids: set[int], markers: tuple[str, ...] = ()
) -> tuple[list[str], str]:
    """The pieces shown feeding `ids` one at a time, and the stored reply."""
    pieces: list[str] = []
    stream = ReplyStream(tokenizer, pieces.append, stop_ids=stop_ids, text_markers=markers)
    for n in range(1, len(ids) + 1):
        stream.advance(ids[:n])
    text, _, _ = decoded_reply(tokenizer, ids, stop_ids=stop_ids, text_markers=markers)
    stream.finish(text)
    return pieces, text


def test_a_character_split_across_tokens_is_shown_whole(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(" Grüße aus 東京, señor 🙂 — fin.", add_special_tokens=False)
    # The case this is about: some prefix of the ids ends inside a character.
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(1, len(ids)))
    pieces, text = _streamed(tokenizer, ids, stop_ids=set())
    assert "".join(pieces) == text == "Grüße aus 東京, señor 🙂 — fin."
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 5  # streamed, not shown at the end in one piece


def test_random_ids_add_up_to_the_stored_reply(loaded: LoadedModel) -> None:
    # A random model's replies are byte salad: invalid UTF-8, stray whitespace, NULs.
    tokenizer = loaded.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        for markers in ((), FALLBACK_ROLE_MARKERS):
            pieces, text = _streamed(tokenizer, ids, stop_ids={end}, markers=markers)
            assert "".join(pieces) == text, ids


def test_a_role_marker_is_never_shown(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(" Sure thing.\nUser: and then?", add_special_tokens=False)
    pieces, text = _streamed(tokenizer, ids, stop_ids=set(), markers=FALLBACK_ROLE_MARKERS)
    assert text == "Sure thing."
    assert "".join(pieces) == text


def test_the_engine_streams_what_it_returns(loaded: LoadedModel) -> None:
    engine = Engine.in_process(loaded)
    try:
        prompt = build_prompt(
            loaded.tokenizer,
            system_prompt=None,
            history=[],
            message="Tell me about lighthouses.",
            max_context_tokens=loaded.max_context_tokens,
            max_new_tokens=48,
        )
        for seed in range(6):
            pieces: list[str] = []
            params = GenerationParams(max_new_tokens=48, temperature=1.2, seed=seed)
            result = engine.generate(prompt, params, on_text=pieces.append)
            assert "".join(pieces) == result.text
            assert result.text == engine.generate(prompt, params).text
    finally:
        engine.close()
